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
            )
        except ValueError as exc:
            raise BadRequest(f"bad server info: {exc}") from exc
        return info

    @property
    def online(self) -> bool:
        return self.state is WorkerState.ONLINE


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
