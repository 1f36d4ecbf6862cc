"""How an OpenAI chat request chooses DeepSeek-V4's encoding mode, mapped exactly as vLLM maps it
(vllm/tokenizers/deepseek_v4.py), so one request gives the same prompt on both servers.

- Thinking is on unless `chat_template_kwargs` carries `thinking` or `enable_thinking`; when either key is
  present, thinking is on iff one of them is truthy.
- `reasoning_effort`: `none` switches to chat mode; `max` -> max; `low` / `minimal` / `medium` -> low;
  any other string (`high`, `xhigh`, ...) -> high; absent -> high in thinking mode.
- `chat_template_kwargs.drop_thinking` (default true) drops earlier turns' reasoning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Effort = Literal["low", "high", "max"]
EFFORTS: tuple[Effort, ...] = ("low", "high", "max")
_LOW_ALIASES = ("low", "minimal", "medium")


@dataclass(frozen=True)
class ChatOptions:
    """thinking: the prompt ends in `<think>` (the model reasons first) rather than `</think>`.
    reasoning_effort: the effort prompt at the very start (thinking mode only; None = none at all).
    drop_thinking: earlier turns' reasoning is left out (ignored when any message carries tools)."""

    thinking: bool = True
    reasoning_effort: Effort | None = "high"
    drop_thinking: bool = True

    def __post_init__(self) -> None:
        if self.reasoning_effort is not None and self.reasoning_effort not in EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {EFFORTS} or None, got {self.reasoning_effort!r}")


def chat_options(chat_template_kwargs: Mapping[str, Any] | None = None,
                 reasoning_effort: str | None = None) -> ChatOptions:
    """The encoding options for a request's `chat_template_kwargs` and `reasoning_effort`."""
    kwargs = chat_template_kwargs or {}
    if "thinking" in kwargs or "enable_thinking" in kwargs:
        thinking = bool(kwargs.get("thinking")) or bool(kwargs.get("enable_thinking"))
    else:
        thinking = True
    effort: Effort | None
    if not isinstance(reasoning_effort, str):
        effort = "high" if thinking else None
    elif reasoning_effort == "none":
        thinking, effort = False, None
    elif reasoning_effort == "max":
        effort = "max"
    elif reasoning_effort in _LOW_ALIASES:
        effort = "low"
    else:
        effort = "high"
    return ChatOptions(thinking=thinking, reasoning_effort=effort,
                       drop_thinking=bool(kwargs.get("drop_thinking", True)))
