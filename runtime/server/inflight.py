"""Counts API requests in flight (the drain waits for them) and answers 503 to new ones while draining."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsv4.runtime.server.errors import APIError, error_response
from dsv4.runtime.server.state import ServerState


class InFlightMiddleware:
    def __init__(self, app: Any, state: ServerState, applies_to: Callable[[str], bool]):
        self.app, self.state, self.applies_to = app, state, applies_to

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.applies_to(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            resp = error_response(self.state, APIError(
                503, "server is shutting down; not accepting new requests", "service_unavailable",
                headers={"Retry-After": "1", "Connection": "close"}))
            await resp(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
