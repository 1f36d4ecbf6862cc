"""DeepSeek-V4's chat encoding: OpenAI-style messages -> the prompt string, as DeepSeek's reference
`encoding/encoding_dsv4.py` (published beside the V4 weights; effort prompts of the 0731 revision, which
vLLM's `vllm/tokenizers/deepseek_v4_encoding.py` also follows) builds it.

    <｜begin▁of▁sentence｜>{effort prompt}{system}[\\n\\n{tools}][\\n\\n{response format}]
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{content}[\\n\\n{DSML tool calls}]<｜end▁of▁sentence｜>
    <｜User｜><tool_result>{result 1}</tool_result>\\n\\n<tool_result>{result 2}</tool_result><｜Assistant｜><think>

(one line per turn here; the prompt has no newlines between turns). Rules, in the reference's order:

- Tool messages become `<tool_result>` blocks of a user turn; consecutive tool and user messages merge into
  one user turn (blocks joined by a blank line) and results are ordered by the preceding assistant's call order.
- Request tools and response_format go into the first message when it is system / developer, otherwise into
  a synthesised system message placed first.
- Thinking mode: the generation prompt after the last user turn is `<think>`; earlier assistant turns lose
  their reasoning and are opened with `</think>` (`drop_thinking`; off as soon as any message has tools, and
  then every assistant turn keeps `<think>{reasoning}</think>`). Developer messages before the last user turn
  are dropped with it. Chat mode: always `</think>`, no reasoning rendered.
- The effort prompt (thinking mode only) comes right after BOS.
- `developer` renders as a user turn (`<｜User｜>`) that may carry tools / response_format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsv4.runtime.chat.dsml import (
    CALLS_CLOSE,
    CALLS_OPEN,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    render_tool_calls,
    to_json,
)
from dsv4.runtime.chat.options import ChatOptions
from dsv4.runtime.chat.special_tokens import ASSISTANT, BOS, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER

EFFORT_PROMPTS = {
    "low": "",
    "high": (
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
        "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
        "scenarios.\n"
        "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
        "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
    ),
    "max": (
        "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
        "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
        "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
        "resolve the underlying cause rather than any surface symptom.\n"
        "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
        "certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
    ),
}

TOOLS_PROMPT = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"{CALLS_OPEN}" block like the following:

{CALLS_OPEN}
{INVOKE_OPEN} name="$TOOL_NAME">
{PARAMETER_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN} name="$TOOL_NAME2">
...
{INVOKE_CLOSE}
{CALLS_CLOSE}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside \
{THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT_PROMPT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
_USER_ROLES = ("user", "developer")


@dataclass
class _Block:
    text: str
    tool_call_id: str | None = None  # set for a tool result

    def render(self) -> str:
        return self.text if self.tool_call_id is None else f"<tool_result>{self.text}</tool_result>"


@dataclass
class _Turn:
    role: str
    content: str = ""
    blocks: list[_Block] = field(default_factory=list)  # user turns
    reasoning: str = ""
    tool_calls: list[Mapping[str, Any]] = field(default_factory=list)
    tools: list[Mapping[str, Any]] = field(default_factory=list)
    response_format: Any = None


def content_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a content list joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"unsupported content part {kind!r}: only text parts are supported")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The `## Tools` section for OpenAI-format tools (`{"type": "function", "function": {...}}`)."""
    schemas = "\n".join(to_json(t.get("function", t)) for t in tools)
    return TOOLS_PROMPT.replace("{schemas}", schemas)


def _with_request_fields(messages: list[Any], tools: Sequence[Mapping[str, Any]] | None,
                         response_format: Any) -> list[Any]:
    """Request-level tools / response_format go onto a leading system or developer message (replacing what it
    carried), or onto a new empty system message put first."""
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = list(tools)
    if response_format is not None:
        extra["response_format"] = response_format
    if not extra:
        return messages
    if messages and isinstance(messages[0], Mapping) and messages[0].get("role") in ("system", "developer"):
        return [{**messages[0], **extra}] + messages[1:]
    return [{"role": "system", **extra}] + messages


def _turns(messages: list[Any]) -> list[_Turn]:
    """Validate messages and merge tool results (and user text that follows them) into user turns."""
    turns: list[_Turn] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role in ("tool", "user"):
            block = _Block(content_text(m.get("content")),
                           str(m.get("tool_call_id") or "") if role == "tool" else None)
            if turns and turns[-1].role == "user":
                turns[-1].blocks.append(block)
            else:
                turns.append(_Turn("user", blocks=[block]))
            continue
        turn = _Turn(role, content_text(m.get("content")), tools=list(m.get("tools") or []),
                     response_format=m.get("response_format"))
        if not all(isinstance(t, Mapping) for t in turn.tools):
            raise ValueError(f"messages[{i}]: each tool must be an object")
        if role == "developer" and not turn.content:
            raise ValueError(f"messages[{i}]: a developer message needs content")
        if role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            turn.reasoning = reasoning if isinstance(reasoning, str) else ""
            turn.tool_calls = list(m.get("tool_calls") or [])
            if not all(isinstance(tc, Mapping) and isinstance(tc.get("function"), Mapping) for tc in turn.tool_calls):
                raise ValueError(f"messages[{i}]: each tool call needs a `function` object")
        turns.append(turn)
    _order_tool_results(turns)
    return turns


def _order_tool_results(turns: list[_Turn]) -> None:
    """Within each user turn, tool results take the order of the latest assistant's tool calls (results whose
    id is unknown sort as the first call); other blocks keep their places."""
    order: dict[str, int] = {}
    for t in turns:
        if t.role == "assistant" and t.tool_calls:
            order = {str(tc["id"]): k for k, tc in enumerate(t.tool_calls) if tc.get("id")}
        elif t.role == "user" and order:
            results = [b for b in t.blocks if b.tool_call_id is not None]
            if len(results) > 1:
                ordered = iter(sorted(results, key=lambda b: order.get(b.tool_call_id or "", 0)))
                t.blocks = [next(ordered) if b.tool_call_id is not None else b for b in t.blocks]


def _last_user_index(turns: list[_Turn]) -> int:
    return max((i for i, t in enumerate(turns) if t.role in _USER_ROLES), default=-1)


def _drop_earlier_reasoning(turns: list[_Turn]) -> list[_Turn]:
    """Before the last user turn: assistant turns lose their reasoning and developer turns go away."""
    last_user = _last_user_index(turns)
    kept = []
    for i, t in enumerate(turns):
        if i >= last_user or t.role in ("user", "system", "latest_reminder"):
            kept.append(t)
        elif t.role == "assistant":
            kept.append(dataclasses.replace(t, reasoning=""))
    return kept


def _system_extras(t: _Turn) -> str:
    out = ""
    if t.tools:
        out += "\n\n" + render_tools(t.tools)
    if t.response_format:
        out += "\n\n" + RESPONSE_FORMAT_PROMPT.format(schema=to_json(t.response_format))
    return out


def encode_messages(messages: Sequence[Mapping[str, Any]], options: ChatOptions = ChatOptions(), *,
                    tools: Sequence[Mapping[str, Any]] | None = None, response_format: Any = None,
                    add_generation_prompt: bool = True) -> str:
    """The V4 prompt for OpenAI-style `messages` (roles system / developer / user / assistant / tool /
    latest_reminder; assistant `reasoning_content` (or `reasoning`) and `tool_calls`; tool `tool_call_id`).

    tools: the request's OpenAI tools. response_format: rendered into the prompt when given (vLLM's server does
    not pass the request's response_format here; the reference renders it when a message carries one).
    add_generation_prompt=False leaves out the `<｜Assistant｜>` opening after a final user turn.
    ValueError for messages the encoding cannot express."""
    msgs = _with_request_fields(list(messages), tools, response_format)
    turns = _turns(msgs)
    drop = options.drop_thinking and not any(t.tools for t in turns)
    if options.thinking and drop:
        turns = _drop_earlier_reasoning(turns)
    last_user = _last_user_index(turns)

    parts = [BOS]
    if options.thinking and turns and options.reasoning_effort is not None:
        parts.append(EFFORT_PROMPTS[options.reasoning_effort])
    for i, t in enumerate(turns):
        if t.role == "system":
            parts.append(t.content + _system_extras(t))
        elif t.role == "developer":
            parts.append(USER + t.content + _system_extras(t))
        elif t.role == "user":
            parts.append(USER + "\n\n".join(b.render() for b in t.blocks))
        elif t.role == "latest_reminder":
            parts.append(LATEST_REMINDER + t.content)
        else:  # assistant
            keeps_reasoning = options.thinking and (not drop or i > last_user)
            parts.append((t.reasoning + THINK_END if keeps_reasoning else "") + t.content
                         + (render_tool_calls(t.tool_calls) if t.tool_calls else "") + EOS)
        nxt = turns[i + 1].role if i + 1 < len(turns) else None
        if t.role in _USER_ROLES and nxt in ("assistant", "latest_reminder", None):
            if nxt is None and not add_generation_prompt:
                continue
            parts.append(ASSISTANT + (THINK_START if options.thinking and (not drop or i >= last_user) else THINK_END))
    return "".join(parts)
