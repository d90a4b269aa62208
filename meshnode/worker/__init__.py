"""A worker: hosts a span of transformer blocks and serves inference sessions.

Map of the package (no logic here):

- ``budget``: ``CacheBudget``, the cache-token budget (pure).
- ``sessions``: ``SessionTable``, open sessions and their idle timeouts (pure, injected clock).
- ``limits``: named bounds: sessions per peer, session age, requests queued per peer.
- ``fairness``: ``FairQueue``, compute turns round-robin across clients (pure).
- ``span_choice``: ``choose_span``, the least-served blocks from DHT records (pure).
- ``compute``: ``SpanCompute``, JAX on one dedicated thread, never on the reactor thread.
- ``handlers``: ``InferenceHandlers``, the ``infer.*`` handlers over the Endpoint.
- ``forwarding``: ``ForwardingHandlers``, steps pushed worker to worker (``infer.push``,
  ``infer.wait``, ``infer.step`` with ``forward``), over ``InferenceHandlers.run_step``.
- ``outputs``: ``OutputMailbox``, pushed steps' outputs for their owners' waits (pure, bounded).
- ``announce``: ``Announcer``, one signed DHT record per block, refreshed; offline on stop;
  ``batching_fields``, the compute's optional load and batch curve for the records.
- ``links``: ``PeerRtts``, ``LinkProber``: round trips to route neighbours, published.
- ``service``: ``WorkerService``, the Twisted service that wires it all together.

What it shares with clients (spans, server info, ``infer.*`` messages, block
records) is in ``meshnode.inference``; it never imports ``meshnode.client``.
"""
