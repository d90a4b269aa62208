"""``BoundedRequest``: ``twisted.web`` requests whose body may not pass a size limit.

``twisted.web`` buffers a whole request body (in memory, or a temporary file
past 100 kB) before any resource sees it, whatever its size. ``meshnode
serve`` takes JSON bodies of a few kilobytes, so a body over ``max_body``
bytes is refused as soon as that is known: a ``Content-Length`` over the
limit at once, a chunked body when its running total passes it. The answer
is a 413 with an OpenAI error object (``BodyTooLarge``), written straight to
the connection, which is then closed: nothing past the limit is kept, and
no resource runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.server import Request

from meshnode.errors import BodyTooLarge
from meshnode.serve import schema

#: bodies larger than this are refused with 413 (a prompt of a whole context is far less)
DEFAULT_MAX_BODY = 1 << 20


class BoundedRequest(Request):
    """A ``Request`` that refuses a body over ``max_body`` bytes before buffering it."""

    max_body = DEFAULT_MAX_BODY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received = 0
        self._refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            super().gotLength(None)  # no temporary file sized by the peer's word
            self._refuse(f"the request body of {length} bytes is over this server's "
                         f"limit of {self.max_body} bytes")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse(f"the request body is over this server's limit of "
                         f"{self.max_body} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self, reason: str) -> None:
        self._refused = True
        body = json.dumps(schema.error_object(BodyTooLarge(reason))).encode("utf-8")
        head = (f"HTTP/1.1 413 Request Entity Too Large\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode("ascii")
        transport = self.channel.transport
        transport.write(head + body)
        transport.loseConnection()


def bounded_requests(max_body: int) -> Callable[..., BoundedRequest]:
    """A ``Site.requestFactory`` whose requests refuse bodies over ``max_body`` bytes."""
    if max_body < 1:
        raise ValueError("the body limit must be at least one byte")
    return type("BoundedRequest", (BoundedRequest,), {"max_body": max_body})
