"""The HTTP routes: probes (/health, /ready, /metrics), the OpenAI API (/v1/models, /v1/completions,
/v1/chat/completions) and vLLM's /tokenize and /detokenize. Handlers get the `ServerState` through a
dependency; every API route (`is_api_path`) checks the API key, counts as in flight and has the body limits."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import anyio
from dsv4.runtime.server import forced_output
from dsv4.runtime.server.chat_prompt import encode_chat
from dsv4.runtime.server.errors import APIError
from dsv4.runtime.server.generation import admit, collect
from dsv4.runtime.server.protocol import (
    ERRORS_V1,
    SSE_DOC,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelList,
    TokenizeChatRequest,
    TokenizePromptRequest,
    TokenizeResponse,
)
from dsv4.runtime.server.render import Envelope, chat_choices, completion_choices, token_text, usage
from dsv4.runtime.server.state import ServerState
from dsv4.runtime.server.streaming import SSEResponse, chat_events, completion_events
from dsv4.runtime.server.structured import GrammarCompiler, GrammarSpec
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


async def grammar_for(request: Request, state: ServerState, body: ChatCompletionRequest, thinking: bool,
                      ) -> GrammarSpec | None:
    """The grammar a chat request's output must follow (compiled off the event loop), or None."""
    forced, rf = body.forced_tools, body.response_format_dict
    if forced is None and rf is None:
        return None
    if request.app.state.grammars is None:  # xgrammar's view of the vocabulary: built on first use
        vocab = state.engine.engine.vocab_size
        request.app.state.grammars = await anyio.to_thread.run_sync(GrammarCompiler, state.tokenizer, vocab)
    grammars: GrammarCompiler = request.app.state.grammars
    if forced is not None:
        parallel = body.parallel_tool_calls is not False
        return await anyio.to_thread.run_sync(grammars.compile_tool_choice, forced, parallel, thinking)
    return await anyio.to_thread.run_sync(grammars.compile, rf, thinking)


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                       "not_found_error", "model")


TOKENIZER_PATHS = ("/tokenize", "/detokenize")


def is_api_path(path: str) -> bool:
    """Routes that serve the model: API key, in-flight count (the drain waits for them), body limits."""
    return path.startswith("/v1/") or path in TOKENIZER_PATHS


probes = APIRouter(tags=["probes"])
openai_v1 = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])
tokenizer = APIRouter(tags=["tokenizer"], dependencies=[Depends(require_api_key)])
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
    if (why := body.tool_choice_error()) is not None:
        raise APIError(400, why, param="tool_choice")
    tok = state.tokenizer
    prompt = encode_chat(tok, body.messages, body.tools, body.chat_template_kwargs, body.reasoning_effort,
                         body.add_generation_prompt, parse_tools=body.parses_tool_calls)
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        room = max(1, state.max_model_len - len(prompt.ids))
        max_tokens = min(room, state.default_max_tokens) if state.default_max_tokens else room
    top = body.top_logprobs if body.top_logprobs is not None else 0
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    params = body.sampling(max_tokens, top if body.logprobs else None)
    params.constraint = await grammar_for(request, state, body, prompt.thinking)
    if request.app.state.test_forced_output and forced_output.HEADER in request.headers:
        params.constraint = forced_output.forced_tokens(request.headers[forced_output.HEADER], tok)
    created = int(time.time())
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    [gen] = admit(state, [prompt.ids], params, rid, body.priority)
    if body.stream:
        env = Envelope(rid, "chat.completion.chunk", created, state.model_name)
        return SSEResponse(chat_events(tok, env, gen, prompt, body.logprobs, body.include_usage), [gen])
    finals, choices = await collect(request, [gen], body.n)
    env = Envelope(rid, "chat.completion", created, state.model_name)
    return JSONResponse(env.wrap(chat_choices(tok, prompt, body.n, choices, body.logprobs),
                                 usage=usage(list(finals.values()))))


@tokenizer.post("/tokenize", response_model=TokenizeResponse, responses={
    k: ERRORS_V1[k] for k in (400, 401, 404, 408, 413, 503)})
async def tokenize(body: TokenizePromptRequest | TokenizeChatRequest, state: State) -> dict[str, Any]:
    """The token ids the model would be given: a chat conversation through the chat encoding (exactly as
    /v1/chat/completions encodes it), or a plain prompt."""
    check_model(state, body.model)
    tok = state.tokenizer
    if isinstance(body, TokenizeChatRequest):
        ids = encode_chat(tok, body.messages, body.tools, body.chat_template_kwargs, body.reasoning_effort,
                          body.add_generation_prompt).ids
    else:
        ids = tok.encode(body.prompt, add_bos=body.add_special_tokens)
    strs = [token_text(tok, t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}


@tokenizer.post("/detokenize", response_model=DetokenizeResponse, responses={
    k: ERRORS_V1[k] for k in (400, 401, 404, 408, 413, 503)})
async def detokenize(body: DetokenizeRequest, state: State) -> dict[str, Any]:
    check_model(state, body.model)
    vocab = state.tokenizer.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"tokens must be integers in [0, {vocab}) (the vocabulary)", param="tokens")
    return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}
