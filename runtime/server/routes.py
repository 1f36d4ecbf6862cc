"""The HTTP routes: probes (/health, /ready, /metrics) and the OpenAI API (/v1/models, /v1/completions,
/v1/chat/completions). Handlers get the `ServerState` through a dependency; every /v1 route checks the API key."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from dsv4.runtime.server.errors import APIError
from dsv4.runtime.server.generation import admit, collect
from dsv4.runtime.server.protocol import (
    ERRORS_V1,
    SSE_DOC,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from dsv4.runtime.server.render import Envelope, chat_choices, completion_choices, usage
from dsv4.runtime.server.state import ServerState
from dsv4.runtime.server.streaming import SSEResponse, chat_events, completion_events
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response


def server_state(request: Request) -> ServerState:
    return request.app.state.dsv4


State = Annotated[ServerState, Depends(server_state)]


def require_api_key(request: Request, state: State) -> None:
    if state.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() != state.api_key:
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", headers={"WWW-Authenticate": "Bearer"})


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                       "not_found_error", "model")


probes = APIRouter(tags=["probes"])
openai_v1 = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])
_PROBE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "OK"}, 503: {"description": "Not live / not ready (JSON status)"}}


@probes.get("/health", summary="Liveness: the engine thread is alive", responses=_PROBE_DOC)
async def health(state: State) -> Response:
    if not state.engine.alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@probes.get("/ready", summary="Readiness: model loaded and not draining", responses=_PROBE_DOC)
async def ready(state: State) -> Response:
    ok = state.ready and not state.draining and state.engine.alive
    body = {"ready": ok, "draining": state.draining, "model": state.model_name,
            "running": state.engine.num_running, "waiting": state.engine.num_waiting}
    return JSONResponse(body, status_code=200 if ok else 503)


@probes.get("/metrics", summary="Prometheus metrics (names in docs/metrics.md)", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    body, ctype = state.metrics.render()
    return Response(body, media_type=ctype)


@openai_v1.get("/v1/models", response_model=ModelList, responses={k: ERRORS_V1[k] for k in (401, 503)})
async def models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.created, "owned_by": "dsv4",
        "max_model_len": state.max_model_len, **state.extra_info}]}


@openai_v1.post("/v1/completions", response_model=None, responses={
    200: {"model": CompletionResponse, "content": SSE_DOC}, **ERRORS_V1})
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    check_model(state, body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of must equal n ({body.n}) in this server, got {body.best_of}", param="best_of")
    tok = state.tokenizer
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
    want_prompt_lp = body.echo and body.logprobs is not None
    params = body.sampling(body.max_tokens or 16, body.logprobs, body.logprobs if want_prompt_lp else None)
    env = Envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), state.model_name)
    gens = admit(state, prompts, params, env.id, body.priority)  # validates the token ids before echo decodes them
    prompt_texts = [tok.decode(ids, skip_special_tokens=False) if body.echo else "" for ids in prompts]
    logprobs = body.logprobs is not None
    if body.stream:
        return SSEResponse(completion_events(tok, env, gens, body.n, prompt_texts, body.echo, logprobs,
                                             body.include_usage), gens)
    finals, choices = await collect(request, gens, body.n)
    out = completion_choices(tok, prompts, prompt_texts, body.n, finals, choices, body.echo, logprobs)
    return JSONResponse(env.wrap(out, usage=usage(list(finals.values()))))


@openai_v1.post("/v1/chat/completions", response_model=None, responses={
    200: {"model": ChatCompletionResponse, "content": SSE_DOC}, **ERRORS_V1})
async def chat(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    check_model(state, body.model)
    tok = state.tokenizer
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
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
    created = int(time.time())
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    [gen] = admit(state, [ids], params, rid, body.priority)
    if body.stream:
        env = Envelope(rid, "chat.completion.chunk", created, state.model_name)
        return SSEResponse(chat_events(tok, env, gen, body.logprobs, body.include_usage), [gen])
    finals, choices = await collect(request, [gen], body.n)
    env = Envelope(rid, "chat.completion", created, state.model_name)
    return JSONResponse(env.wrap(chat_choices(tok, body.n, choices, body.logprobs),
                                 usage=usage(list(finals.values()))))
