"""The grammars of runtime/server/structured.py on the tiny tokenizer, driven by the real sampler over random
logits: what they let through is what the API promises."""

from __future__ import annotations

import json

import pytest
import torch
from dsv4.runtime.chat.completion_parser import parse_completion
from dsv4.runtime.engine.request import SamplingParams
from dsv4.runtime.engine.sampling import RowSpec, make_generator, sample
from dsv4.runtime.server.build import ensure_tiny_model
from dsv4.runtime.server.errors import APIError
from dsv4.runtime.server.structured import GrammarCompiler
from dsv4.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")  # written by this code: its tokenizer keeps </think> when decoding
    ensure_tiny_model(path, say=lambda *_: None)
    return Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def grammars(tok):
    return GrammarCompiler(tok, tok.vocab_size)


def generate(tok, spec, seed: int, max_steps: int = 3000) -> str:
    row = RowSpec(SamplingParams(temperature=1.0), make_generator(seed), {}, [], None, spec.start())
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        [t], _ = sample(torch.randn(1, tok.vocab_size, generator=gen), [row])
        if t in tok.stop_token_ids:
            return tok.decode(ids)
        ids.append(t)
    raise AssertionError(f"no stop token in {max_steps} steps: {tok.decode(ids)!r}")


def test_length_bounded_strings_stay_json(tok, grammars):
    """xgrammar 0.2.8 alone lets maxLength strings hold raw control characters and quotes (invalid JSON)."""
    spec = grammars.compile({"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 5}}}}, thinking=False)
    for seed in range(10):
        value = json.loads(generate(tok, spec, seed))  # raises on a raw control character
        assert isinstance(value, list) and all(isinstance(x, str) for x in value)


def test_required_tool_choice_grammar_yields_parsable_calls(tok, grammars):
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}, "days": {}}}},
             {"name": "get_time", "parameters": {"type": "object"}}]
    for seed in range(6):
        for parallel in (False, True):
            text = generate(tok, grammars.compile_tool_choice(tools, parallel, thinking=False), seed)
            parsed = parse_completion(text, thinking=False)
            assert parsed.content == "" and parsed.tool_calls, text
            assert parallel or len(parsed.tool_calls) == 1
            for call in parsed.tool_calls:
                assert call.name in ("get_weather", "get_time")
                args = json.loads(call.arguments)
                assert set(args) <= ({"city", "days"} if call.name == "get_weather" else set(args))
    spec = grammars.compile_tool_choice(tools[1:], False, thinking=True)
    reasoning = parse_completion(generate(tok, spec, 0), thinking=True)
    assert [c.name for c in reasoning.tool_calls] == ["get_time"]


def test_uncompilable_schema_names_the_field(grammars):
    with pytest.raises(APIError) as e:
        grammars.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, False)
    assert e.value.status == 400 and e.value.param == "response_format.json_schema.schema"
    assert "nope" in e.value.message
