"""Options shared by several subcommands: argparse types and the common flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from meshnode.errors import MeshError
from meshnode.identity import PeerAddress
from meshnode.model.names import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL"]

T = TypeVar("T")


def parsed_by(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises MeshError on bad text."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except MeshError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = getattr(parse, "__qualname__", "value")
    return convert


peer_address = parsed_by(PeerAddress.parse)


def _announce_address(text: str) -> PeerAddress:
    address = PeerAddress.parse(text)
    if address.node_id is not None:
        raise MeshError("--announce-address takes HOST:PORT (the node id is added to it)")
    return address


announce_address = parsed_by(_announce_address)


def add_bootstrap_option(parser: argparse.ArgumentParser, help: str = "") -> None:
    """``--bootstrap H:P[#ID]``, repeatable, parsed into PeerAddress values."""
    parser.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        type=peer_address,
        metavar="H:P[#ID]",
        help=help or "a DHT node to join (repeatable); #ID pins its node id",
    )


def add_model_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--model SPEC``: smollm2, a .gguf file or a checkpoint folder."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="SPEC", help=f"{help} (default: {DEFAULT_MODEL})"
    )


def add_listen_options(parser: argparse.ArgumentParser, data_dir_help: str) -> None:
    """``--host``, ``--port``, ``--announce-address`` and ``--data-dir`` of a node that
    listens."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (default: ephemeral)")
    parser.add_argument(
        "--announce-address",
        type=announce_address,
        default=None,
        metavar="HOST:PORT",
        help="where peers reach this node, when not where it listens (NAT port forwarding, "
        "a relay, a container): announced to the DHT, pinned with the node id, and written "
        "to the address file; the node still listens on --host/--port",
    )
    parser.add_argument("--data-dir", type=Path, metavar="D", help=data_dir_help)


def add_swarm_option(parser: argparse.ArgumentParser) -> None:
    """``--swarm SWARM_PUB``: join the private swarm of that public key (file or folder)."""
    parser.add_argument(
        "--swarm",
        type=Path,
        default=None,
        metavar="SWARM_PUB",
        help="belong to the private swarm of this swarm.pub: talk only to its members "
        "(needs a membership certificate in --data-dir: meshnode swarm admit)",
    )


def add_client_identity_options(parser: argparse.ArgumentParser) -> None:
    """``--swarm`` and ``--data-dir`` of a client command (its key and membership)."""
    add_swarm_option(parser)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="D",
        help="this client's node key and membership certificate (default: a new "
        "key kept in memory; a --swarm client needs one)",
    )


def add_verify_option(parser: argparse.ArgumentParser, default: float) -> None:
    """``--verify-rate R``: the fraction of steps recomputed on a second replica."""
    parser.add_argument(
        "--verify-rate",
        type=float,
        default=default,
        metavar="R",
        help="fraction of steps whose span outputs are recomputed on a second replica and "
        "compared (1.0: every step, before its token; 0: none; every verified generation "
        f"ends with a check) (default: {default:g})",
    )
