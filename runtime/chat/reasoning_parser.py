"""Splits a thinking-mode completion into reasoning and content, incrementally.

The thinking-mode prompt ends in `<think>`, so the model's text is reasoning until it writes `</think>`, and
content after it. A completion that never closes its reasoning (cut by max_tokens) is all reasoning. In chat
mode everything is content. A possible partial `</think>` at the end of a chunk is held back until the next
chunk decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.runtime.chat.holdback import split_emittable
from dsv4.runtime.chat.special_tokens import THINK_END


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """`feed(text_delta)` -> what is now known to be reasoning / content; `finish()` flushes the held tail."""

    def __init__(self, thinking: bool):
        self.in_reasoning = thinking
        self._held = ""

    def feed(self, delta: str) -> ReasoningDelta:
        if not self.in_reasoning:
            return ReasoningDelta(content=delta)
        text = self._held + delta
        end = text.find(THINK_END)
        if end >= 0:
            self._held, self.in_reasoning = "", False
            return ReasoningDelta(reasoning=text[:end], content=text[end + len(THINK_END):])
        emit, self._held = split_emittable(text, THINK_END)
        return ReasoningDelta(reasoning=emit)

    def finish(self) -> ReasoningDelta:
        held, self._held = self._held, ""
        return ReasoningDelta(reasoning=held)


def parse_reasoning(text: str, thinking: bool) -> ReasoningDelta:
    """The whole completion at once: the same split as feeding it in any chunks."""
    parser = ReasoningParser(thinking)
    first, last = parser.feed(text), parser.finish()
    return ReasoningDelta(first.reasoning + last.reasoning, first.content + last.content)
