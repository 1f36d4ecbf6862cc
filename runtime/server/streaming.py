"""Server-sent events for `stream: true`: completion and chat-completion chunks, a final usage chunk, and a
response class that cancels the engine requests as soon as the client disconnects."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
from dsv4.runtime.chat.completion_parser import CompletionDelta, CompletionParser
from dsv4.runtime.engine.request import RequestOutput
from dsv4.runtime.server.chat_prompt import ChatPrompt
from dsv4.runtime.server.generation import merge
from dsv4.runtime.server.protocol import error_body
from dsv4.runtime.server.render import (
    Envelope,
    chat_delta,
    chat_finish_reason,
    chat_logprobs,
    completion_logprobs,
    usage,
)
from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """Streams events while listening for the client's disconnect (whatever the ASGI spec version), and
    always closes the event iterator and the engine streams behind it (`streams`, also when the iterator never
    started), so the request is cancelled in the engine as soon as the client goes."""

    def __init__(self, content: Any, streams: list[Any], **kw: Any):
        super().__init__(content, media_type="text/event-stream", **kw)
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


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def engine_failure(message: str) -> str:
    return sse(error_body(message, "internal_error", None, 500))


async def completion_events(tok: Any, env: Envelope, gens: list[AsyncIterator[RequestOutput]], n: int,
                            prompt_texts: list[str], echo: bool, logprobs: bool, include_usage: bool,
                            ) -> AsyncIterator[str]:
    counts = {"prompt_tokens": 0, "completion_tokens": 0}
    offsets: dict[int, int] = {}  # choice -> text offset of its next token
    async for pi, out in merge(gens):
        if out.error:
            yield engine_failure(out.error)
            break
        for d in out.deltas:
            ci = pi * n + d.index
            text = d.text
            lp = None
            if ci not in offsets:
                offsets[ci] = 0
                if echo:
                    text = prompt_texts[pi] + text
            if logprobs:
                lp = completion_logprobs(tok, list(d.logprobs), d.token_ids, offsets[ci])
                offsets[ci] += sum(len(t) for t in lp["tokens"])
            yield sse(env.wrap([{"index": ci, "text": text, "logprobs": lp,
                                 "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}]))
        if out.finished:
            counts["prompt_tokens"] += out.prompt_tokens
            counts["completion_tokens"] += out.completion_tokens
    if include_usage:
        yield sse(env.wrap([], usage={**counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"]}))
    yield DONE


async def chat_events(tok: Any, env: Envelope, gen: AsyncIterator[RequestOutput], prompt: ChatPrompt,
                      logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    """Each choice's text goes through its own parser: reasoning, content and tool-call pieces as they become
    certain (a possible tag prefix is held back until the next token decides it)."""
    parsers: dict[int, CompletionParser] = {}
    called: set[int] = set()  # choices that made a tool call
    async for _pi, out in merge([gen]):
        if out.error:
            yield engine_failure(out.error)
            break
        for d in out.deltas:
            if d.index not in parsers:
                parsers[d.index] = prompt.parser()
                yield sse(env.wrap([{"index": d.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]))
            parser = parsers[d.index]
            parsed = parser.feed(d.text)
            if d.finish_reason is not None:
                last = parser.finish()
                parsed = CompletionDelta(parsed.reasoning + last.reasoning, parsed.content + last.content,
                                         parsed.tool_calls + last.tool_calls)
            if parsed.tool_calls:
                called.add(d.index)
            delta = chat_delta(parsed)
            if delta or (logprobs and d.logprobs):
                yield sse(env.wrap([{"index": d.index, "delta": delta or {"content": ""},
                                     "logprobs": chat_logprobs(tok, d.logprobs) if logprobs else None,
                                     "finish_reason": None}]))
            if d.finish_reason is not None:
                yield sse(env.wrap([{"index": d.index, "delta": {}, "logprobs": None,
                                     "finish_reason": chat_finish_reason(d.finish_reason, d.index in called),
                                     "stop_reason": d.stop_reason}]))
        if out.finished and include_usage:
            yield sse(env.wrap([], usage=usage([out])))
    yield DONE
