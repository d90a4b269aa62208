"""What workers and clients both speak: the inference vocabulary (Petals' ``data_structures``).

- ``records``: ``BlockSpan``, ``WorkerState``, ``ServerInfo`` (the value of a block record).
- ``messages``: the ``infer.*`` messages of ``schemas/inference.cddl``, built and parsed.
- ``directory``: the block records a model's workers announce in the DHT, fetched and checked.
- ``capabilities``: the owner's permission for a worker to push one step into a session.

``meshnode.worker`` and ``meshnode.client`` both import this package and never each other.
"""
