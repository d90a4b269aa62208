"""Route choice: which workers, over which spans, a client's chain goes through.

- ``route``: ``Route``, ``RouteHop``, ``find_route`` (pure), ``candidates_from_records``.
"""
