"""Parses DSML tool calls out of a completion's content, incrementally.

Content streams through until a `<｜DSML｜tool_calls>` block starts (the blank line before it is the
separator, not content). Each `<｜DSML｜invoke name="...">` becomes a call: the first delta carries its index,
id and name, then its JSON arguments follow in pieces as parameters arrive (string values stream as they are
written). Arguments are always valid JSON, also for a call cut short (it is closed at `finish()`).

Never raises: text that breaks the DSML grammar turns the rest of the stream into plain content (text of the
block not yet committed to a call included), and a chunk never ends in half a tag: a possible tag start is
held back until the next chunk decides it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dsv4.runtime.chat.dsml import (
    BLOCK_SEPARATOR,
    CALLS_CLOSE,
    CALLS_OPEN,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    argument_value_json,
    to_json,
)
from dsv4.runtime.chat.holdback import partial_tag_length, split_emittable

_INVOKE_HEAD = re.compile(r'\s*name="([^"<>\n]+)">')
_PARAM_HEAD = re.compile(r'\s*name="([^"<>\n]+)"\s+string="(true|false)">')
_MAX_HEAD = 512  # a tag's attributes longer than this are not DSML


def _head_may_continue(text: str) -> bool:
    """Whether an incomplete tag head (no `>` yet) may still become a valid one."""
    return ">" not in text and "<" not in text and len(text) < _MAX_HEAD


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """One step of one call in the shape the openai SDK accumulates: the first delta of a call has its id
    and name (arguments ""), later ones only argument pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object


@dataclass
class ToolParseDelta:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def _tag_choice(text: str, tags: tuple[str, ...]) -> tuple[str | None, bool]:
    """(the tag `text` starts with after whitespace, or None; whether it may still become one of them)."""
    rest = text.lstrip()
    for tag in tags:
        if rest.startswith(tag):
            return tag, True
    return None, any(tag.startswith(rest) for tag in tags)


class ToolCallParser:
    """`feed(content_delta)` -> content and call deltas known so far; `finish()` at the end of the stream."""

    def __init__(self, call_id: Callable[[], str] = new_call_id):
        self._call_id = call_id
        self._buf = ""  # text received and not yet consumed
        self._state = "content"  # content | between | invoke_head | params | param_head | param_value | plain
        self._uncommitted = ""  # tag text consumed but not yet turned into output (content if malformed)
        self._block_calls = 0
        self._calls = 0
        self._params = 0  # parameters of the open call
        self._string_value = False
        self._value = ""  # a non-string parameter's text so far
        self._after_block = False
        self._out: ToolParseDelta = ToolParseDelta()

    # -- output helpers
    def _content(self, text: str) -> None:
        self._out.content += text

    def _args(self, piece: str) -> None:
        calls = self._out.calls
        if calls and calls[-1].index == self._calls - 1 and calls[-1].id is None:
            calls[-1].arguments += piece
        else:
            calls.append(ToolCallDelta(self._calls - 1, arguments=piece))

    def _consume(self, n: int) -> str:
        taken, self._buf = self._buf[:n], self._buf[n:]
        return taken

    def _malformed(self) -> None:
        """The block broke the grammar: close an open call's JSON, the rest of the stream is plain content."""
        self._close_open_call()
        self._content(self._uncommitted + self._buf)
        self._uncommitted, self._buf, self._state = "", "", "plain"

    def _close_open_call(self) -> None:
        if self._state == "param_value":
            self._args('"' if self._string_value else argument_value_json(self._value, False))
            self._value = ""
        if self._state in ("params", "param_head", "param_value"):
            self._args("}" if self._params else "{}")

    # -- states; each returns True when it made progress
    def _step_content(self) -> bool:
        if self._after_block:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._after_block = False
        start = self._buf.find(CALLS_OPEN)
        if start < 0:
            keep = partial_tag_length(self._buf, CALLS_OPEN)
            emit = self._buf[:len(self._buf) - keep]
            stripped = emit.rstrip()  # whitespace may be the separator before a block
            self._content(self._consume(len(stripped)))
            return False
        before = self._consume(start)
        sep = BLOCK_SEPARATOR if before.endswith(BLOCK_SEPARATOR) else ""
        self._content(before[:len(before) - len(sep)])
        self._uncommitted = sep + self._consume(len(CALLS_OPEN))
        self._block_calls, self._state = 0, "between"
        return True

    def _next_tag(self, tags: tuple[str, str]) -> tuple[str, str] | None:
        """(tag, text consumed through it) when the buffer starts with one of `tags` after whitespace; None
        while it may still become one (or after declaring the block malformed when it cannot)."""
        tag, possible = _tag_choice(self._buf, tags)
        if tag is None:
            if not possible:
                self._malformed()
            return None
        return tag, self._consume(self._buf.index(tag) + len(tag))

    def _head(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        """A complete tag head (`name="..." ...>`), consumed; None while incomplete or after malformed."""
        m = pattern.match(self._buf)
        if m is None:
            if not _head_may_continue(self._buf):
                self._malformed()
            return None
        self._consume(m.end())
        self._uncommitted = ""
        return m

    def _step_between(self) -> bool:
        found = self._next_tag((INVOKE_OPEN, CALLS_CLOSE))
        if found is None:
            return False
        if found[0] == INVOKE_OPEN:
            self._uncommitted += found[1]
            self._state = "invoke_head"
        else:
            self._uncommitted, self._state, self._after_block = "", "content", True
        return True

    def _step_invoke_head(self) -> bool:
        m = self._head(_INVOKE_HEAD)
        if m is None:
            return False
        self._calls += 1
        self._block_calls += 1
        self._params = 0
        self._out.calls.append(ToolCallDelta(self._calls - 1, self._call_id(), m.group(1), ""))
        self._state = "params"
        return True

    def _step_params(self) -> bool:
        found = self._next_tag((PARAMETER_OPEN, INVOKE_CLOSE))
        if found is None:
            return False
        if found[0] == PARAMETER_OPEN:
            self._uncommitted = found[1]
            self._state = "param_head"
        else:
            self._args("}" if self._params else "{}")
            self._state = "between"
        return True

    def _step_param_head(self) -> bool:
        m = self._head(_PARAM_HEAD)
        if m is None:
            return False
        self._string_value = m.group(2) == "true"
        self._args(("{" if self._params == 0 else ", ") + to_json(m.group(1)) + ": "
                   + ('"' if self._string_value else ""))
        self._params += 1
        self._value = ""
        self._state = "param_value"
        return True

    def _step_param_value(self) -> bool:
        end = self._buf.find(PARAMETER_CLOSE)
        if end < 0:
            text, self._buf = split_emittable(self._buf, PARAMETER_CLOSE)
        else:
            text = self._consume(end)
            self._consume(len(PARAMETER_CLOSE))
        if self._string_value:
            if text:
                self._args(to_json(text)[1:-1])
        else:
            self._value += text
        if end < 0:
            return False
        self._args('"' if self._string_value else argument_value_json(self._value, False))
        self._value = ""
        self._state = "params"
        return True

    def _run(self) -> None:
        steps = {"content": self._step_content, "between": self._step_between,
                 "invoke_head": self._step_invoke_head, "params": self._step_params,
                 "param_head": self._step_param_head, "param_value": self._step_param_value}
        while self._buf:
            if self._state == "plain":
                self._content(self._consume(len(self._buf)))
                return
            if not steps[self._state]():
                return

    def _take(self) -> ToolParseDelta:
        out, self._out = self._out, ToolParseDelta()
        return out

    def feed(self, delta: str) -> ToolParseDelta:
        self._buf += delta
        self._run()
        return self._take()

    def finish(self) -> ToolParseDelta:
        """End of stream: held-back text is content; a call cut short is closed; an unfinished block that
        holds no call is content."""
        if self._state in ("content", "plain"):
            if not self._after_block:
                self._content(self._consume(len(self._buf)))
        elif self._state in ("between", "invoke_head"):
            if self._block_calls == 0:
                self._content(self._uncommitted + self._buf)
        else:
            self._close_open_call()
        self._buf, self._uncommitted, self._state = "", "", "plain"
        return self._take()


def merge_tool_deltas(deltas: Iterable[ToolParseDelta]) -> tuple[str, list[ToolCall]]:
    """Accumulate deltas the way a client does: (content, complete calls in index order)."""
    content = ""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        content += d.content
        for c in d.calls:
            if c.index not in calls:
                calls[c.index] = ToolCall(c.index, c.id or "", c.name or "", "")
            calls[c.index].arguments += c.arguments
    return content, [calls[i] for i in sorted(calls)]


def parse_tool_calls(text: str, call_id: Callable[[], str] = new_call_id) -> tuple[str, list[ToolCall]]:
    """The whole content at once: the same result as feeding it in any chunks."""
    parser = ToolCallParser(call_id)
    return merge_tool_deltas([parser.feed(text), parser.finish()])

