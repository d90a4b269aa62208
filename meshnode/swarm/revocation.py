"""The revocation list: node ids, one per line, in ``<swarm folder>/revoked``.

Blank lines and text after ``#`` are ignored, so an operator may note why a
node was revoked. ``meshnode swarm revoke DIR NODE_ID`` appends a line;
members re-read the file on SIGHUP and every ``RELOAD_INTERVAL`` seconds
(``meshnode.swarm.policy``), so the list reaches them by whatever copies the
swarm folder's files (the same way ``swarm.pub`` did).
"""

from __future__ import annotations

from pathlib import Path

from meshnode.errors import BadAddress, SwarmError
from meshnode.identity import NodeID, parse_node_id

REVOKED_FILE_NAME = "revoked"


def read_revoked(path: Path) -> frozenset[NodeID]:
    """The node ids listed in ``path`` (none when the file does not exist)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        raise SwarmError(f"{path}: unreadable revocation list: {exc}") from exc
    revoked = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            revoked.add(parse_node_id(entry.lower()))
        except BadAddress as exc:
            raise SwarmError(f"{path}:{number}: {exc}") from exc
    return frozenset(revoked)


def append_revoked(path: Path, node_id: NodeID, reason: str = "") -> None:
    """Add ``node_id`` to the list at ``path`` (created if missing)."""
    line = node_id.hex() + (f"  # {reason}" if reason else "") + "\n"
    with open(path, "a") as file:
        file.write(line)
