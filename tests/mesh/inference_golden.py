"""Golden encodings of schemas/inference.cddl, produced by meshnode.inference.messages.

``tests/test_schemas.py`` checks that these bytes equal ``schemas/golden/inference/``
(see ``schemas/README.md``); ``MESHNODE_WRITE_GOLDEN=1`` rewrites the files.
"""

from __future__ import annotations

import cbor2
import numpy as np

from meshnode.inference import messages
from meshnode.inference.records import BlockSpan, ServerInfo, WorkerState

SESSION = bytes(range(16))
NODE = "127.0.0.1:7001#" + "ab" * 32
NEXT = "127.0.0.1:7002#" + "cd" * 32
#: a capability's shape (fixed bytes: the golden files pin the encoding, not a tag's value)
CAPABILITY = {"owner": b"\xef" * 32, "tag": bytes(range(32))}


def _next_hop(session: bytes = SESSION):
    from meshnode.identity import PeerAddress

    return messages.ForwardHop(PeerAddress.parse(NEXT), session, BlockSpan(20, 30), CAPABILITY)


def _fields(message) -> bytes:
    return cbor2.dumps(message.fields, canonical=True)


def golden_examples() -> dict[str, bytes]:
    """``"<rule>.<example>"`` -> the exact bytes our builders produce."""
    hidden = np.zeros((1, 1, 8), np.float32)
    info = ServerInfo(NODE, BlockSpan(10, 20), WorkerState.ONLINE, 42.5, 8192, "float32", "fp")
    return {
        "server-info.online": cbor2.dumps(info.to_record(), canonical=True),
        "server-info.loaded": cbor2.dumps(
            ServerInfo(
                NODE, BlockSpan(10, 20), WorkerState.ONLINE, 42.5, 8192, "float32", "fp",
                max_length=2048, peer_rtts=((bytes(range(8)), 0.0125),), batch_load=3,
                batch_throughput=((1, 42.5), (4, 150.0), (16, 400.0)),
            ).to_record(),
            canonical=True,
        ),
        "infer-info.basic": _fields(messages.build_info()),
        "infer-info-ok.basic": _fields(
            messages.build_info_ok(
                {
                    "model": "fp",
                    "span": [10, 20],
                    "hidden_size": 576,
                    "dtype": "float32",
                    "max_length": 2048,
                    "cache_tokens": 8000,
                    "throughput": 42.5,
                    "sessions": 1,
                }
            )
        ),
        "infer-open.basic": _fields(messages.build_open("fp", BlockSpan(10, 20), 96)),
        "infer-open-ok.basic": _fields(messages.build_open_ok(SESSION, 96)),
        "infer-open-ok.push-key": _fields(messages.build_open_ok(SESSION, 96, bytes(range(32)))),
        "infer-step.decode": _fields(messages.build_step(SESSION, BlockSpan(10, 20), 12, hidden)),
        "infer-step-ok.decode": _fields(messages.build_step_ok(13, hidden)),
        "infer-step.forwarded": _fields(
            messages.build_step(SESSION, BlockSpan(10, 20), 12, hidden, (_next_hop(),))),
        "infer-step-ok.forward-failed": _fields(messages.build_step_ok(
            13, hidden, messages.forward_error(b"\xcd" * 32, NEXT, "connection_closed",
                                               "cannot connect"))),
        "infer-push.last": _fields(messages.build_push(_next_hop(), 12, hidden)),
        "infer-push.middle": _fields(
            messages.build_push(_next_hop(), 12, hidden, (_next_hop(bytes(16)),))),
        "infer-push-ok.basic": _fields(messages.build_push_ok(13)),
        "infer-wait.basic": _fields(messages.build_wait(SESSION, 12)),
        "infer-wait-ok.basic": _fields(messages.build_wait_ok(13, hidden)),
        "infer-close.basic": _fields(messages.build_close(SESSION)),
        "infer-close-ok.basic": _fields(messages.build_close_ok()),
    }


def invalid_examples() -> dict[str, bytes]:
    """Encodings each rule must refuse."""
    step = {"v": 1, "session": SESSION, "span": [10, 20], "start": 0}
    record = ServerInfo(
        NODE, BlockSpan(0, 1), WorkerState.ONLINE, 1.0, 1, "float32", "fp"
    ).to_record()
    return {
        "infer-step.short-session": cbor2.dumps({**step, "session": b"12"}),
        "infer-step.negative-start": cbor2.dumps({**step, "start": -1}),
        "infer-push.no-capability": cbor2.dumps(step),
        "infer-push.short-tag": cbor2.dumps(
            {**step, "cap": {"owner": bytes(32), "tag": bytes(8)}}),
        "infer-wait.no-start": cbor2.dumps({"v": 1, "session": SESSION}),
        "infer-open.no-max-length": cbor2.dumps({"v": 1, "model": "fp", "span": [0, 1]}),
        "server-info.bad-state": cbor2.dumps({**record, "state": "asleep"}),
        "server-info.bad-version": cbor2.dumps({**record, "v": 2}),
        "server-info.negative-load": cbor2.dumps({**record, "load": -1}),
        "server-info.batch-point-text": cbor2.dumps({**record, "batch_throughput": [["1", 2.0]]}),
    }
