"""``meshnode serve``: the OpenAI-compatible HTTP API, the swarm monitor page, and metrics.

Map of the package (no logic here):

- ``schema``: OpenAI request parsing and validation, response bodies (pure).
- ``completions``: ``StopMatcher`` (pure) and ``CompletionRun``, one request over the mesh client.
- ``sse``: ``EventStream``, server-sent events on a ``twisted.web`` request.
- ``resources``: the ``/v1`` resources (models, chat completions, completions).
- ``monitor``: ``SwarmMonitor`` (polls the swarm) and ``swarm_snapshot`` (pure).
- ``metrics``: ``ServerMetrics``, the server's Prometheus metrics in their own registry.
- ``app``: ``ServeService``, the Twisted service, and the resource tree.
- ``static/``: the monitor page (plain HTML, JS and CSS, served as package data).

It sits on ``meshnode.client`` (``MeshClient``) and never imports ``meshnode.worker``.
"""
