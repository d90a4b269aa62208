"""``EventStream``: server-sent events over one ``twisted.web`` request.

Each event is ``data: <json>\n\n``; the stream ends with ``data: [DONE]`` as
OpenAI's does. The status and headers go out with the first event, so a
request that fails before its first token still gets a plain error answer
(``started`` says whether they went). Writes after the client went away are
dropped; ``closed`` says whether it did, and ``on_close`` runs once when it
does (to cancel the work).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

DONE = b"data: [DONE]\n\n"


def event_bytes(payload: Any) -> bytes:
    """One event: the JSON of ``payload`` on a ``data:`` line."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStream:
    """Server-sent events on ``request``; headers are sent with the first event."""

    def __init__(self, request: Any, on_close: Callable[[], None] | None = None):
        self._request = request
        self._on_close = on_close
        self.closed = False
        self._finished = False
        self.started = False
        request.notifyFinish().addBoth(self._finished_or_lost)

    def send(self, payload: Any) -> None:
        if not self.closed:
            self._start()
            self._request.write(event_bytes(payload))

    def _start(self) -> None:
        if not self.started:
            self.started = True
            request = self._request
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-accel-buffering", b"no")
            # one small write a token: send each at once, not after the last one's ACK
            transport = getattr(getattr(request, "channel", None), "transport", None)
            if hasattr(transport, "setTcpNoDelay"):
                transport.setTcpNoDelay(True)

    def done(self) -> None:
        """``data: [DONE]`` and the end of the response."""
        if not self.closed:
            self._start()
            self._request.write(DONE)
            self._finished = True
            self._request.finish()

    def _finished_or_lost(self, outcome: Any) -> None:
        was_open = not self._finished
        self.closed = True
        if was_open and self._on_close is not None:
            self._on_close()
