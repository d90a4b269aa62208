"""The ``twistd meshnode`` plugin: a worker or a bootstrap DHT node (see ``meshnode/tap.py``)."""

from twisted.application.service import ServiceMaker

meshnode = ServiceMaker(
    "meshnode",
    "meshnode.tap",
    "meshnode: pipeline-parallel LLM inference over a TLS Kademlia mesh",
    "meshnode",
)
