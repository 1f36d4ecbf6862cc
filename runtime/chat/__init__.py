"""DeepSeek-V4's chat protocol as pure functions: the prompt encoding (`encoding`), the request mapping
(`options`), and incremental parsers for the model's output (`reasoning_parser`, `tool_parser`,
`completion_parser`). docs/serving.md "Chat encoding" describes the format."""

from dsv4.runtime.chat.completion_parser import (
    CompletionDelta,
    CompletionParser,
    ParsedCompletion,
    merge_completion_deltas,
    parse_completion,
)
from dsv4.runtime.chat.encoding import encode_messages
from dsv4.runtime.chat.options import ChatOptions, chat_options
from dsv4.runtime.chat.tool_parser import ToolCall, ToolCallDelta

__all__ = ["ChatOptions", "CompletionDelta", "CompletionParser", "ParsedCompletion", "ToolCall", "ToolCallDelta",
           "chat_options", "encode_messages", "merge_completion_deltas", "parse_completion"]
