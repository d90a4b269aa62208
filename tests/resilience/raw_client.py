"""A blocking TLS 1.3 client with a valid meshnode certificate that writes raw bytes.

It speaks no protocol: hostile-input tests give it any bytes, then read back
whatever frames the node answers with (parsed leniently) until the node
closes, an answer to a given request id arrives, or a quiet period passes.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization

from meshnode.identity import Identity, PeerAddress

_PREFIX = struct.Struct(">II")


@dataclass
class Outcome:
    """What a node did after our bytes: frames it sent (decoded headers), and whether it
    closed the connection or went quiet."""

    headers: list[Any] = field(default_factory=list)
    closed: bool = False
    quiet: bool = False

    def answer_to(self, request_id: int) -> Any:
        return next(
            (h for h in self.headers if isinstance(h, dict) and h.get("id") == request_id), None
        )


def tls_context(identity: Identity, folder: Path) -> ssl.SSLContext:
    """A client context presenting ``identity``'s self-signed certificate (TLS 1.3 only)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    key.write_bytes(
        identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(identity.certificate.public_bytes(serialization.Encoding.PEM))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we attack the node; we need not trust it
    context.load_cert_chain(cert, key)
    return context


def exchange(
    context: ssl.SSLContext,
    address: PeerAddress,
    data: bytes,
    answer_id: int | None = None,
    quiet_after: float = 0.3,
    answer_timeout: float = 15.0,
) -> Outcome:
    """Connect, write ``data``, read frames back; see the module docstring."""
    with (
        socket.create_connection((address.host, address.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(data)
        return _read(tls, answer_id, quiet_after if answer_id is None else answer_timeout)


def _read(tls: ssl.SSLSocket, answer_id: int | None, timeout: float) -> Outcome:
    outcome, buffer = Outcome(), b""
    tls.settimeout(timeout)
    while True:
        try:
            chunk = tls.recv(1 << 16)
        except TimeoutError:
            outcome.quiet = True
            return outcome
        except (ssl.SSLError, ConnectionError, OSError):
            outcome.closed = True
            return outcome
        if not chunk:
            outcome.closed = True
            return outcome
        buffer += chunk
        buffer = _frames(buffer, outcome)
        if answer_id is not None and outcome.answer_to(answer_id) is not None:
            return outcome


def _frames(buffer: bytes, outcome: Outcome) -> bytes:
    """Decode every whole frame at the start of ``buffer``; returns the rest."""
    while len(buffer) >= _PREFIX.size:
        header_length, body_length = _PREFIX.unpack_from(buffer)
        end = _PREFIX.size + header_length + body_length
        if len(buffer) < end:
            break
        header = buffer[_PREFIX.size : _PREFIX.size + header_length]
        outcome.headers.append(cbor2.loads(header))
        buffer = buffer[end:]
    return buffer


def frame(header: Any, body: bytes = b"") -> bytes:
    """One frame of any CBOR-able ``header`` and raw ``body``."""
    encoded = cbor2.dumps(header)
    return _PREFIX.pack(len(encoded), len(body)) + encoded + body
