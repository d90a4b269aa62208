"""Client defaults the command line shares, importable without loading JAX or Twisted."""

#: fraction of steps verified on a second replica by ``meshnode generate`` and ``serve``
#: (``meshnode.client.verify``): a persistent liar is caught within ~5 steps on average,
#: within 30 with probability 0.999; every generation also ends with a check
DEFAULT_VERIFY_RATE = 0.2

#: seconds to wait for the mesh to cover a failed span again before ``RouteNotFound``
#: (``meshnode.client.recovery``; ``meshnode generate --recovery-wait``)
ROUTE_WAIT = 30.0
