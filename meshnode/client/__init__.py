"""The client: route choice, sessions along a chain of workers, generation.

Map of the package (no logic here):

- ``routing/``: ``find_route`` (pure Dijkstra over spans) and the candidates it reads.
- ``chain``: ``SpanSession`` (one worker's session, recording its inputs for replay)
  and ``InferenceChain`` (the sessions along a route, a remote forward).
- ``recovery``: ``BanList`` (growing bans), ``span_route`` (pure), ``SpanRecovery`` (a failed
  hop's span re-routed, its recorded inputs replayed there, the step retried).
- ``generate``: the model engine's generation loop driven by a remote forward.
- ``api``: ``MeshClient`` (Deferreds / coroutines) and the blocking ``generate``.
- ``commandline``: ``run_generate``, the mesh branch of ``meshnode generate``.
"""
