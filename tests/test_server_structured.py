"""Structured output through the real server and the `openai` client on the random tiny model:
response_format json_schema / json_object and tool_choice required / named, enforced by xgrammar token
masks in the sampler (a random model writes valid output only because of them)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from dsv4.runtime.server.launch import start_server
from openai import OpenAI

# Strings are bounded so a random model ends them; by ASCII patterns because a random model also writes byte
# tokens that never form UTF-8 (decoded as U+FFFD, which changes a string's length in characters).
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "admin", "tags"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z ]{1,10}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "admin": {"type": "boolean"},
                         "role": {"enum": ["user", "owner"]},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "pattern": "^[A-Za-z0-9_]{0,6}$"}}}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
NO_THINKING = {"chat_template_kwargs": {"thinking": False}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "Describe a user as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    xdg = tmp_path_factory.mktemp("xdg")  # a fresh built-in tiny model, with this code's tokenizer
    sp = start_server(["--max-num-seqs", "64"], env={"XDG_CACHE_HOME": str(xdg)})
    yield sp
    assert sp.stop() == 0, sp.log()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)


def test_json_schema_output_validates_for_100_seeded_requests(client):
    def one(seed: int) -> tuple[str, str]:
        r = client.chat.completions.create(model="tiny", messages=ASK, response_format=JSON_SCHEMA, seed=seed,
                                           temperature=1.0, max_tokens=400, extra_body=NO_THINKING)
        return r.choices[0].finish_reason, r.choices[0].message.content

    def free(seed: int) -> str:  # unconstrained rows in the same batches stay unconstrained
        r = client.chat.completions.create(model="tiny", messages=ASK, seed=seed, max_tokens=8,
                                           extra_body={**NO_THINKING, "ignore_eos": True})
        return r.choices[0].message.content

    with ThreadPoolExecutor(24) as ex:
        plain = ex.map(free, range(8))
        outs = list(ex.map(one, range(100)))
    for reason, text in outs:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for _, text in outs}) > 10  # seeded sampling, not one forced answer
    assert any(not text.lstrip().startswith("{") for text in plain)


def test_json_schema_streamed_and_json_object(client):
    chunks = client.chat.completions.create(model="tiny", messages=ASK, response_format=JSON_SCHEMA, seed=7,
                                            max_tokens=400, stream=True, extra_body=NO_THINKING)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                           seed=seed, max_tokens=64, extra_body=NO_THINKING)
        text = r.choices[0].message.content
        assert text.lstrip()[:1] in ("{", "[")
        if r.choices[0].finish_reason == "stop":
            json.loads(text)


def test_schema_that_cannot_compile_is_a_400_naming_the_field(server):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/definitions/missing"}}}}}
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                   json={"messages": ASK, "response_format": bad, "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"
    assert "missing" in r.json()["error"]["message"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_tool_choice_forces_a_call(client, choice):
    for seed in range(6):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed,
                                           max_tokens=1500, parallel_tool_calls=False, extra_body=NO_THINKING)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message
        names = [tc.function.name for tc in c.message.tool_calls]
        assert len(names) == 1
        assert names[0] == "get_time" if isinstance(choice, dict) else names[0] in ("get_weather", "get_time")
        assert isinstance(json.loads(c.message.tool_calls[0].function.arguments), dict)
