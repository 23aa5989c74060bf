"""A cap on request bodies (413), checked before any of the body is parsed, so a huge upload costs the server
nothing but the bytes it reads until the cap."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pbs_engine.server.errors import APIError

DEFAULT_MAX_REQUEST_BYTES = 32 << 20  # a 1M-token prompt is ~4 MB of text or ~8 MB of token ids as JSON


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (--max-request-bytes)",
                    code="request_too_large")


class BodyLimit:
    """ASGI middleware: a declared Content-Length over `max_bytes` is refused at once; a chunked body is counted
    as it arrives and refused when it passes the cap."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(self.max_bytes).response()(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)  # the app's APIError handler answers it
            return message

        await self.app(scope, counted, send)
