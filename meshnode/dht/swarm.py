"""A swarm of DHT nodes in one process on loopback, for benchmarks and integration tests.

Each node has its own ephemeral identity, its own real TLS ``Endpoint`` on an
ephemeral port, and joins through the first node. Nothing here is used by a
deployed node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import gatherResults

from meshnode.dht.network import DHTNode
from meshnode.identity import Identity
from meshnode.wire.endpoint import Endpoint

LOOPBACK = "127.0.0.1"


@dataclass
class LocalSwarm:
    """``nodes[i]`` speaks over ``endpoints[i]``; ``stop`` ends them all."""

    reactor: Any
    endpoints: list[Endpoint]
    nodes: list[DHTNode]

    @classmethod
    async def start(cls, reactor: Any, count: int, **node_options: Any) -> LocalSwarm:
        """Listen ``count`` nodes on loopback, then join them one by one through the first."""
        swarm = cls(reactor, [], [])
        for _ in range(count):
            await swarm.add(**node_options)
        return swarm

    async def add(self, **node_options: Any) -> DHTNode:
        """One more node, listening and bootstrapped through the first."""
        endpoint = Endpoint(self.reactor, Identity.ephemeral())
        await endpoint.listen(LOOPBACK)
        node = DHTNode(endpoint, self.reactor, self.reactor, **node_options)
        if self.nodes:
            await node.bootstrap([self.endpoints[0].address])
        self.endpoints.append(endpoint)
        self.nodes.append(node)
        return node

    async def stop_node(self, index: int) -> None:
        """Stop one node and close its endpoint (its peers see it vanish)."""
        await self.nodes[index].stop()
        await self.endpoints[index].close()

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()
        await gatherResults([e.close() for e in self.endpoints], consumeErrors=True)
