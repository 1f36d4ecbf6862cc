"""Tool calls, reasoning and /tokenize through the real server and the real `openai` client (tiny model).

The server runs with the test-only forced-output hook (DSV4_TEST_FORCED_OUTPUT=1): a request's header makes
the model write a given text token by token, so the reasoning and DSML parsers see real model output
(one token per engine step, so every call arrives split over many stream chunks)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from dsv4.runtime.chat.dsml import render_tool_calls
from dsv4.runtime.server.forced_output import ENV, HEADER
from dsv4.runtime.server.launch import start_server
from dsv4.runtime.tokenizer import Tokenizer
from openai import OpenAI

KEY = "tools-key"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris and the time?"}]
CALLS = [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
         {"function": {"name": "get_time", "arguments": {}}}]
REASONING = "The user wants weather and time. I will call both tools."
CALL_OUTPUT = REASONING + "</think>Let me look that up." + render_tool_calls(CALLS)
ANSWER = "Sunny in Paris.</think>It is sunny in Paris, and the time is noon."


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xdg")  # a fresh built-in tiny model, with this code's tokenizer


@pytest.fixture(scope="module")
def server(cache_home):
    sp = start_server(["--max-num-seqs", "8"], env={"DSV4_API_KEY": KEY, ENV: "1", "XDG_CACHE_HOME": str(cache_home)})
    yield sp
    assert sp.stop() == 0, sp.log()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(server, cache_home) -> Tokenizer:
    return Tokenizer.from_dir(cache_home / "dsv4" / "models" / "tiny")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def force(text: str) -> dict[str, str]:
    return {HEADER: json.dumps(text)}


def _answer_messages(first) -> list[dict]:
    msg = first.choices[0].message
    results = {"get_weather": "sunny, 21 C", "get_time": "12:00"}
    return QUESTION + [
        {"role": "assistant", "content": msg.content, "reasoning_content": msg.reasoning_content,
         "tool_calls": [{"id": tc.id, "type": "function", "function": {
             "name": tc.function.name, "arguments": tc.function.arguments}} for tc in msg.tool_calls]},
        *({"role": "tool", "tool_call_id": tc.id, "content": results[tc.function.name]} for tc in msg.tool_calls)]


def test_tool_round_trip_non_streamed(server, client):
    first = client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=400,
                                           extra_headers=force(CALL_OUTPUT))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == REASONING
    assert choice.message.content == "Let me look that up."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris", "days": 3}, {}]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls) and calls[0].id != calls[1].id

    messages = _answer_messages(first)
    second = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=400,
                                            extra_headers=force(ANSWER))
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is sunny in Paris, and the time is noon."
    assert second.choices[0].message.reasoning_content == "Sunny in Paris."
    assert second.choices[0].message.tool_calls is None
    # the server saw the tool results: /tokenize of the same conversation is the prompt it used
    tk = httpx.post(server.base_url + "/tokenize", headers=_auth(), timeout=60,
                    json={"messages": messages, "tools": TOOLS, "return_token_strs": True}).json()
    assert tk["count"] == second.usage.prompt_tokens
    assert "sunny, 21 C" in "".join(tk["token_strs"]) and "12:00" in "".join(tk["token_strs"])


def test_tool_round_trip_streamed_accumulates_in_the_sdk(client):
    with client.chat.completions.stream(model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=400,
                                        extra_headers=force(CALL_OUTPUT)) as stream:
        chunks = [e.chunk for e in stream if e.type == "chunk"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == REASONING
    pieces = [tc for d in deltas for tc in d.tool_calls or []]
    heads = [tc for tc in pieces if tc.id is not None]
    assert [(h.index, h.function.name) for h in heads] == [(0, "get_weather"), (1, "get_time")]
    assert sum(1 for tc in pieces if tc.index == 0 and tc.function.arguments) > 1  # arguments in pieces
    assert not any("DSML" in (d.content or "") for d in deltas)  # never half a tag as content

    with client.chat.completions.stream(model="tiny", messages=_answer_messages(final), tools=TOOLS,
                                        max_tokens=400, extra_headers=force(ANSWER)) as stream:
        answer = stream.get_final_completion()
    assert answer.choices[0].message.content == "It is sunny in Paris, and the time is noon."
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_calls_become_content(client, stream):
    broken = "ok</think>Calling.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=get_weather>\n</｜DSML｜tool_calls>"
    if stream:
        with client.chat.completions.stream(model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=400,
                                            extra_headers=force(broken)) as s:
            out = s.get_final_completion()
    else:
        out = client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=400,
                                             extra_headers=force(broken))
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "stop" and not msg.tool_calls
    assert msg.content.startswith("Calling.") and "get_weather" in msg.content


def test_thinking_off_and_tool_choice_none(client):
    out = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=400,
        extra_body={"chat_template_kwargs": {"thinking": False}},
        extra_headers=force("Plain." + render_tool_calls(CALLS[:1])))
    msg = out.choices[0].message
    assert msg.reasoning_content is None and msg.tool_calls is None
    assert msg.content.startswith("Plain.") and "get_weather" in msg.content


def test_tool_choice_and_header_errors(server):
    def post(body, headers=None):
        return httpx.post(server.base_url + "/v1/chat/completions", headers={**_auth(), **(headers or {})},
                          json={"messages": QUESTION, "max_tokens": 2, **body}, timeout=60)

    r = post({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice" and "nope" in r.text
    r = post({"tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert post({}, {HEADER: "not json"}).status_code == 400


def test_tokenize_matches_the_chat_prompt_and_detokenize_inverts(server, client, tok):
    msgs = [{"role": "developer", "content": "Be terse."}] + QUESTION
    for extra in ({}, {"chat_template_kwargs": {"thinking": False}}, {"reasoning_effort": "max"}):
        r = httpx.post(server.base_url + "/tokenize", headers=_auth(), timeout=60,
                       json={"messages": msgs, "tools": TOOLS, **extra}).json()
        want = tok.encode_chat(msgs, True, tools=TOOLS, chat_template_kwargs=extra.get("chat_template_kwargs"),
                               reasoning_effort=extra.get("reasoning_effort"))
        assert r["tokens"] == want and r["count"] == len(want) and r["max_model_len"] > 0
        used = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=1,
                                              extra_body=extra)
        assert used.usage.prompt_tokens == r["count"]
    r = httpx.post(server.base_url + "/tokenize", headers=_auth(), json={"prompt": "hello world"}).json()
    assert r["tokens"] == tok.encode("hello world") and r["token_strs"] is None
    d = httpx.post(server.base_url + "/detokenize", headers=_auth(), json={"tokens": r["tokens"]}).json()
    assert d == {"prompt": "hello world"}
    bad = httpx.post(server.base_url + "/detokenize", headers=_auth(), json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(server.base_url + "/tokenize", json={"prompt": "x"}).status_code == 401
