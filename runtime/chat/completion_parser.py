"""One assistant completion, streamed or whole, split into what the OpenAI API returns: reasoning_content,
content and tool_calls. Reasoning is split off first (`reasoning_parser`), then tool calls are parsed out of
the content (`tool_parser`), so a DSML block inside the reasoning stays reasoning text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dsv4.runtime.chat.holdback import split_emittable
from dsv4.runtime.chat.reasoning_parser import ReasoningDelta, ReasoningParser
from dsv4.runtime.chat.special_tokens import EOS
from dsv4.runtime.chat.tool_parser import (
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    ToolParseDelta,
    merge_tool_deltas,
    new_call_id,
)


@dataclass
class CompletionDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)


@dataclass
class ParsedCompletion:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]


class CompletionParser:
    """`feed(text_delta)` -> CompletionDelta; `finish()` once the completion ended (flushes held-back text).
    thinking: the prompt was encoded in thinking mode (a completion that never writes `</think>` is all
    reasoning, streamed or not). parse_tools: look for DSML tool calls (off when the request has no tools, or
    tool_choice is "none"). A literal `<｜end▁of▁sentence｜>` in the text is dropped."""

    def __init__(self, thinking: bool, parse_tools: bool = True, call_id: Callable[[], str] = new_call_id):
        self._reasoning = ReasoningParser(thinking)
        self._tools = ToolCallParser(call_id) if parse_tools else None
        self._held = ""  # a possible start of the stop token's text

    def _route(self, split: ReasoningDelta, final: bool) -> CompletionDelta:
        if self._tools is None:
            return CompletionDelta(split.reasoning, split.content)
        parsed = self._tools.feed(split.content)
        if final:
            last = self._tools.finish()
            parsed.content += last.content
            parsed.calls += last.calls
        return CompletionDelta(split.reasoning, parsed.content, parsed.calls)

    def feed(self, delta: str) -> CompletionDelta:
        # A detokeniser that keeps special tokens passes the stop token through as text: it is not output.
        text, self._held = split_emittable((self._held + delta).replace(EOS, ""), EOS)
        return self._route(self._reasoning.feed(text), final=False)

    def finish(self) -> CompletionDelta:
        held, self._held = self._held, ""
        first = self._route(self._reasoning.feed(held), final=False)
        last = self._route(self._reasoning.finish(), final=True)
        return CompletionDelta(first.reasoning + last.reasoning, first.content + last.content,
                               first.tool_calls + last.tool_calls)


def merge_completion_deltas(deltas: list[CompletionDelta]) -> ParsedCompletion:
    """Accumulate deltas the way a client does."""
    content, calls = merge_tool_deltas(ToolParseDelta(d.content, d.tool_calls) for d in deltas)
    return ParsedCompletion("".join(d.reasoning for d in deltas), content, calls)


def parse_completion(text: str, thinking: bool, parse_tools: bool = True,
                     call_id: Callable[[], str] = new_call_id) -> ParsedCompletion:
    """The whole completion at once (non-streaming responses): equal to feeding it in any chunks."""
    parser = CompletionParser(thinking, parse_tools, call_id)
    return merge_completion_deltas([parser.feed(text), parser.finish()])
