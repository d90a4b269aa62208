"""The client: route choice, sessions along a chain of workers, generation.

Map of the package (no logic here):

- ``routing/``: ``route`` (pure: ``find_route`` Dijkstra over spans, ``span_route`` for one
  span), ``costs`` (pure: a hop's step time at its load, the links around it) and
  ``discovery`` (the one path from DHT records and pings to a route, and the
  one poll loop ``wait_for_route``).
- ``chain``: ``SpanSession`` (one worker's session, recording its inputs for replay)
  and ``InferenceChain`` (the sessions along a route, a remote forward).
- ``recovery``: ``BanList`` (growing bans), ``SpanRecovery`` (a failed
  hop's span re-routed, its recorded inputs replayed there, the step retried).
- ``generate``: the mesh driver of the model engine's step-driven ``Generation``, async on
  the reactor (``HeadCompute`` puts the head's JAX work on the client's one compute thread,
  ``meshnode.compute``); cancellation; ``GenerationInterrupted``.
- ``api``: ``MeshClient`` (Deferreds / coroutines) and the blocking ``generate``.
- ``commandline``: ``run_generate``, the mesh branch of ``meshnode generate``.

Shared with workers through ``meshnode.inference``; never imports ``meshnode.worker``.
"""
