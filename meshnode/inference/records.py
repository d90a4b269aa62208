"""The shared vocabulary of workers and clients: spans and announced server info.

A worker announces one DHT record per block it serves; the record's value is a
``ServerInfo`` encoded with ``to_record`` (its CDDL is ``server-info`` in
``schemas/inference.cddl``). Clients decode records with ``ServerInfo.from_record``
and route over them. Nothing here touches the network or the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from meshnode.errors import BadRequest

#: version of the ``server-info`` record and of the ``infer.*`` messages
PROTOCOL_VERSION = 1
#: length of a session id chosen by a worker
SESSION_ID_BYTES = 16
#: bytes of a node id that name a peer in ``ServerInfo.peer_rtts``
PEER_PREFIX_BYTES = 8
#: most peers whose round trip one record carries (the most recently measured)
MAX_PEER_RTTS = 16
#: most points of ``ServerInfo.batch_throughput``
MAX_BATCH_POINTS = 8


@dataclass(frozen=True, order=True)
class BlockSpan:
    """Blocks ``[start, end)`` of a model: the unit a worker serves and a session covers."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise BadRequest(f"bad span [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start

    def contains(self, other: BlockSpan) -> bool:
        return self.start <= other.start and other.end <= self.end

    def blocks(self) -> range:
        return range(self.start, self.end)

    @classmethod
    def parse(cls, text: str) -> BlockSpan:
        """``"A:B"`` (end exclusive) as given to ``--blocks``."""
        try:
            start_text, end_text = text.split(":")
            return cls(int(start_text), int(end_text))
        except ValueError as exc:
            raise BadRequest(f"span {text!r} is not START:END") from exc

    def to_wire(self) -> list[int]:
        return [self.start, self.end]

    @classmethod
    def from_wire(cls, value: Any) -> BlockSpan:
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise BadRequest(f"span must be [start, end], got {value!r}")
        return cls(value[0], value[1])

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class WorkerState(enum.Enum):
    """What a worker says about itself in its records."""

    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class ServerInfo:
    """What a worker announces for each block it serves.

    ``throughput`` is tokens per second through the whole span, measured by a
    warm-up forward; ``cache_tokens`` is the free room of the cache-token budget.
    ``address`` is where peers dial the worker (its ``--announce-address`` when
    given), pinned with its node id.

    Optional, absent from older records (routing then assumes what it assumed
    before them):

    - ``peer_rtts``: round trips (seconds) the worker measured to other workers,
      keyed by the first ``PEER_PREFIX_BYTES`` of their node ids, at most
      ``MAX_PEER_RTTS``: the links between consecutive hops of a route.
    - ``batch_load``: the steps the worker has to run now (waiting, plus those
      of its last batch): the batch a new session's step joins.
    - ``batch_throughput``: ``(batch size, tokens/s through the span)`` points,
      batch sizes increasing: its speed when that many steps share a forward.
    """

    address: str
    span: BlockSpan
    state: WorkerState
    throughput: float
    cache_tokens: int
    dtype: str
    model: str
    version: int = PROTOCOL_VERSION
    #: the longest session the worker accepts (positions); None in records from before it
    max_length: int | None = None
    peer_rtts: tuple[tuple[bytes, float], ...] = ()
    batch_load: int | None = None
    batch_throughput: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.peer_rtts) > MAX_PEER_RTTS:
            raise BadRequest(f"at most {MAX_PEER_RTTS} peer round trips, not {len(self.peer_rtts)}")
        if any(len(prefix) != PEER_PREFIX_BYTES or rtt < 0 for prefix, rtt in self.peer_rtts):
            raise BadRequest(f"peer round trips: {PEER_PREFIX_BYTES}-byte ids, times >= 0")
        if self.batch_load is not None and self.batch_load < 0:
            raise BadRequest(f"batch load must be >= 0, not {self.batch_load}")
        sizes = [size for size, _ in self.batch_throughput]
        if len(sizes) > MAX_BATCH_POINTS or sizes != sorted(set(sizes)) or (sizes and sizes[0] < 1):
            raise BadRequest(
                f"batch throughput: at most {MAX_BATCH_POINTS} points, batch sizes >= 1 "
                "and increasing"
            )
        if any(speed <= 0 for _, speed in self.batch_throughput):
            raise BadRequest("batch throughput: speeds must be positive")

    def peer_rtt(self, node_id: bytes) -> float | None:
        """The round trip this worker measured to ``node_id`` (seconds), if it published one."""
        prefix = node_id[:PEER_PREFIX_BYTES]
        return next((rtt for p, rtt in self.peer_rtts if p == prefix), None)

    def to_record(self) -> dict[str, Any]:
        """The CBOR-able DHT value (``server-info`` in the CDDL)."""
        return {
            "v": self.version,
            "address": self.address,
            "span": self.span.to_wire(),
            "state": self.state.value,
            "throughput": float(self.throughput),
            "cache_tokens": int(self.cache_tokens),
            "dtype": self.dtype,
            "model": self.model,
            **({} if self.max_length is None else {"max_length": int(self.max_length)}),
            **_optional_fields(self),
        }

    @classmethod
    def from_record(cls, value: Any) -> ServerInfo:
        """Parse a DHT value; ``BadRequest`` when a field is missing or mistyped."""
        if not isinstance(value, dict):
            raise BadRequest("server info must be a map")
        try:
            info = cls(
                address=_typed(value, "address", str),
                span=BlockSpan.from_wire(value.get("span")),
                state=WorkerState(_typed(value, "state", str)),
                throughput=float(_typed(value, "throughput", (int, float))),
                cache_tokens=_typed(value, "cache_tokens", int),
                dtype=_typed(value, "dtype", str),
                model=_typed(value, "model", str),
                version=_typed(value, "v", int),
                max_length=None if "max_length" not in value else _typed(value, "max_length", int),
                peer_rtts=_peer_rtts(value.get("peer_rtt_ms", {})),
                batch_load=None if "load" not in value else _typed(value, "load", int),
                batch_throughput=_batch_points(value.get("batch_throughput", [])),
            )
        except ValueError as exc:
            raise BadRequest(f"bad server info: {exc}") from exc
        return info

    @property
    def online(self) -> bool:
        return self.state is WorkerState.ONLINE


def _optional_fields(info: ServerInfo) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if info.peer_rtts:
        fields["peer_rtt_ms"] = {prefix: float(rtt * 1e3) for prefix, rtt in info.peer_rtts}
    if info.batch_load is not None:
        fields["load"] = int(info.batch_load)
    if info.batch_throughput:
        fields["batch_throughput"] = [[int(b), float(t)] for b, t in info.batch_throughput]
    return fields


def _peer_rtts(value: Any) -> tuple[tuple[bytes, float], ...]:
    if not isinstance(value, dict) or not all(
        isinstance(k, bytes) and _is_number(v) for k, v in value.items()
    ):
        raise BadRequest("peer_rtt_ms must map node id prefixes to milliseconds")
    return tuple(sorted((prefix, float(ms) / 1e3) for prefix, ms in value.items()))


def _batch_points(value: Any) -> tuple[tuple[int, float], ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
        and _is_number(p[1]) for p in value
    ):
        raise BadRequest("batch_throughput must be a list of [batch size, tokens/s]")
    return tuple((size, float(speed)) for size, speed in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(value: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    item = value.get(key)
    if not isinstance(item, kind) or isinstance(item, bool):
        raise BadRequest(f"field {key!r} missing or of the wrong type")
    return item


def eligible(
    info: ServerInfo, model: str, num_layers: int | None = None, min_cache_tokens: int = 0
) -> bool:
    """Whether a worker may be routed through at all: the one eligibility filter.

    Online, serving this model (fingerprint), within its ``num_layers`` blocks
    when given, and with room for ``min_cache_tokens``.
    """
    return (
        info.online
        and info.model == model
        and (num_layers is None or info.span.end <= num_layers)
        and info.cache_tokens >= min_cache_tokens
    )
