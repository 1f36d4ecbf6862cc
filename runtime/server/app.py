"""The OpenAI-compatible FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /tokenize,
/detokenize, /health, /ready, /metrics (and FastAPI's /openapi.json, /docs).

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for validation (the message
names the field) and requests that can never fit (it names the limit), 401 without the API key, 404 for an
unknown model, 408/413 for a body that stalls or exceeds max_body_bytes (limits.py), 429 with Retry-After when
the waiting queue is full, 503 while draining. `/openapi.json` documents all of them (no 422).
Streaming is server-sent events; a final chunk carries usage (unless stream_options.include_usage is false).
A client that disconnects cancels its request: the engine frees its cache before the next step.

This module only assembles the parts: routes.py (handlers), errors.py (error mapping), streaming.py (SSE),
render.py (response objects), generation.py (engine requests), inflight.py + limits.py (middleware).
"""

from __future__ import annotations

from typing import Any

from dsv4.runtime.server import forced_output, routes
from dsv4.runtime.server.errors import APIError, error_response, install_error_handlers
from dsv4.runtime.server.inflight import InFlightMiddleware
from dsv4.runtime.server.limits import BodyLimitMiddleware
from dsv4.runtime.server.state import ServerState
from fastapi import FastAPI

__all__ = ["ServerState", "create_app"]


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with its 422 responses removed: validation errors are 400 here (OpenAI's code)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(state: ServerState) -> Any:
    """The ASGI app: FastAPI behind the in-flight/drain and body-limit middleware."""
    app = FastAPI(title="dsv4 OpenAI-compatible API", version="1", description=(
        "OpenAI-compatible completions and chat completions for DeepSeek-V4-class models, with a multi-pool "
        "hybrid KV cache. Metrics at /metrics (Prometheus)."))
    app.state.dsv4 = state
    app.state.test_forced_output = forced_output.enabled_from_env()
    app.state.grammars = None  # structured.GrammarCompiler, made when a request first needs a grammar
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    install_error_handlers(app, state)
    app.include_router(routes.probes)
    app.include_router(routes.openai_v1)
    app.include_router(routes.tokenizer)

    def on_body_error(status: int, message: str, type_: str, param: str | None, headers: dict[str, str]) -> Any:
        return error_response(state, APIError(status, message, type_, param, headers))

    limited = BodyLimitMiddleware(app, lambda: state.max_body_bytes, on_body_error, lambda: state.body_timeout_s,
                                  applies_to=routes.is_api_path)
    return InFlightMiddleware(limited, state, applies_to=routes.is_api_path)
