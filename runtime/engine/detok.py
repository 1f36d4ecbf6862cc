"""Incremental detokenisation and stop-string handling for one sequence.

Text grows by decoding a short window of ids (vLLM's prefix/read offsets), so a step costs O(window), and
partial UTF-8 sequences (decoded as U+FFFD) are held back until they complete. Stop strings: the text is
cut at the first occurrence of any stop string; while running, the longest tail of the text that is a
prefix of some stop string is held back from the client, so a streamed response never shows text that
a later token turns into a stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TextState:
    stops: list[str] = field(default_factory=list)
    include_stop: bool = False
    ids: list[int] = field(default_factory=list)
    text: str = ""
    released: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    def push(self, tokenizer: Any, token_id: int) -> str | None:
        """Append a token. Returns the stop string when one now appears (the text is cut there), else None."""
        self.ids.append(int(token_id))
        prefix = tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not self.stops:
            return None
        # a stop can only end in the new text: it starts at most (longest stop - 1) characters before it
        start = max(0, len(self.text) - (len(full) - len(prefix)) - max(len(s) for s in self.stops) + 1)
        return self._find_stop(start)

    def _find_stop(self, start: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stops:
            k = self.text.find(s, start)
            if k >= 0 and (best is None or k < best[0]):
                best = (k, s)
        if best is None:
            return None
        k, s = best
        self.text = self.text[: k + len(s)] if self.include_stop else self.text[:k]
        return s

    def release(self, final: bool) -> str:
        """Text not yet given to the client that is safe to give now."""
        end = len(self.text)
        if not final:
            end -= self._held_back()
        end = max(end, self.released)
        out = self.text[self.released:end]
        self.released = end
        return out

    def _held_back(self) -> int:
        hold = 0
        for s in self.stops:
            for j in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:j]):
                    hold = j
                    break
        return hold
