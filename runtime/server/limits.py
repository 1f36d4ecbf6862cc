"""Request-body limits for the /v1 API (an ASGI middleware in front of FastAPI).

A body over `max_body_bytes` is answered 413 before it is parsed: at once when `Content-Length` says so, else
as soon as the streamed (chunked) body passes the limit. A body that does not arrive within
`BODY_READ_TIMEOUT_S` is answered 408, so a slow or stalled client never holds a handler. The body is read
here and replayed to the app; later `receive()` calls (disconnect detection) go to the client as usual.
"""

from __future__ import annotations

from typing import Any

import anyio

BODY_READ_TIMEOUT_S = 30.0


def too_large_message(limit: int, size: int | None) -> str:
    got = f"{size} bytes" if size is not None else "more than that (chunked body)"
    return (f"request body too large: {got}; the limit is {limit} bytes (max_body_bytes; "
            f"set --max-body-bytes to change it)")


class BodyLimitMiddleware:
    """413 above `max_body_bytes()`, 408 when the body stalls, 400 for a malformed Content-Length."""

    def __init__(self, app: Any, max_body_bytes: Any, on_error: Any, timeout_s: Any = lambda: BODY_READ_TIMEOUT_S,
                 *, applies_to: Any):
        self.app = app
        self.applies_to = applies_to  # path -> bool: the routes whose bodies are limited
        self.max_body_bytes = max_body_bytes  # callable -> int (read per request, so tests may change it)
        self.on_error = on_error  # (status, message, type, param, headers) -> ASGI response
        self.timeout_s = timeout_s  # callable -> seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.applies_to(scope["path"]) or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        limit = int(self.max_body_bytes())
        close = {"Connection": "close"}
        cl = dict(scope.get("headers") or []).get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
                if n < 0:
                    raise ValueError
            except ValueError:
                await self.on_error(400, f"malformed Content-Length header {cl[:40]!r}", "invalid_request_error",
                                    None, close)(scope, receive, send)
                return
            if n > limit:
                await self.on_error(413, too_large_message(limit, n), "invalid_request_error", None,
                                    close)(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        timeout = float(self.timeout_s())
        with anyio.move_on_after(timeout) as timer:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return  # the client left before sending its body: nothing to answer
                body = msg.get("body", b"")
                size += len(body)
                if size > limit:
                    await self.on_error(413, too_large_message(limit, None if cl is None else size),
                                        "invalid_request_error", None, close)(scope, receive, send)
                    return
                chunks.append(body)
                if not msg.get("more_body", False):
                    break
        if timer.cancelled_caught:
            await self.on_error(408, f"request body not received within {timeout:g} s ({size} bytes "
                                     f"arrived)", "invalid_request_error", None, close)(scope, receive, send)
            return
        data = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
