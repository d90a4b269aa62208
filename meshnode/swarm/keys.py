"""The swarm key pair on disk, and the swarm id.

``meshnode swarm create DIR`` writes ``DIR/swarm.key`` (the Ed25519 private
key, PEM PKCS#8, mode 0600: whoever holds it admits members) and
``DIR/swarm.pub`` (the public key, PEM SubjectPublicKeyInfo: every member
gets a copy, it is what ``--swarm`` names). The swarm id is the SHA-256 of the
public key's SubjectPublicKeyInfo DER, as a node id is of a node key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from meshnode.errors import SwarmError
from meshnode.identity import node_id_of_key

SECRET_FILE_NAME = "swarm.key"
PUBLIC_FILE_NAME = "swarm.pub"
SECRET_FILE_MODE = 0o600


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (as membership certificates name it)."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def swarm_id(public_key: Ed25519PublicKey) -> str:
    """The swarm id, lowercase hex: SHA-256 of the public key's SubjectPublicKeyInfo DER."""
    return node_id_of_key(public_key).hex()


def create_swarm(folder: Path) -> Ed25519PrivateKey:
    """Write a new swarm key pair into ``folder``; ``SwarmError`` if one is there already."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / SECRET_FILE_NAME
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    except FileExistsError:
        raise SwarmError(f"{secret} exists already: a swarm lives in {folder}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    os.chmod(secret, SECRET_FILE_MODE)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / PUBLIC_FILE_NAME).write_bytes(public)
    return key


def load_swarm_key(folder: Path) -> Ed25519PrivateKey:
    """The swarm's private key from ``folder/swarm.key``; ``SwarmError`` if absent or bad."""
    path = Path(folder) / SECRET_FILE_NAME
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SwarmError(f"{path}: no swarm key ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise SwarmError(f"{path}: unreadable swarm key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SwarmError(f"{path}: swarm key is {type(key).__name__}, not Ed25519")
    return key


def load_swarm_public_key(path: Path) -> Ed25519PublicKey:
    """A swarm's public key from a ``swarm.pub`` file (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / PUBLIC_FILE_NAME
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise SwarmError(f"{path}: no swarm public key ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise SwarmError(f"{path}: unreadable swarm public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SwarmError(f"{path}: swarm public key is {type(key).__name__}, not Ed25519")
    return key
