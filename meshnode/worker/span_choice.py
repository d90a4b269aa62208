"""``choose_span``: which blocks a new worker should serve when ``--blocks`` is not given.

Pure: from the records now in the DHT, count, per block, the online workers of
this model that serve it, and take the window of ``num_blocks`` blocks whose
weakest block is least served (ties: least served in total, then lowest start),
as Petals' ``choose_best_blocks`` does with throughputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshnode.inference.records import BlockSpan, ServerInfo, eligible


def block_coverage(
    records: Mapping[int, Iterable[ServerInfo]], num_layers: int, model: str
) -> list[int]:
    """Per block, how many distinct online workers of ``model`` announce it."""
    counts = []
    for block in range(num_layers):
        addresses = {
            info.address
            for info in records.get(block, ())
            if eligible(info, model, num_layers) and block in info.span.blocks()
        }
        counts.append(len(addresses))
    return counts


def choose_span(
    records: Mapping[int, Iterable[ServerInfo]], num_layers: int, num_blocks: int, model: str
) -> BlockSpan:
    """The window of ``num_blocks`` blocks that the mesh serves least now."""
    if not (0 < num_blocks <= num_layers):
        raise ValueError(f"cannot serve {num_blocks} of {num_layers} blocks")
    counts = block_coverage(records, num_layers, model)
    best_start = min(
        range(num_layers - num_blocks + 1),
        key=lambda start: (
            min(counts[start : start + num_blocks]),
            sum(counts[start : start + num_blocks]),
            start,
        ),
    )
    return BlockSpan(best_start, best_start + num_blocks)
