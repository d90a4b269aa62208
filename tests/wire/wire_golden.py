"""Golden encodings of schemas/wire.cddl, produced by the wire's own encoder.

``tests/test_schemas.py`` checks that these bytes equal ``schemas/golden/wire/``
(see ``schemas/README.md``); ``MESHNODE_WRITE_GOLDEN=1`` rewrites the files.
"""

from __future__ import annotations

import cbor2
import ml_dtypes
import numpy as np

from meshnode.wire.bundle import encode_bundle
from meshnode.wire.codec import encode_error, encode_message
from meshnode.wire.message import Message
from meshnode.wire.tensors import layout_tensors


def _header_of(parts: list) -> bytes:
    return bytes(parts[1])  # parts: prefix, header, body...


def golden_examples() -> dict[str, bytes]:
    """``"<rule>.<example>"`` -> the exact bytes our encoder produces."""
    step = Message(
        "infer.step",
        {"session": bytes(range(16)), "position": 12},
        (np.zeros((1, 1, 8), ml_dtypes.bfloat16), np.array([5, 6], np.int32)),
    )
    descriptors, _, _ = layout_tensors((np.zeros((2, 3), np.float32),))
    return {
        "frame-header.request": _header_of(encode_message("request", 7, step)),
        "frame-header.response": _header_of(
            encode_message("response", 8, Message("dht.ping", {"node_id": bytes(32)}))
        ),
        "error-frame.unknown-message": _header_of(
            encode_error(9, "nope", "unknown_message", "no handler for message type 'nope'")
        ),
        "error-frame.connection": _header_of(
            encode_error(0, "", "frame_too_large", "frame announces header 16 / body 2147483648")
        ),
        "tensor-descriptor.float32": cbor2.dumps(descriptors[0].to_cbor(), canonical=True),
        "error-frame.no-capacity-retry": _header_of(
            encode_error(10, "infer.open", "no_capacity",
                         "2048 cache tokens asked, 0 of 4096 free; retry after 4.5 s", 4.5)
        ),
        "bundle-header.two-frames": _header_of(encode_bundle([
            encode_message("request", 11, step),
            encode_message("response", 12, Message("dht.ping", {"node_id": bytes(32)})),
        ])),
        "error-frame.not-a-member": _header_of(
            encode_error(0, "", "not_a_member", "this node belongs to private swarm "
                         "0123456789abcdef; present a membership certificate")
        ),
    }


def invalid_examples() -> dict[str, bytes]:
    """Encodings each rule must refuse."""
    header = {"v": 1, "type": "x", "id": 1, "kind": "request"}
    return {
        "frame-header.bad-version": cbor2.dumps({**header, "v": 2}),
        "frame-header.negative-id": cbor2.dumps({**header, "id": -1}),
        "frame-header.bad-kind": cbor2.dumps({**header, "kind": "push"}),
        "error-frame.no-code": cbor2.dumps({**header, "kind": "error", "fields": {"message": "m"}}),
        "bundle-header.empty": cbor2.dumps(
            {"v": 1, "type": "wire.bundle", "id": 0, "kind": "bundle", "fields": {"frames": []}}
        ),
        "tensor-descriptor.unknown-dtype": cbor2.dumps(
            {"dtype": "complex64", "shape": [1], "offset": 0, "nbytes": 8}
        ),
    }
