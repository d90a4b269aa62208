"""Route choice: which workers, over which spans, a client's chain goes through.

- ``route``: ``Route``, ``RouteHop``, ``find_route`` (pure), ``candidates_from_records``.
- ``costs``: what a hop costs (pure): ``step_seconds`` at the worker's announced load,
  ``LinkCosts`` for the round trips client -> worker and worker -> worker.
- ``discovery``: records, round trips and the route now (async).
"""
