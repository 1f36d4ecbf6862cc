"""Every failure the HTTP layer answers, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

One mapping from engine refusals to HTTP (`from_engine_error`), used both where a handler admits a request and
by the exception handlers; validation errors become 400 with a message that names the field.
"""

from __future__ import annotations

from typing import Any

from dsv4.runtime.engine.engine import Draining, QueueFull
from dsv4.runtime.engine.request import RequestError
from dsv4.runtime.server.protocol import error_body
from dsv4.runtime.server.state import ServerState
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


ENGINE_ERRORS = (RequestError, QueueFull, Draining)


def from_engine_error(exc: RequestError | QueueFull | Draining) -> APIError:
    """The engine refused a request: a limit (its code, naming the field), a full queue (429), draining (503)."""
    if isinstance(exc, RequestError):
        return APIError(exc.code, str(exc), "invalid_request_error", exc.field)
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), "rate_limit_error", headers={"Retry-After": str(exc.retry_after)})
    return APIError(503, str(exc), "service_unavailable")


def error_response(state: ServerState, err: APIError) -> JSONResponse:
    state.count_error(err.status)
    return JSONResponse(error_body(err.message, err.type, err.param, err.status), status_code=err.status,
                        headers=err.headers)


_BUILTIN_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(x: Any) -> bool:
    """pydantic puts the union member ('constrained-str', 'list[int]', 'str') into an error's location."""
    return isinstance(x, str) and (any(c in x for c in "[]-") or x in _BUILTIN_TAGS)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message for all of a request's validation errors, and the first field it names."""
    parts, first = [], None
    unions: dict[str, list[str]] = {}  # field -> union members that all failed
    for err in exc.errors():
        raw = [x for x in err.get("loc", ()) if x != "body"]
        tag = next((i for i, x in enumerate(raw) if _is_union_tag(x)), None)
        if tag is not None and err.get("type") not in ("extra_forbidden", "missing"):
            where = ".".join(str(x) for x in raw[:tag])
            if where not in unions:
                unions[where] = []
                parts.append(where)  # placeholder, filled below
                first = first or where or None
            member = str(raw[tag]).replace("constrained-", "")
            if member not in unions[where]:
                unions[where].append(member)
            continue
        loc = [str(x) for x in raw if not _is_union_tag(x)]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        if not where:  # the body as a whole
            what = "request body required" if err.get("type") == "missing" else f"request body: {err.get('msg')}"
            parts.append(f"{what} (send a JSON object with Content-Type: application/json)")
            continue
        if err.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field (not part of this API)")
        elif err.get("type") == "missing":
            parts.append(f"{where}: field required")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = first or where or None
    parts = [f"{p}: invalid value: expected one of {', '.join(unions[p])}" if p in unions else p for p in parts]
    return "; ".join(parts) or "invalid request", first


def install_error_handlers(app: FastAPI, state: ServerState) -> None:
    async def validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return error_response(state, APIError(400, msg, "invalid_request_error", param))

    async def api_error(_req: Request, exc: APIError) -> JSONResponse:
        return error_response(state, exc)

    async def http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = str(exc.detail)
        if exc.status_code == 400 and msg == "There was an error parsing the body":  # FastAPI: not UTF-8 / too deep
            msg = "malformed JSON body: cannot be parsed (not UTF-8, or nested too deeply)"
        return error_response(state, APIError(exc.status_code, msg))

    async def engine_error(_req: Request, exc: Exception) -> JSONResponse:
        return error_response(state, from_engine_error(exc))  # type: ignore[arg-type]

    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    for cls in ENGINE_ERRORS:
        app.add_exception_handler(cls, engine_error)
