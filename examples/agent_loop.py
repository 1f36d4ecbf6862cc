"""An agent loop against a `dsv4 serve` endpoint with the `openai` SDK: the model calls tools, the loop runs
them and sends the results back, until the model answers in plain text.

    dsv4 serve --model /models/DeepSeek-V4-Flash &          # or any OpenAI-compatible dsv4 endpoint
    python examples/agent_loop.py --base-url http://127.0.0.1:8000/v1 "What is the weather in Paris?"

Thinking is on by default (`message.reasoning_content` holds the reasoning); pass --no-thinking to turn it
off (`chat_template_kwargs: {"thinking": false}`), --effort low|high|max to set the reasoning effort.
Earlier turns' reasoning may be sent back as it came: the server leaves it out of the prompt.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from openai import OpenAI

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
]

# Stand-ins for real tools: a name -> function taking the decoded arguments object.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "get_weather": lambda city: {"city": city, "sky": "sunny", "celsius": 21},
    "add": lambda a, b: a + b,
}


def run_tool(name: str, arguments: str) -> str:
    """The tool's result as the text of a `tool` message (errors too: the model can react to them)."""
    try:
        return json.dumps(IMPLEMENTATIONS[name](**json.loads(arguments or "{}")))
    except Exception as e:  # a bad call goes back to the model as its result, the loop goes on
        return json.dumps({"error": f"{type(e).__name__}: {e}"})


def agent(client: OpenAI, model: str, question: str, max_turns: int, extra_body: dict[str, Any]) -> str:
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for _ in range(max_turns):
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, extra_body=extra_body)
        msg = reply.choices[0].message
        if getattr(msg, "reasoning_content", None):
            print(f"[reasoning] {msg.reasoning_content}")
        if reply.choices[0].finish_reason != "tool_calls" or not msg.tool_calls:
            return msg.content or ""
        messages.append({"role": "assistant", "content": msg.content,
                         "tool_calls": [tc.model_dump() for tc in msg.tool_calls]})
        for tc in msg.tool_calls:
            result = run_tool(tc.function.name, tc.function.arguments)
            print(f"[tool] {tc.function.name}({tc.function.arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
    return "(no answer within the turn limit)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("question", nargs="?", default="What is the weather in Paris, and what is 2 + 40?")
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    ap.add_argument("--max-turns", type=int, default=8)
    ap.add_argument("--no-thinking", action="store_true")
    ap.add_argument("--effort", choices=["low", "high", "max"], default=None)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    extra: dict[str, Any] = {}
    if args.no_thinking:
        extra["chat_template_kwargs"] = {"thinking": False}
    if args.effort:
        extra["reasoning_effort"] = args.effort
    print(agent(client, model, args.question, args.max_turns, extra))


if __name__ == "__main__":
    main()
