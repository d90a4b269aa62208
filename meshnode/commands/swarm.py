"""``meshnode swarm``: create a private swarm, admit nodes to it, revoke them.

    meshnode swarm create ~/swarm                 # writes swarm.key (secret) and swarm.pub
    meshnode swarm admit ~/swarm ~/.meshnode/w1 --days 30
    meshnode swarm revoke ~/swarm <node id or its data dir> [--reason TEXT]

``create`` prints the swarm id. ``admit`` writes a membership certificate for
the node whose key is in the data dir (creating the key if missing) and
prints its node id and expiry. ``revoke`` appends the node id to
``DIR/revoked``; members re-read it on SIGHUP and every few seconds
(``meshnode.swarm.policy``). Nodes join with ``--swarm DIR/swarm.pub``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from meshnode.errors import BadAddress, SwarmError
from meshnode.identity import Identity, parse_node_id
from meshnode.swarm.keys import PUBLIC_FILE_NAME, create_swarm, load_swarm_key, swarm_id
from meshnode.swarm.membership import DEFAULT_DAYS, issue_membership, write_membership
from meshnode.swarm.revocation import REVOKED_FILE_NAME, append_revoked

SECONDS_PER_DAY = 86400.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="swarm_command", required=True)
    create = sub.add_parser("create", help="write a new swarm key pair into DIR")
    create.add_argument("dir", type=Path, metavar="DIR")
    admit = sub.add_parser("admit", help="write a membership certificate into a node's data dir")
    admit.add_argument("dir", type=Path, metavar="DIR", help="the swarm folder (swarm.key)")
    admit.add_argument("node_dir", type=Path, metavar="NODE_DATA_DIR")
    admit.add_argument("--days", type=float, default=DEFAULT_DAYS,
                       help=f"days until the membership expires (default: {DEFAULT_DAYS})")
    revoke = sub.add_parser("revoke", help="add a node to DIR/revoked")
    revoke.add_argument("dir", type=Path, metavar="DIR")
    revoke.add_argument("node", metavar="NODE_ID|NODE_DATA_DIR")
    revoke.add_argument("--reason", default="", help="a note kept beside the id")


def run(args: argparse.Namespace) -> int:
    return {"create": _create, "admit": _admit, "revoke": _revoke}[args.swarm_command](args)


def _create(args: argparse.Namespace) -> int:
    key = create_swarm(args.dir)
    print(f"swarm {swarm_id(key.public_key())}")
    print(f"share {args.dir / PUBLIC_FILE_NAME} with members; keep "
          f"{args.dir / 'swarm.key'} secret")
    return 0


def _admit(args: argparse.Namespace) -> int:
    if not args.days > 0:
        raise SwarmError("--days must be positive")
    key = load_swarm_key(args.dir)
    identity = Identity.load_or_create(args.node_dir)
    now = time.time()
    certificate = issue_membership(key, identity.node_id, now, now + args.days * SECONDS_PER_DAY)
    path = write_membership(args.node_dir, certificate)
    expires = datetime.datetime.fromtimestamp(certificate.expires, datetime.UTC)
    print(f"admitted {identity.printable_id} to swarm {swarm_id(key.public_key())[:16]} "
          f"until {expires:%Y-%m-%d %H:%M} UTC ({path})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    node = Path(args.node)
    if node.is_dir():
        node_id = Identity.load_or_create(node).node_id
    else:
        try:
            node_id = parse_node_id(args.node.lower())
        except BadAddress as exc:
            raise SwarmError(f"not a node id nor a data dir: {args.node!r}") from exc
    append_revoked(args.dir / REVOKED_FILE_NAME, node_id, args.reason)
    print(f"revoked {node_id.hex()}; members drop it at their next reload (SIGHUP, or "
          f"within a few seconds)")
    return 0
