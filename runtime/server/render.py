"""Response objects of the OpenAI API as plain dicts (their documented shapes are in protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsv4.runtime.chat.completion_parser import CompletionDelta, parse_completion
from dsv4.runtime.engine.request import RequestOutput, TokenLogprob
from dsv4.runtime.server.chat_prompt import ChatPrompt
from dsv4.runtime.server.generation import Choice


@dataclass(frozen=True)
class Envelope:
    """The fields every response object and chunk of one request shares."""

    id: str
    object: str  # text_completion, chat.completion, chat.completion.chunk
    created: int
    model: str

    def wrap(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def token_text(tok: Any, tid: int) -> str:
    return tok.decode([tid], skip_special_tokens=False)


def completion_logprobs(tok: Any, entries: list[TokenLogprob | None], ids: list[int], offset0: int,
                        ) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    off = offset0
    for tid, e in zip(ids, entries, strict=True):
        s = token_text(tok, tid)
        tokens.append(s)
        offsets.append(off)
        off += len(s)
        lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else {token_text(tok, t): lp for t, lp in e.top} or None)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for e in entries:
        s = token_text(tok, e.token_id)
        content.append({"token": s, "logprob": e.logprob, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": (ts := token_text(tok, t)), "logprob": lp,
                                          "bytes": list(ts.encode())} for t, lp in e.top]})
    return {"content": content}


def usage(finals: list[RequestOutput]) -> dict[str, Any]:
    p = sum(f.prompt_tokens for f in finals)
    c = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in finals)}}


def completion_choices(tok: Any, prompts: list[list[int]], prompt_texts: list[str], n: int,
                       finals: dict[int, RequestOutput], choices: dict[tuple[int, int], Choice], echo: bool,
                       logprobs: bool) -> list[dict[str, Any]]:
    out = []
    for pi in range(len(prompts)):
        fin = finals[pi]
        for j in range(n):
            c = choices[(pi, j)]
            text = prompt_texts[pi] + c.text if echo else c.text
            lp = None
            if logprobs:
                entries: list[TokenLogprob | None] = list(c.logprobs)
                ids = list(c.token_ids)
                if echo:
                    entries = list(fin.prompt_logprobs or [None] * len(prompts[pi])) + entries
                    ids = prompts[pi] + ids
                lp = completion_logprobs(tok, entries, ids, 0)
            out.append({"index": pi * n + j, "text": text, "logprobs": lp,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return out


def chat_finish_reason(engine_reason: str | None, made_tool_calls: bool) -> str | None:
    """OpenAI's finish_reason: a completion that ended by itself after calling tools finished with tool_calls."""
    return "tool_calls" if made_tool_calls and engine_reason == "stop" else engine_reason


def chat_choices(tok: Any, prompt: ChatPrompt, n: int, choices: dict[tuple[int, int], Choice], logprobs: bool,
                 ) -> list[dict[str, Any]]:
    out = []
    for j in range(n):
        c = choices[(0, j)]
        parsed = parse_completion(c.text, prompt.thinking, prompt.parse_tools)
        calls = [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                 for t in parsed.tool_calls]
        message: dict[str, Any] = {"role": "assistant", "content": None if calls and not parsed.content else
                                   parsed.content, "reasoning_content": parsed.reasoning or None}
        if calls:
            message["tool_calls"] = calls
        out.append({"index": j, "message": message,
                    "logprobs": chat_logprobs(tok, c.logprobs) if logprobs else None,
                    "finish_reason": chat_finish_reason(c.finish_reason, bool(calls)),
                    "stop_reason": c.stop_reason})
    return out


def chat_delta(parsed: CompletionDelta) -> dict[str, Any]:
    """A streamed chat delta in the shape the openai SDK accumulates: a call's first piece carries index, id,
    type and name; later pieces only index and more arguments."""
    delta: dict[str, Any] = {}
    if parsed.reasoning:
        delta["reasoning_content"] = parsed.reasoning
    if parsed.content:
        delta["content"] = parsed.content
    calls = []
    for t in parsed.tool_calls:
        fn: dict[str, Any] = {"arguments": t.arguments}
        call: dict[str, Any] = {"index": t.index}
        if t.id is not None:
            call.update(id=t.id, type="function")
        if t.name is not None:
            fn["name"] = t.name
        call["function"] = fn
        calls.append(call)
    if calls:
        delta["tool_calls"] = calls
    return delta
