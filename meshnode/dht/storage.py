"""The records a node holds for others: validated on the way in, gone once expired.

Time comes from an injected clock (``clock.seconds()``); nothing here reads
the wall clock. Expired records are invisible to ``get`` at once and are
dropped from memory by ``sweep``, which the DHT node runs periodically.

Memory is bounded twice: per key (``MAX_SUBKEYS_PER_KEY``) and overall
(``MAX_RECORDS``). A full store refuses new sub-keys rather than evicting
existing ones, so a flood of fresh identities cannot push out honest entries
that are already held; a sub-key already present may always be renewed.

An ``admit`` check (a private swarm's ``SwarmPolicy.check_record``) runs on
the way in (a refused record raises its ``NotAMember``) and on the way out
(``get`` returns only records that pass now: a writer revoked since its
record was stored is gone from answers at once).
"""

from __future__ import annotations

from collections.abc import Callable

from meshnode.dht.records import (
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    SignedRecord,
    validate_record,
)
from meshnode.errors import MeshError, StorageFull
from meshnode.identity import NodeID

MAX_SUBKEYS_PER_KEY = 512
"""Sub-keys (writers) one key may hold on one node."""

MAX_RECORDS = 16384
"""Records one node holds for others, all keys together."""


class RecordStore:
    """A TTL store of signed records, keyed by (key, sub-key)."""

    def __init__(
        self,
        clock,
        max_records: int = MAX_RECORDS,
        max_subkeys_per_key: int = MAX_SUBKEYS_PER_KEY,
        max_ttl: float = MAX_RECORD_TTL,
        max_value_bytes: int = MAX_VALUE_BYTES,
        admit: Callable[[SignedRecord], None] | None = None,
    ) -> None:
        self._clock = clock
        self.admit = admit
        self.max_records = max_records
        self.max_subkeys_per_key = max_subkeys_per_key
        self.max_ttl = max_ttl
        self.max_value_bytes = max_value_bytes
        self._records: dict[bytes, dict[NodeID, SignedRecord]] = {}
        self._count = 0

    def put(self, record: SignedRecord) -> bool:
        """Keep ``record`` if it is valid and newer than the one held for its sub-key.

        Returns whether it was kept (``False``: an equal or later record is
        already held). Raises ``InvalidRecord`` or ``StorageFull``.
        """
        now = self._clock.seconds()
        validate_record(record, now, self.max_ttl, self.max_value_bytes)
        if self.admit is not None:
            self.admit(record)
        held = self._records.get(record.key, {})
        current = held.get(record.subkey)
        if current is not None and current.expiration >= record.expiration:
            return False
        if current is None:
            self._check_room(record.key, held)
            self._count += 1
        self._records.setdefault(record.key, {})[record.subkey] = record
        return True

    def get(self, key: bytes) -> dict[NodeID, SignedRecord]:
        """The unexpired records held under ``key``, by sub-key."""
        now = self._clock.seconds()
        held = self._records.get(key, {})
        return {subkey: r for subkey, r in held.items()
                if r.expiration > now and self.admits(r)}

    def admits(self, record: SignedRecord) -> bool:
        """Whether ``record`` passes the ``admit`` check now (always, without one)."""
        if self.admit is None:
            return True
        try:
            self.admit(record)
        except MeshError:
            return False
        return True

    def sweep(self) -> int:
        """Drop every expired record; returns how many were dropped."""
        now = self._clock.seconds()
        dropped = 0
        for key in list(self._records):
            held = self._records[key]
            for subkey in [s for s, r in held.items() if r.expiration <= now]:
                del held[subkey]
                dropped += 1
            if not held:
                del self._records[key]
        self._count -= dropped
        return dropped

    def keys(self) -> list[bytes]:
        return list(self._records)

    def __len__(self) -> int:
        return self._count

    def _check_room(self, key: bytes, held: dict[NodeID, SignedRecord]) -> None:
        if len(held) >= self.max_subkeys_per_key or self._count >= self.max_records:
            self.sweep()
            held = self._records.get(key, {})
        if len(held) >= self.max_subkeys_per_key:
            raise StorageFull(f"key holds {len(held)} sub-keys already")
        if self._count >= self.max_records:
            raise StorageFull(f"node holds {self._count} records already")
