"""``ForwardingHandlers``: steps pushed worker to worker along a route (issue 11).

A forwarded step travels client -> A -> B -> C -> client:

- ``infer.open`` is answered as always, plus the session's push key
  (``meshnode.inference.capabilities.PushKeys``), with which its owner
  issues the capabilities of pushes into it.
- ``infer.step`` with ``forward`` (the rest of the route) reaches the first
  hop A from the session's owner. A runs its span as for any step, pushes its
  output into B's session (``infer.push``, with B's capability and the hops
  after B), and answers the client with its own output once B accepted the
  push or the push failed (``forward_error`` naming B, within ``push_timeout``).
- ``infer.push`` from A to B: B checks the capability
  (``meshnode.inference.capabilities``: made by the session's owner with the
  session's push key, for A as the TLS-verified sender and the session's
  position) and
  that the step fits the session, then accepts at once (``infer.push.ok``,
  before it runs). Anything else is refused with a named error and leaves the
  session as it was. B runs the step in the owner's compute turn, pushes on
  to C the same way, and holds its output (with how its push went) in the
  ``OutputMailbox``.
- ``infer.wait`` from the owner collects that output (B's, C's): the client
  gets every hop's output, what replay needs, off the critical path; C's
  answer is the chain's output.

A failure of a push is never the pusher's: its report names the next hop, and
the client bans and replaces that one. The step path itself is
``InferenceHandlers.run_step``: this module only adds the routing around it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshnode.errors import MeshError, RemoteError
from meshnode.inference import capabilities, messages
from meshnode.wire.message import Handler, Message, PeerInfo
from meshnode.worker.handlers import InferenceHandlers
from meshnode.worker.outputs import OutputMailbox

#: seconds a push may take to be accepted by the next hop (it answers before it computes);
#: well under a client's step timeout, so that a refusing, gone or frozen hop is named fast
DEFAULT_PUSH_TIMEOUT = 5.0

log = Logger()


class ForwardingHandlers:
    """``infer.step`` (with or without ``forward``), ``infer.push`` and ``infer.wait``."""

    def __init__(self, inference: InferenceHandlers, endpoint: Any, clock: Any,
                 push_timeout: float = DEFAULT_PUSH_TIMEOUT,
                 mailbox: OutputMailbox | None = None,
                 keys: capabilities.PushKeys | None = None):
        self.inference = inference
        self.keys = keys if keys is not None else capabilities.PushKeys()
        self.endpoint = endpoint
        self.push_timeout = push_timeout
        self.mailbox = mailbox if mailbox is not None else OutputMailbox(clock)
        self._running: set[Deferred] = set()

    def handlers(self) -> dict[str, Handler]:
        """The handlers to install over ``InferenceHandlers``' (``infer.step`` replaced)."""
        table = {messages.OPEN: self.open, messages.STEP: self.step, messages.PUSH: self.push,
                 messages.WAIT: self.wait}
        if self.inference.metrics is None:
            return table
        return {name: self.inference._counted(handler) for name, handler in table.items()}

    def open(self, peer: PeerInfo, message: Message) -> Deferred[Message]:
        """``InferenceHandlers.open``, its answer carrying the session's push key."""
        opened = self.inference.open(peer, message)

        def with_key(reply: Message) -> Message:
            session_id = messages.parse_session_id(reply.fields)
            return messages.build_open_ok(session_id, reply.fields["max_length"],
                                          self.keys.for_session(peer.node_id, session_id))

        return opened.addCallback(with_key)

    def step(self, peer: PeerInfo, message: Message) -> Deferred[Message]:
        """The owner's step; with ``forward``, answered once the push on is settled (without,
        ``InferenceHandlers.step`` as it is)."""
        if "forward" not in message.fields:
            return self.inference.step(peer, message)
        request = messages.parse_step(message, self.inference.compute.hidden_size)
        session = self.inference.table.get(peer.node_id, request.session_id)
        ran = self.inference.run_step(peer, session, request)
        ran.addCallback(self._push_on, request)
        return ran.addCallback(lambda done: messages.build_step_ok(*done))

    def push(self, peer: PeerInfo, message: Message) -> Message:
        """A hop's output into our session: checked, accepted, then run in the background."""
        request = messages.parse_push(message, self.inference.compute.hidden_size)
        step = request.step
        owner = self.keys.check(request.capability, step.session_id, peer.node_id, step.start)
        session = self.inference.table.get(owner, step.session_id)
        turn = PeerInfo(session.owner, peer.host, peer.port)  # the owner's compute turn
        ran = self.inference.run_step(turn, session, step)  # raises at once if it does not fit
        self.mailbox.reserve(step.session_id, step.start)
        ran.addCallback(self._push_on, step)
        ran.addCallback(lambda done: messages.build_wait_ok(*done))
        ran.addBoth(self._deliver, step.session_id, step.start)
        self._keep(ran)
        return messages.build_push_ok(step.start + step.hidden.shape[1])

    def wait(self, peer: PeerInfo, message: Message) -> Deferred[Message]:
        """The owner collects a pushed step's output (it may come before or after)."""
        request = messages.parse_wait(message)
        session = self.inference.table.get(peer.node_id, request.session_id)
        return self.mailbox.wait(request.session_id, request.start, session.position)

    def stop(self) -> None:
        """Fail every wait and drop every held output (the worker is stopping)."""
        self.mailbox.close()

    # -- internals ---------------------------------------------------------

    def _push_on(self, done: tuple[int, Any], step: messages.StepRequest) -> Any:
        """Push our output to ``step.forward[0]``: (position, output, error), or a Deferred
        of it (error: how the push failed, None when accepted or when there is no next hop)."""
        position, hidden = done
        if not step.forward:
            return position, hidden, None
        hop, later = step.forward[0], step.forward[1:]
        pushed = self.endpoint.request(hop.address, messages.build_push(hop, step.start, hidden,
                                                                       later),
                                       timeout=self.push_timeout)
        return pushed.addCallbacks(lambda _: (position, hidden, None),
                                   lambda failure: (position, hidden, _report(hop, failure)))

    def _deliver(self, outcome: Any, session_id: bytes, start: int) -> None:
        self.mailbox.deliver(session_id, start, outcome)

    def _keep(self, running: Deferred) -> None:
        self._running.add(running)
        running.addBoth(lambda _: self._running.discard(running))


def _report(hop: messages.ForwardHop, failure: Failure) -> dict:
    """What the client is told when the push to ``hop`` failed: that hop, and why."""
    error = failure.value
    if isinstance(error, RemoteError):
        code, text = error.code, error.message
    elif isinstance(error, MeshError):
        code, text = error.code, str(error) or type(error).__name__
    else:
        code, text = "internal", str(error) or type(error).__name__
    log.info("push to {hop} failed: {code}: {text}", hop=str(hop.address), code=code, text=text)
    return messages.forward_error(hop.address.node_id, str(hop.address), code, text)
