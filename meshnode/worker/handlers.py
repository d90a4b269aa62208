"""``InferenceHandlers``: the worker's answers to ``infer.info/open/step/close``.

Handlers decide; the Endpoint frames and dispatches. Every refusal is a named
``MeshError`` that becomes an error frame to that client only: a bad request
never stops the worker serving everyone else. The model work goes to the
compute object (``SpanCompute`` or a fake in tests): anything with
``hidden_size``, ``new_cache(span, max_length)`` and
``forward(span, hidden, start, cache)`` returning Deferreds.

With a ``scheduler`` (``meshnode.worker.batching.BatchScheduler``, the
worker's), a step's compute is not a turn of its own: it joins the next
batched iteration, and its cache is the session's pages of the shared arena.

Opens go through an ``OpenAdmission`` when one is given (the worker's): an
open that does not fit waits briefly for reclaimed room instead of failing
at once (``meshnode.worker.admission``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from meshnode.errors import BadRequest, LengthLimit, MeshError, SpanNotServed
from meshnode.inference import messages
from meshnode.inference.records import BlockSpan
from meshnode.wire.message import Handler, Message, PeerInfo
from meshnode.worker.sessions import Session, SessionTable


@dataclass(frozen=True)
class WorkerLimits:
    """What this worker serves and the longest session it accepts."""

    model: str
    span: BlockSpan
    max_length: int
    dtype: str


class InferenceHandlers:
    """The ``infer.*`` handlers of one worker."""

    def __init__(
        self,
        limits: WorkerLimits,
        table: SessionTable,
        compute: Any,
        throughput: Callable[[], float] = lambda: 0.0,
        queue: Any = None,
        admission: Any = None,
        metrics: Any = None,
        scheduler: Any = None,
    ):
        self.limits = limits
        # ``meshnode.worker.admission.OpenAdmission``, or None: a full budget refuses at once
        self.admission = admission
        self.table = table
        self.compute = compute
        self._throughput = throughput
        # ``meshnode.worker.fairness.FairQueue``: compute turns round-robin across peers
        self.queue = queue
        # ``meshnode.worker.metrics.WorkerMetrics`` (None: not counted)
        self.metrics = metrics
        # ``meshnode.worker.batching.BatchScheduler``: steps join batched iterations
        self.scheduler = scheduler

    def handlers(self) -> dict[str, Handler]:
        table = {
            messages.INFO: self.info,
            messages.OPEN: self.open,
            messages.STEP: self.step,
            messages.CLOSE: self.close,
        }
        if self.metrics is None:
            return table
        return {name: self._counted(handler) for name, handler in table.items()}

    def _counted(self, handler: Handler) -> Handler:
        """``handler``, with every refusal counted by its error code."""

        def counted(peer: PeerInfo, message: Message) -> Any:
            try:
                result = handler(peer, message)
            except MeshError as exc:
                self.metrics.failed(exc)
                raise
            if isinstance(result, Deferred):
                result.addErrback(self._count_failure)
            return result

        return counted

    def _count_failure(self, failure: Any) -> Any:
        self.metrics.failed(failure.value)
        return failure

    def info(self, peer: PeerInfo, message: Message) -> Message:
        return messages.build_info_ok(
            {
                "model": self.limits.model,
                "span": self.limits.span.to_wire(),
                "hidden_size": self.compute.hidden_size,
                "dtype": self.limits.dtype,
                "max_length": self.limits.max_length,
                "cache_tokens": self.table.budget.free,
                "throughput": float(self._throughput()),
                "sessions": len(self.table),
            },
        )

    def open(self, peer: PeerInfo, message: Message) -> Deferred[Message]:
        request = messages.parse_open(message)
        self._check_open(request)
        if self.admission is None:
            return self._allocate(peer, request,
                                  self.table.open(peer.node_id, request.span, request.max_length))
        admitted = self.admission.open(peer.node_id, request.span, request.max_length)
        return admitted.addCallback(lambda session: self._allocate(peer, request, session))

    def _allocate(self, peer: PeerInfo, request: messages.OpenRequest,
                  session: Session) -> Deferred[Message]:
        self.table.begin_step(session)  # no step, close or timeout before the cache exists
        allocated = self._compute(
            peer, lambda: self.compute.new_cache(request.span, request.max_length))

        def opened(cache: Any) -> Message:
            self.table.end_step(session, cache, 0)
            return messages.build_open_ok(session.session_id, session.max_length)

        def failed(failure: Any) -> Any:
            session.closed = True
            self.table.end_step(session, None, 0)
            return failure

        return allocated.addCallbacks(opened, failed)

    def step(self, peer: PeerInfo, message: Message) -> Deferred[Message]:
        request = messages.parse_step(message, self.compute.hidden_size)
        session = self.table.get(peer.node_id, request.session_id)
        done = self.run_step(peer, session, request)
        return done.addCallback(lambda result: messages.build_step_ok(*result))

    def run_step(self, peer: PeerInfo, session: Session,
                 request: messages.StepRequest) -> Deferred[tuple[int, Any]]:
        """The step path, for ``step`` and forwarded pushes (``meshnode.worker.forwarding``):
        checks the step fits ``session`` (raises at once if not), runs it in ``peer``'s compute
        turn; fires with (new position, output)."""
        length = request.hidden.shape[1]
        session.check_step(request.span, request.start, length)
        self.table.begin_step(session)
        done = self._schedule(peer, session, request)
        return done.addCallbacks(
            lambda result: self._stepped(session, result, request.start + length),
            lambda failure: self._step_failed(session, failure),
        )

    def _schedule(self, peer: PeerInfo, session: Session,
                  request: messages.StepRequest) -> Deferred[tuple[Any, Any]]:
        """The step's compute: a turn of the fair queue, or rows of a batched iteration
        (the session's pages stay its cache); fires with (hidden, cache)."""
        if self.scheduler is None:
            return self._compute(peer, lambda: self.compute.forward(
                session.span, request.hidden, request.start, session.cache))
        done = self.scheduler.submit(peer.node_id, session, request.hidden, request.start,
                                     on_start=self._waited() if self.metrics else None)
        return done.addCallback(lambda hidden: (hidden, session.cache))

    def _waited(self) -> Callable[[], None]:
        """A callable recording how long since now a step waited for its compute turn."""
        arrived = time.perf_counter()
        return lambda: self.metrics.queue_wait.observe(time.perf_counter() - arrived)

    def close(self, peer: PeerInfo, message: Message) -> Message:
        self.table.close(peer.node_id, messages.parse_close(message))
        return messages.build_close_ok()

    def _compute(self, peer: PeerInfo, work: Callable[[], Any]) -> Deferred[Any]:
        if self.metrics is not None:
            work = self._timed(work)
        if self.queue is None:
            return maybeDeferred(work)
        return self.queue.submit(peer.node_id, work)

    def _timed(self, work: Callable[[], Any]) -> Callable[[], Any]:
        """``work``, recording how long it waited for its compute turn."""
        arrived = time.perf_counter()

        def timed() -> Any:
            self.metrics.queue_wait.observe(time.perf_counter() - arrived)
            return work()

        return timed

    def _check_open(self, request: messages.OpenRequest) -> None:
        if request.model != self.limits.model:
            raise BadRequest(
                f"this worker serves model {self.limits.model}, not {request.model}"
            )
        if not self.limits.span.contains(request.span):
            raise SpanNotServed(
                f"blocks {request.span} asked, this worker serves {self.limits.span}"
            )
        if request.max_length > self.limits.max_length:
            raise LengthLimit(
                f"max_length {request.max_length} is over this worker's limit "
                f"{self.limits.max_length}"
            )

    def _stepped(self, session: Session, result: tuple[Any, Any],
                 position: int) -> tuple[int, Any]:
        hidden, cache = result
        self.table.end_step(session, cache, position)
        return position, hidden

    def _step_failed(self, session: Session, failure: Any) -> Any:
        # The donated cache may be gone: the session cannot go on. Pages of the shared
        # cache stay with it until the table frees it, which gives them back.
        session.closed = True
        cache = session.cache if self.scheduler is not None else None
        self.table.end_step(session, cache, session.position)
        return failure
