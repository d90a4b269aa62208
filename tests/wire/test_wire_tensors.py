"""Received tensors reach JAX without a copy, and stay valid after later frames."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from meshnode.wire.codec import encode_message
from meshnode.wire.message import Message
from meshnode.wire.tensors import as_jax
from tests.wire.wire_helpers import MemoryConnection


def send_request(connection: MemoryConnection, tensors: tuple, request_id: int = 1) -> None:
    parts = encode_message("request", request_id, Message("keep", {}, tensors))
    connection.feed(b"".join(bytes(p) for p in parts))


def test_received_float32_tensor_becomes_jax_array_over_receive_buffer():
    """When a float32 tensor is received, then as_jax shares memory with the receive buffer."""
    seen = []

    def keep(peer, message):
        seen.append(message.tensors[0])
        return Message("keep")

    connection = MemoryConnection({"keep": keep})
    send_request(connection, (np.arange(64, dtype=np.float32).reshape(8, 8),))
    received = seen[0]
    array = as_jax(received)
    assert received.ctypes.data % 64 == 0
    assert array.unsafe_buffer_pointer() == received.ctypes.data
    assert float(array[7, 7]) == 63.0


def test_received_bfloat16_tensor_is_zero_copy_too():
    """When a bfloat16 tensor is received, then as_jax (device_put) does not copy it."""
    seen = []
    connection = MemoryConnection({"keep": lambda p, m: seen.append(m.tensors[0]) or Message("k")})
    send_request(connection, (np.ones((4, 16), dtype=ml_dtypes.bfloat16),))
    assert as_jax(seen[0]).unsafe_buffer_pointer() == seen[0].ctypes.data


def test_kept_tensor_survives_the_next_frame():
    """When a handler keeps a tensor, then later frames do not overwrite it."""
    seen = []
    connection = MemoryConnection({"keep": lambda p, m: seen.append(m.tensors[0]) or Message("k")})
    send_request(connection, (np.full(256, 1.0, np.float32),), 1)
    send_request(connection, (np.full(256, 2.0, np.float32),), 2)
    assert float(seen[0].sum()) == 256.0 and float(seen[1].sum()) == 512.0
