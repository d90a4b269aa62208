"""The ``twistd meshnode`` plugin: a worker, a bootstrap DHT node or the HTTP API server.

See ``meshnode/tap.py``.
"""

from twisted.application.service import ServiceMaker

meshnode = ServiceMaker(
    "meshnode",
    "meshnode.tap",
    "meshnode: pipeline-parallel LLM inference over a TLS Kademlia mesh",
    "meshnode",
)
