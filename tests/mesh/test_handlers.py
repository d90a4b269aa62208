"""The worker's infer.* handlers with a fake compute: refusals are named errors per client."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from meshnode.errors import (
    BadRequest,
    BadTensor,
    LengthLimit,
    NoCapacity,
    SpanNotServed,
    UnknownSession,
)
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.message import Message, PeerInfo
from meshnode.worker.budget import CacheBudget
from meshnode.worker.handlers import InferenceHandlers, WorkerLimits
from meshnode.worker.sessions import SessionTable

H = 8
SPAN = BlockSpan(10, 20)
ALICE = PeerInfo(b"a" * 32, "127.0.0.1", 1)
BOB = PeerInfo(b"b" * 32, "127.0.0.1", 2)


class FakeCompute:
    """Adds the number of blocks to every position; the cache lists the positions seen."""

    hidden_size = H

    def __init__(self):
        self.fail_next = False

    def new_cache(self, span, max_length):
        return succeed([])

    def forward(self, span, hidden, start, cache):
        if self.fail_next:
            return fail(RuntimeError("device lost"))
        positions = list(range(start, start + hidden.shape[1]))
        return succeed((hidden + span.length, cache + positions))


def make_handlers(total_tokens: int = 100) -> InferenceHandlers:
    ids = (i.to_bytes(16, "big") for i in itertools.count(1))
    table = SessionTable(CacheBudget(total_tokens), Clock(), 60, new_id=lambda: next(ids))
    return InferenceHandlers(WorkerLimits("fp", SPAN, 64, "float32"), table, FakeCompute())


def result_of(d):
    out = []
    d = maybeDeferred(lambda: d)
    d.addBoth(out.append)
    (value,) = out
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


def open_session(h, peer=ALICE, span=SPAN, max_length=32) -> bytes:
    reply = result_of(h.open(peer, messages.build_open("fp", span, max_length)))
    assert reply.type == "infer.open.ok"
    return reply.fields["session"]


def step(h, session, start, tokens, peer=ALICE, span=SPAN, dtype=np.float32, size=H):
    hidden = np.ones((1, tokens, size), dtype=dtype)
    return result_of(h.step(peer, messages.build_step(session, span, start, hidden)))


def test_open_step_close():
    """When a client opens, steps twice and closes, then positions advance and tokens return."""
    h = make_handlers()
    sid = open_session(h)
    assert h.table.budget.free == 68
    reply = step(h, sid, 0, 5)
    assert reply.fields["position"] == 5
    np.testing.assert_array_equal(reply.tensors[0], np.full((1, 5, H), 11.0, np.float32))
    assert step(h, sid, 5, 1).fields["position"] == 6
    assert h.table.get(ALICE.node_id, sid).cache == list(range(6))
    result_of(h.close(ALICE, messages.build_close(sid)))
    assert h.table.budget.free == 100


def test_sub_span_session():
    """When a session covers part of the span, then only those blocks run."""
    h = make_handlers()
    sid = open_session(h, span=BlockSpan(15, 20))
    reply = step(h, sid, 0, 1, span=BlockSpan(15, 20))
    assert float(reply.tensors[0][0, 0, 0]) == 6.0


def test_unknown_and_closed_session():
    """When a step names an unknown, closed or another client's session, then UnknownSession."""
    h = make_handlers()
    sid = open_session(h)
    with pytest.raises(UnknownSession):
        step(h, b"x" * 16, 0, 1)
    with pytest.raises(UnknownSession):
        step(h, sid, 0, 1, peer=BOB)
    result_of(h.close(ALICE, messages.build_close(sid)))
    with pytest.raises(UnknownSession):
        step(h, sid, 0, 1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"size": H + 1}, BadTensor),
        ({"dtype": np.int32}, BadTensor),
        ({"span": BlockSpan(10, 15)}, BadRequest),
        ({"start": 3}, BadRequest),
        ({"tokens": 40}, LengthLimit),
    ],
)
def test_bad_steps_refused_session_survives(kwargs, error):
    """When a step is malformed, then it is refused and the session still serves a good step."""
    h = make_handlers()
    sid = open_session(h)
    args = {"start": 0, "tokens": 1} | kwargs
    with pytest.raises(error):
        step(h, sid, args.pop("start"), args.pop("tokens"), **args)
    assert step(h, sid, 0, 2).fields["position"] == 2


def test_half_precision_on_the_wire():
    """When hidden states travel as float16, then the answer comes back as float16."""
    h = make_handlers()
    sid = open_session(h)
    assert step(h, sid, 0, 1, dtype=np.float16).tensors[0].dtype == np.float16


def test_open_refusals():
    """When an open asks for unserved blocks, too long a session, another model or too much
    cache, then it gets SpanNotServed, LengthLimit, BadRequest, NoCapacity."""
    h = make_handlers(total_tokens=100)
    with pytest.raises(SpanNotServed):
        open_session(h, span=BlockSpan(5, 15))
    with pytest.raises(LengthLimit):
        open_session(h, max_length=65)
    with pytest.raises(BadRequest):
        result_of(h.open(ALICE, messages.build_open("other", SPAN, 8)))
    with pytest.raises(BadRequest):
        result_of(h.open(ALICE, Message("infer.open", {"v": 1, "model": "fp"})))
    open_session(h, max_length=64)
    with pytest.raises(NoCapacity):
        open_session(h, peer=BOB, max_length=64)
    assert open_session(h, peer=BOB, max_length=36)


def test_failed_forward_closes_session():
    """When the compute fails, then the client gets the error and the session is gone."""
    h = make_handlers()
    sid = open_session(h)
    h.compute.fail_next = True
    with pytest.raises(RuntimeError):
        step(h, sid, 0, 1)
    assert h.table.budget.free == 100
    with pytest.raises(UnknownSession):
        step(h, sid, 0, 1)


def test_info_reports_room():
    """When info is asked, then it reports the model, span, and free cache tokens."""
    h = make_handlers()
    open_session(h, max_length=30)
    fields = result_of(h.info(BOB, messages.build_info())).fields
    assert (fields["model"], fields["span"], fields["cache_tokens"]) == ("fp", [10, 20], 70)
    assert fields["hidden_size"] == H and fields["sessions"] == 1
