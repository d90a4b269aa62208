"""The block directory: which workers the DHT says serve each block of a model.

Workers announce one signed record per block (``announce``); clients route over
them and workers choose their span from them. Both read them here: fetch every
block's records, keep the valid ones whose announced address is pinned to the
node id that signed them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import DeferredList
from twisted.logger import Logger, LogLevel

from meshnode.dht.node import block_key
from meshnode.errors import MeshError
from meshnode.identity import NodeID, PeerAddress
from meshnode.inference.records import ServerInfo

#: block index -> the DHT key of that block's records
KeyFor = Callable[[int], bytes]

log = Logger()


def keys_for(fingerprint: str) -> KeyFor:
    """The DHT key of each block of the model with this fingerprint."""
    return lambda block: block_key(fingerprint, block)


async def fetch_block_records(
    dht: Any, key_for: KeyFor, num_layers: int
) -> dict[int, dict[NodeID, ServerInfo]]:
    """Per block, the valid server infos found in the DHT, by signer node id."""
    results = await DeferredList(
        [dht.get(key_for(b)) for b in range(num_layers)], consumeErrors=True
    )
    records: dict[int, dict[NodeID, ServerInfo]] = {}
    for block, (ok, found) in enumerate(results):
        if not ok:
            log.emit(
                LogLevel.warn,
                "DHT lookup of block {b} failed: {why}",
                b=block,
                why=found.getErrorMessage(),
            )
            continue
        records[block] = {
            node_id: info
            for node_id, record in found.items()
            if (info := _parse(node_id, record.value)) is not None
        }
    return records


def _parse(node_id: NodeID, value: Any) -> ServerInfo | None:
    try:
        info = ServerInfo.from_record(value)
        pinned = PeerAddress.parse(info.address).node_id
    except MeshError:
        return None
    return info if pinned == node_id else None
