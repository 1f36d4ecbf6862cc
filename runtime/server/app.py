"""The OpenAI-compatible FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /ready,
/metrics (and FastAPI's /openapi.json, /docs).

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for validation (the message
names the field) and requests that can never fit (it names the limit), 401 without the API key, 404 for an
unknown model, 408/413 for a body that stalls or exceeds max_body_bytes (limits.py), 429 with Retry-After when
the waiting queue is full, 503 while draining. `/openapi.json` documents all of them (no 422).
Streaming is server-sent events; a final chunk carries usage (unless stream_options.include_usage is false).
A client that disconnects cancels its request: the engine frees its cache before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from dsv4.runtime.engine.engine import AsyncEngine, Draining, QueueFull
from dsv4.runtime.engine.request import RequestError, RequestOutput, SamplingParams, TokenLogprob
from dsv4.runtime.server.limits import BodyLimitMiddleware
from dsv4.runtime.server.protocol import (
    ERRORS_V1,
    SSE_DOC,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    error_body,
)
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dsv4.server")


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any
    model_name: str
    max_model_len: int
    metrics: Any = None  # EngineMetrics
    api_key: str | None = None
    default_max_tokens: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = True
    draining: bool = False
    in_flight: int = 0  # /v1 HTTP requests being served (streams included)
    max_body_bytes: int = 16 * 2**20  # larger /v1 request bodies get 413
    body_timeout_s: float = 30.0  # a /v1 request body that takes longer to arrive gets 408
    extra_info: dict[str, Any] = field(default_factory=dict)

    def count_error(self, code: int) -> None:
        if self.metrics is not None:
            self.metrics.request_error(code)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error_response(state: ServerState, status: int, message: str, type_: str, param: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    state.count_error(status)
    return JSONResponse(error_body(message, type_, param, status), status_code=status, headers=headers)


_BUILTIN_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(x: Any) -> bool:
    """pydantic puts the union member ('constrained-str', 'list[int]', 'str') into an error's location."""
    return isinstance(x, str) and (any(c in x for c in "[]-") or x in _BUILTIN_TAGS)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
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


class InFlightMiddleware:
    """Counts /v1 requests in flight (the drain waits for them) and answers 503 to new ones while draining."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            resp = _error_response(self.state, 503, "server is shutting down; not accepting new requests",
                                   "service_unavailable", headers={"Retry-After": "1", "Connection": "close"})
            await resp(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class SSEResponse(StreamingResponse):
    """Streams events while listening for the client's disconnect (whatever the ASGI spec version), and
    always closes the event iterator and the engine streams behind it (`streams`, also when the iterator never
    started), so the request is cancelled in the engine as soon as the client goes."""

    def __init__(self, content: Any, streams: list[Any], **kw: Any):
        super().__init__(content, **kw)
        self.streams = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def run(fn: Any) -> None:
                    with contextlib.suppress(OSError):
                        await fn()
                    tg.cancel_scope.cancel()

                tg.start_soon(run, partial(self.stream_response, send))
                await run(partial(self.listen_for_disconnect, receive))
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            for st in self.streams:
                st.close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (prompt index, output); cancelling closes all of them."""
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()  # type: ignore[attr-defined]
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: Any) -> None:
        try:
            async for out in g:
                await q.put((i, out))
        except Exception as e:  # surfaced to the consumer
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, out = await q.get()
            if out is None:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:  # a cancelled pump does not close its stream: abort what did not finish
            await g.aclose()  # type: ignore[attr-defined]


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="dsv4 OpenAI-compatible API", version="1", description=(
        "OpenAI-compatible completions and chat completions for DeepSeek-V4-class models, with a multi-pool "
        "hybrid KV cache. Metrics at /metrics (Prometheus)."))
    app.state.dsv4 = state
    tok = state.tokenizer

    def openapi() -> dict[str, Any]:
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

    app.openapi = openapi  # type: ignore[method-assign]

    # ---- errors ------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return _error_response(state, 400, msg, "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return _error_response(state, exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = str(exc.detail)
        if exc.status_code == 400 and msg == "There was an error parsing the body":  # FastAPI: not UTF-8 / too deep
            msg = "malformed JSON body: cannot be parsed (not UTF-8, or nested too deeply)"
        return _error_response(state, exc.status_code, msg, "invalid_request_error")

    @app.exception_handler(RequestError)
    async def _request_error(_req: Request, exc: RequestError) -> JSONResponse:
        return _error_response(state, exc.code, str(exc), "invalid_request_error", exc.field)

    @app.exception_handler(QueueFull)
    async def _queue_full(_req: Request, exc: QueueFull) -> JSONResponse:
        return _error_response(state, 429, str(exc), "rate_limit_error", headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Draining)
    async def _draining(_req: Request, exc: Draining) -> JSONResponse:
        return _error_response(state, 503, str(exc), "service_unavailable")

    def check_auth(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != state.api_key:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                           "not_found_error", "model")

    def start(prompts: list[list[int]], params: SamplingParams, rid: str, priority: int) -> list[Any]:
        """Admit every prompt (or none) and queue them; the HTTP error for a refusal."""
        try:
            return state.engine.generate_many(prompts, params, rid, priority)
        except RequestError as e:
            raise APIError(e.code, str(e), "invalid_request_error", e.field) from None
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)}) from None
        except Draining as e:
            raise APIError(503, str(e), "service_unavailable") from None

    def token_str(tid: int) -> str:
        return tok.decode([tid], skip_special_tokens=False)

    # ---- probes and metadata -------------------------------------------------------------------------
    probe_doc = {200: {"description": "OK"}, 503: {"description": "Not live / not ready (JSON status)"}}

    @app.get("/health", tags=["probes"], summary="Liveness: the engine thread is alive", responses=probe_doc)
    async def health() -> Response:
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", tags=["probes"], summary="Readiness: model loaded and not draining", responses=probe_doc)
    async def ready() -> Response:
        ok = state.ready and not state.draining and state.engine.alive
        body = {"ready": ok, "draining": state.draining, "model": state.model_name,
                "running": state.engine.num_running, "waiting": state.engine.num_waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics (names in docs/metrics.md)",
             response_class=PlainTextResponse)
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models", tags=["openai"], response_model=ModelList,
             responses={k: ERRORS_V1[k] for k in (401, 503)})
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsv4",
            "max_model_len": state.max_model_len, **state.extra_info}]}

    # ---- completions ---------------------------------------------------------------------------------
    def completion_logprobs(entries: list[TokenLogprob | None], ids: list[int], offset0: int) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        off = offset0
        for tid, e in zip(ids, entries, strict=True):
            s = token_str(tid)
            tokens.append(s)
            offsets.append(off)
            off += len(s)
            lps.append(None if e is None else e.logprob)
            tops.append(None if e is None else {token_str(t): lp for t, lp in e.top} or None)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions", tags=["openai"], response_model=None, responses={
        200: {"model": CompletionResponse, "content": SSE_DOC}, **ERRORS_V1})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_auth(request)
        check_model(body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of must equal n ({body.n}) in this server, got {body.best_of}",
                           param="best_of")
        prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
        want_prompt_lp = body.echo and body.logprobs is not None
        params = body.sampling(body.max_tokens or 16, body.logprobs, body.logprobs if want_prompt_lp else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gens = start(prompts, params, rid, body.priority)  # validates the token ids before echo decodes them
        prompt_texts = [tok.decode(ids, skip_special_tokens=False) if body.echo else "" for ids in prompts]
        n = body.n
        created = int(time.time())

        if body.stream:
            async def events() -> AsyncIterator[str]:
                usage = {"prompt_tokens": 0, "completion_tokens": 0}
                started: set[int] = set()
                offsets: dict[int, int] = {}
                async for pi, out in merge(gens):
                    if out.error:
                        yield _sse(error_body(out.error, "internal_error", None, 500))
                        break
                    for d in out.deltas:
                        ci = pi * n + d.index
                        text = d.text
                        lp = None
                        if ci not in started:
                            started.add(ci)
                            offsets[ci] = 0
                            if body.echo:
                                text = prompt_texts[pi] + text
                        if body.logprobs is not None:
                            lp = completion_logprobs(list(d.logprobs), d.token_ids, offsets[ci])
                            offsets[ci] += sum(len(t) for t in lp["tokens"])
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": state.model_name, "choices": [{
                                        "index": ci, "text": text, "logprobs": lp,
                                        "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}]})
                    if out.finished:
                        usage["prompt_tokens"] += out.prompt_tokens
                        usage["completion_tokens"] += out.completion_tokens
                if body.include_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                "model": state.model_name, "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"

            return SSEResponse(events(), gens, media_type="text/event-stream")

        finals, choices = await _collect(request, gens, n)
        out_choices = []
        for pi in range(len(prompts)):
            fin = finals[pi]
            for j in range(n):
                c = choices[(pi, j)]
                text = prompt_texts[pi] + c.text if body.echo else c.text
                lp = None
                if body.logprobs is not None:
                    entries: list[TokenLogprob | None] = list(c.logprobs)
                    ids = list(c.token_ids)
                    if body.echo:
                        entries = list(fin.prompt_logprobs or [None] * len(prompts[pi])) + entries
                        ids = prompts[pi] + ids
                    lp = completion_logprobs(entries, ids, 0)
                out_choices.append({"index": pi * n + j, "text": text, "logprobs": lp,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                             "choices": out_choices, "usage": _usage(list(finals.values()))})

    # ---- chat ------------------------------------------------------------------------------------------
    def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
        content = []
        for e in entries:
            s = token_str(e.token_id)
            content.append({"token": s, "logprob": e.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (ts := token_str(t)), "logprob": lp, "bytes": list(ts.encode())}
                                             for t, lp in e.top]})
        return {"content": content}

    @app.post("/v1/chat/completions", tags=["openai"], response_model=None, responses={
        200: {"model": ChatCompletionResponse, "content": SSE_DOC}, **ERRORS_V1})
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_auth(request)
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = tok.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.requested_max_tokens
        if max_tokens is None:
            room = max(1, state.max_model_len - len(ids))
            max_tokens = min(room, state.default_max_tokens) if state.default_max_tokens else room
        top = body.top_logprobs if body.top_logprobs is not None else 0
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        params = body.sampling(max_tokens, top if body.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        [gen] = start([ids], params, rid, body.priority)
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                         "model": state.model_name, "choices": choices, **extra})

        if body.stream:
            async def events() -> AsyncIterator[str]:
                started: set[int] = set()
                async for _pi, out in merge([gen]):
                    if out.error:
                        yield _sse(error_body(out.error, "internal_error", None, 500))
                        break
                    for d in out.deltas:
                        if d.index not in started:
                            started.add(d.index)
                            yield chunk([{"index": d.index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])
                        if d.text or d.logprobs or d.finish_reason is None:
                            yield chunk([{"index": d.index, "delta": {"content": d.text},
                                          "logprobs": chat_logprobs(d.logprobs) if body.logprobs else None,
                                          "finish_reason": None}])
                        if d.finish_reason is not None:
                            yield chunk([{"index": d.index, "delta": {}, "logprobs": None,
                                          "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}])
                    if out.finished and body.include_usage:
                        yield chunk([], usage=_usage([out]))
                yield "data: [DONE]\n\n"

            return SSEResponse(events(), [gen], media_type="text/event-stream")

        finals, choices = await _collect(request, [gen], body.n)
        out_choices = []
        for j in range(body.n):
            c = choices[(0, j)]
            out_choices.append({"index": j, "message": {"role": "assistant", "content": c.text},
                                "logprobs": chat_logprobs(c.logprobs) if body.logprobs else None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                             "choices": out_choices, "usage": _usage(list(finals.values()))})

    def on_body_error(status: int, message: str, type_: str, param: str | None, headers: dict[str, str]) -> Any:
        return _error_response(state, status, message, type_, param, headers)

    limited = BodyLimitMiddleware(app, lambda: state.max_body_bytes, on_body_error, lambda: state.body_timeout_s)
    return InFlightMiddleware(limited, state)  # type: ignore[return-value]


def _usage(finals: list[RequestOutput]) -> dict[str, Any]:
    p = sum(f.prompt_tokens for f in finals)
    c = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in finals)}}


async def _collect(request: Request, gens: list[AsyncIterator[RequestOutput]], n: int,
                   ) -> tuple[dict[int, RequestOutput], dict[tuple[int, int], _Choice]]:
    """Run requests to completion; cancel them if the client disconnects first."""
    finals: dict[int, RequestOutput] = {}
    choices: dict[tuple[int, int], _Choice] = {(i, j): _Choice() for i in range(len(gens)) for j in range(n)}

    async def consume() -> None:
        async for pi, out in merge(gens):
            if out.error:
                raise APIError(500, out.error, "internal_error")
            for d in out.deltas:
                c = choices[(pi, d.index)]
                c.text += d.text
                c.token_ids += d.token_ids
                c.logprobs += d.logprobs
                if d.finish_reason is not None:
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            if out.finished:
                finals[pi] = out

    task = asyncio.create_task(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                break
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise APIError(499, "client disconnected", "client_closed_request")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for g in gens:  # idempotent; aborts streams whose consumer never started
            await g.aclose()  # type: ignore[attr-defined]
    return finals, choices
