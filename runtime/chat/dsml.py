"""DSML, DeepSeek-V4's tool-call markup, in both directions: an assistant's OpenAI `tool_calls` rendered
into the prompt, and one parsed DSML parameter turned back into a piece of JSON arguments.

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

`string="true"` values are raw text; `string="false"` values are JSON. An assistant turn puts the block
after its content, separated by a blank line (`BLOCK_SEPARATOR`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dsv4.runtime.chat.special_tokens import DSML

BLOCK_SEPARATOR = "\n\n"
CALLS_OPEN = f"<{DSML}tool_calls>"
CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"  # followed by ` name="..."`>
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"  # followed by ` name="..." string="true|false">`
PARAMETER_CLOSE = f"</{DSML}parameter>"


def to_json(value: Any) -> str:
    """JSON as DeepSeek's encoding writes it: `json.dumps` defaults, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def call_arguments(tool_call: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments object of an OpenAI tool call (`{"function": {"name", "arguments"}}`); `arguments` may be
    a JSON string (the wire format) or an already-decoded object. ValueError when it is not a JSON object."""
    raw = tool_call.get("function", {}).get("arguments", {})
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call arguments are not valid JSON: {e}") from None
    if not isinstance(raw, Mapping):
        raise ValueError("tool call arguments must be a JSON object")
    return dict(raw)


def render_parameter(name: str, value: Any) -> str:
    if isinstance(value, str):
        return f'{PARAMETER_OPEN} name="{name}" string="true">{value}{PARAMETER_CLOSE}'
    return f'{PARAMETER_OPEN} name="{name}" string="false">{to_json(value)}{PARAMETER_CLOSE}'


def render_invoke(tool_call: Mapping[str, Any]) -> str:
    name = tool_call.get("function", {}).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("tool call without a function name")
    params = "\n".join(render_parameter(k, v) for k, v in call_arguments(tool_call).items())
    return f'{INVOKE_OPEN} name="{name}">\n{params}\n{INVOKE_CLOSE}'


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block for an assistant message's OpenAI `tool_calls`, with its leading blank line."""
    invokes = "\n".join(render_invoke(tc) for tc in tool_calls)
    return f"{BLOCK_SEPARATOR}{CALLS_OPEN}\n{invokes}\n{CALLS_CLOSE}"


def argument_value_json(raw: str, is_string: bool) -> str:
    """One parameter's value as JSON text. A `string="false"` value that is not valid JSON is kept as a JSON
    string, so the arguments the parser emits are always valid JSON."""
    if is_string:
        return to_json(raw)
    try:
        json.loads(raw)
    except json.JSONDecodeError:
        return to_json(raw)
    return raw
