"""A chat request's prompt and how its output is read: the chat encoding's token ids, whether the prompt opens
the reasoning (thinking mode), and whether tool calls are parsed out of the output. Shared by
/v1/chat/completions and /tokenize, so both see exactly the same prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsv4.runtime.chat.completion_parser import CompletionParser
from dsv4.runtime.server.errors import APIError
from dsv4.runtime.server.protocol import ChatMessage, Tool


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    thinking: bool  # the prompt ends in <think>: the output starts with reasoning_content
    parse_tools: bool  # DSML tool calls in the output become tool_calls

    def parser(self) -> CompletionParser:
        return CompletionParser(self.thinking, self.parse_tools)


def encode_chat(tok: Any, messages: Sequence[ChatMessage], tools: Sequence[Tool] | None,
                chat_template_kwargs: dict[str, Any] | None, reasoning_effort: str | None,
                add_generation_prompt: bool, parse_tools: bool = False) -> ChatPrompt:
    """The prompt of a chat request; a conversation the chat format cannot express is a 400 naming messages.
    response_format is not rendered into the prompt (as vLLM maps requests): the grammar enforces it."""
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    try:
        ids = tok.encode_chat([m.for_template() for m in messages], add_generation_prompt, tools=tool_dicts,
                              chat_template_kwargs=chat_template_kwargs, reasoning_effort=reasoning_effort)
    except (ValueError, TypeError, LookupError) as e:  # the encoding's and a jinja template's refusals
        raise APIError(400, str(e), param="messages") from None
    thinking = add_generation_prompt and tok.thinking(chat_template_kwargs, reasoning_effort)
    return ChatPrompt(ids, thinking, parse_tools and bool(tools))
