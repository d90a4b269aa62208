"""A batching worker in-process (real model, real scheduler, no reactor) and greedy clients.

``HeldThread`` stands for the compute thread: calls wait until ``run_all()``, so
a test decides when an iteration runs and what has queued behind it. A
``GreedySession`` is one client generation driven through the worker's
handlers: open, prefill, then one decode step per token, the tokens chosen by
the head's argmax; it records every hidden state the worker returned.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.message import PeerInfo
from meshnode.worker.batching import BatchScheduler
from meshnode.worker.budget import CacheBudget
from meshnode.worker.compute import SpanCompute
from meshnode.worker.handlers import InferenceHandlers, WorkerLimits
from meshnode.worker.precompile import session_cache_length
from meshnode.worker.sessions import SessionTable


class HeldThread:
    """A compute thread whose calls run when the test says (``run_all``)."""

    def __init__(self):
        self.pending: list[tuple] = []

    def call(self, function, *args) -> Deferred:
        done = Deferred()
        self.pending.append((done, function, args))
        return done

    def run_all(self) -> int:
        """Run calls until none is left (one finishing may start the next); how many ran."""
        ran = 0
        while self.pending:
            done, function, args = self.pending.pop(0)
            maybeDeferred(function, *args).chainDeferred(done)
            ran += 1
        return ran


@dataclass
class Worker:
    handlers: InferenceHandlers
    table: SessionTable
    compute: SpanCompute
    scheduler: BatchScheduler
    thread: HeldThread
    clock: Clock


def make_worker(source, span: BlockSpan, cache_tokens: int = 8192, max_length: int = 512,
                compute_dtype=np.float32) -> Worker:
    """A batching worker over ``span`` of ``source`` with its blocks loaded."""
    thread, clock = HeldThread(), Clock()
    compute = SpanCompute(thread, source, span, compute_dtype)
    compute.load()
    compute.enable_batching(cache_tokens, max_length)
    thread.run_all()
    ids = (i.to_bytes(16, "big") for i in itertools.count(1))
    table = SessionTable(CacheBudget(cache_tokens), clock, 60, new_id=lambda: next(ids),
                         cache_positions=session_cache_length)
    scheduler = BatchScheduler(compute, on_cache_lost=table.close_all)
    limits = WorkerLimits("fp", span, max_length, "float32")
    handlers = InferenceHandlers(limits, table, compute, scheduler=scheduler)
    return Worker(handlers, table, compute, scheduler, thread, clock)


def settled(d: Deferred) -> list:
    """What ``d`` fired with, as a one-element list once it has (empty while it waits)."""
    out: list = []
    d.addBoth(out.append)
    return out


@dataclass
class GreedySession:
    """One greedy generation through a worker's handlers (all blocks of the model)."""

    peer: PeerInfo
    prompt: list[int]
    new_tokens: int
    span: BlockSpan
    session_id: bytes = b""
    position: int = 0
    tokens: list[int] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)
    error: object = None

    def open(self, worker: Worker, max_length: int = 256) -> None:
        (reply,) = settled(worker.handlers.open(self.peer, messages.build_open(
            "fp", self.span, max_length)))
        self.session_id = reply.fields["session"]

    @property
    def finished(self) -> bool:
        return self.error is not None or len(self.tokens) >= self.new_tokens

    def send(self, worker: Worker, head) -> list:
        """Send the next step (the prompt first, then the last token); returns its outcome
        holder (filled when the worker answers)."""
        ids = self.prompt if not self.tokens else self.tokens[-1:]
        hidden = np.asarray(head.embed([ids]))  # [1, T, H]
        message = messages.build_step(self.session_id, self.span, self.position, hidden)
        return settled(worker.handlers.step(self.peer, message))

    def receive(self, outcome: list, head) -> None:
        (reply,) = outcome
        if isinstance(reply, Failure):
            self.error = reply
            return
        out = np.asarray(reply.tensors[0])  # [1, T, H]
        self.hidden.append(out.copy())
        self.position = reply.fields["position"]
        self.tokens.append(int(np.argmax(np.asarray(head.logits(out))[0])))


def run_together(worker: Worker, head, sessions: list[GreedySession],
                 before_run=None) -> None:
    """Every session's next step sent, then the worker run, until all have finished."""
    while not all(s.finished for s in sessions):
        outcomes = [(s, s.send(worker, head)) for s in sessions if not s.finished]
        if before_run is not None:
            before_run(worker)
        worker.thread.run_all()
        for session, outcome in outcomes:
            session.receive(outcome, head)
