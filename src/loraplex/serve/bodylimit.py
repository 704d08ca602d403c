"""A cap on request bodies, applied before FastAPI reads or parses them (parsing runs on the event loop).

A body over `limit` bytes, by its Content-Length or counted as it streams in (chunked, no length), is
answered 413 (RequestTooLargeError, through serve/errors.py) without being parsed, so one huge JSON body
(millions of token ids, say) never stalls the other requests. Routes with their own, larger limit (adapter
uploads) are exempt and check it themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from ..errors import RequestTooLargeError
from .errors import error_response

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_REQUEST_BYTES = 16 << 20  # a JSON body: hundreds of max-length prompts fit; parsing it takes well under 1 s


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes (413) except on `exempt` paths."""

    def __init__(self, app: Callable, *, limit: int = MAX_REQUEST_BYTES, exempt: Collection[str] = (),
                 on_refused: Callable[[int, str | None], None] | None = None) -> None:
        self.app, self.limit, self.exempt, self.on_refused = app, limit, frozenset(exempt), on_refused

    async def _refuse(self, got: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(RequestTooLargeError(
            f"request body of {got} bytes is over this server's limit of {self.limit} bytes; send fewer or "
            "shorter prompts per request"))
        if self.on_refused is not None:
            self.on_refused(response.status_code, "request_too_large")
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(declared.decode(), scope, receive, send)
            return
        chunks, seen = [], 0  # a body without (or lying about) its length is counted as it arrives
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                await self._refuse(f"more than {seen}", scope, receive, send)
                return
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:  # the buffered body once, then the real channel (disconnects)
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await self.app(scope, replay, send)
