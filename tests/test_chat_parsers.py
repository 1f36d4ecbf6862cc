"""Incremental reasoning / DSML tool-call parsing (dsv4.runtime.chat.*_parser): any chunking of a completion
accumulates to exactly what the one-shot parse gives, calls stream in the openai SDK's delta shape, and
malformed DSML becomes plain content without raising."""

from __future__ import annotations

import itertools
import json

import pytest
from dsv4.runtime.chat.completion_parser import (
    CompletionParser,
    ParsedCompletion,
    merge_completion_deltas,
    parse_completion,
)
from dsv4.runtime.chat.dsml import render_tool_calls
from dsv4.runtime.chat.reasoning_parser import ReasoningParser, parse_reasoning
from dsv4.runtime.chat.tool_parser import ToolCall, ToolCallParser, parse_tool_calls
from hypothesis import given, settings
from hypothesis import strategies as st

D = "｜DSML｜"


def counter_ids():
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def stream(text: str, cuts: list[int], thinking: bool = True, parse_tools: bool = True):
    """Feed `text` cut at `cuts`; (accumulated result, the deltas)."""
    parser = CompletionParser(thinking, parse_tools, counter_ids())
    bounds = [0, *sorted(cuts), len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in itertools.pairwise(bounds)] + [parser.finish()]
    return merge_completion_deltas(deltas), deltas


def assert_every_split_agrees(text: str, expected: ParsedCompletion, thinking: bool = True,
                              parse_tools: bool = True) -> None:
    assert parse_completion(text, thinking, parse_tools, counter_ids()) == expected
    for cut in range(len(text) + 1):
        assert stream(text, [cut], thinking, parse_tools)[0] == expected, f"split at {cut}: {text[:cut]!r}"
    assert stream(text, list(range(len(text))), thinking, parse_tools)[0] == expected  # one character per chunk


# What V4 writes for a thinking turn that calls two tools (the format of encoding_dsv4.py's test_output_1.txt).
TWO_CALLS = (
    "The user wants the weather.</think>Let me check.\n\n"
    f"<{D}tool_calls>\n<{D}invoke name=\"get_weather\">\n"
    f"<{D}parameter name=\"location\" string=\"true\">Bei\"jing\n{{x}}</{D}parameter>\n"
    f"<{D}parameter name=\"days\" string=\"false\">[1, 2]</{D}parameter>\n</{D}invoke>\n"
    f"<{D}invoke name=\"search\">\n</{D}invoke>\n</{D}tool_calls>")
TWO_CALLS_PARSED = ParsedCompletion(
    "The user wants the weather.", "Let me check.",
    [ToolCall(0, "call_0", "get_weather", '{"location": "Bei\\"jing\\n{x}", "days": [1, 2]}'),
     ToolCall(1, "call_1", "search", "{}")])


def test_two_calls_at_every_split_point():
    assert_every_split_agrees(TWO_CALLS, TWO_CALLS_PARSED)
    assert [json.loads(c.arguments) for c in TWO_CALLS_PARSED.tool_calls] == [
        {"location": "Bei\"jing\n{x}", "days": [1, 2]}, {}]


def test_every_two_cut_chunking_of_a_call():
    text = (f"ok\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n"
            f"<{D}parameter name=\"a\" string=\"true\">x<y</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>")
    expected = ParsedCompletion("", "ok", [ToolCall(0, "call_0", "f", '{"a": "x<y"}')])
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            assert stream(text, [i, j], thinking=False)[0] == expected, (i, j)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_chunkings_agree(data):
    cuts = data.draw(st.lists(st.integers(0, len(TWO_CALLS)), max_size=30))
    assert stream(TWO_CALLS, cuts)[0] == TWO_CALLS_PARSED


def test_call_deltas_have_the_openai_sdk_shape():
    """Per call: the first delta carries index, id and name (arguments ""), later ones only argument pieces;
    string values stream while they are written."""
    _, deltas = stream(TWO_CALLS, list(range(len(TWO_CALLS))))
    calls = [c for d in deltas for c in d.tool_calls]
    for index in (0, 1):
        mine = [c for c in calls if c.index == index]
        assert mine[0].id == f"call_{index}" and mine[0].name and mine[0].arguments == ""
        assert all(c.id is None and c.name is None for c in mine[1:])
    assert len([c for c in calls if c.index == 0]) > 10  # arguments came in many pieces
    assert [c.index for c in calls] == sorted(c.index for c in calls)  # call 1 starts after call 0 is done


def test_no_chunk_ends_in_half_a_tag():
    """Content and reasoning deltas never carry a piece of `</think>` or of the DSML block."""
    _, deltas = stream(TWO_CALLS, list(range(len(TWO_CALLS))))
    for d in deltas:
        assert "<" not in d.reasoning and "<" not in d.content and "｜" not in d.content
        assert not d.content.endswith("\n")  # the blank line before the block is a separator, not content


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(
    st.text(st.characters(blacklist_characters='"<>\n'), min_size=1, max_size=8),
    st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
              st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)),
    max_size=4), min_size=1, max_size=3), st.text(max_size=20))
def test_rendered_calls_parse_back_to_their_arguments(args_list, content):
    """The DSML the encoder writes for an assistant's tool calls parses back to the same calls."""
    content = content.replace("<", "(")
    calls = [{"function": {"name": f"tool_{i}", "arguments": json.dumps(a)}} for i, a in enumerate(args_list)]
    text = content + render_tool_calls(calls)
    parsed = parse_tool_calls(text, counter_ids())
    assert parsed[0] == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed[1]] == [(f"tool_{i}", a) for i, a in enumerate(args_list)]


@pytest.mark.parametrize("text,expected", [
    # a misspelt attribute: the whole block is content
    (f"Hi\n\n<{D}tool_calls>\n<{D}invoke nome=\"f\">\n</{D}invoke>\n</{D}tool_calls>",
     ("Hi\n\n" + f"<{D}tool_calls>\n<{D}invoke nome=\"f\">\n</{D}invoke>\n</{D}tool_calls>", [])),
    # text where an invoke should start
    (f"<{D}tool_calls>\nplease call f", (f"<{D}tool_calls>\nplease call f", [])),
    # cut off inside the invoke head: content
    (f"Hi\n\n<{D}tool_calls>\n<{D}invoke na", (f"Hi\n\n<{D}tool_calls>\n<{D}invoke na", [])),
    # cut off inside a string value: the call is closed with what arrived
    (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"a\" string=\"true\">abc</{D}para",
     ("", [("f", {"a": "abc"})])),
    # cut off inside a JSON value
    (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"n\" string=\"false\">[1, 2",
     ("", [("f", {"n": "[1, 2"})])),
    # a non-JSON value marked string="false" is kept as a string
    (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"n\" string=\"false\">two</{D}parameter>\n"
     f"</{D}invoke>\n</{D}tool_calls>", ("", [("f", {"n": "two"})])),
    # a bad parameter head after a good one: the call is closed, the rest is content
    (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"a\" string=\"true\">1</{D}parameter>\n"
     f"<{D}parameter name=\"b\" string=\"maybe\">2</{D}parameter>",
     (f"\n<{D}parameter name=\"b\" string=\"maybe\">2</{D}parameter>", [("f", {"a": "1"})])),
    # garbage after a complete call: the call stands, the garbage is content
    (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n</{D}invoke>\nand then", ("\nand then", [("f", {})])),
    # text after the block is content again
    (f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n</{D}invoke>\n</{D}tool_calls>\n\nDone.", ("Done.", [("f", {})])),
    # look-alikes that are plain text
    ("a < b and <｜DSML｜ alone", ("a < b and <｜DSML｜ alone", [])),
    ("ends in a tag start <｜DSML｜tool", ("ends in a tag start <｜DSML｜tool", [])),
    ("trailing blank lines\n\n", ("trailing blank lines\n\n", [])),
])
def test_malformed_dsml_becomes_content(text, expected):
    content, calls = expected
    got = parse_completion(text, thinking=False, call_id=counter_ids())
    assert (got.content, [(c.name, json.loads(c.arguments)) for c in got.tool_calls]) == (content, calls)
    assert got.reasoning == "" and [c.id for c in got.tool_calls] == [f"call_{i}" for i in range(len(calls))]
    assert_every_split_agrees(text, got, thinking=False)


def test_reasoning_split():
    assert parse_reasoning("think hard</think>answer", thinking=True).__dict__ == {
        "reasoning": "think hard", "content": "answer"}
    assert parse_reasoning("cut off while thinking </thi", thinking=True).__dict__ == {
        "reasoning": "cut off while thinking </thi", "content": ""}
    assert parse_reasoning("plain</think>x", thinking=False).__dict__ == {"reasoning": "", "content": "plain</think>x"}
    parser = ReasoningParser(thinking=True)
    assert [parser.feed(c).__dict__ for c in ("ab</", "thi", "nk>c", "d")] == [
        {"reasoning": "ab", "content": ""}, {"reasoning": "", "content": ""}, {"reasoning": "", "content": "c"},
        {"reasoning": "", "content": "d"}]


def test_dsml_inside_reasoning_stays_reasoning():
    text = f"maybe <{D}tool_calls> later</think>ok"
    assert_every_split_agrees(text, ParsedCompletion(f"maybe <{D}tool_calls> later", "ok", []))


def test_without_tools_dsml_is_content():
    text = f"x\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n</{D}invoke>\n</{D}tool_calls>"
    assert_every_split_agrees(text, ParsedCompletion("", text, []), thinking=False, parse_tools=False)


def test_call_ids_are_unique_by_default():
    parser = ToolCallParser()
    text = f"<{D}tool_calls>\n<{D}invoke name=\"f\">\n</{D}invoke>\n<{D}invoke name=\"g\">\n</{D}invoke>\n" \
           f"</{D}tool_calls>"
    ids = [c.id for c in parser.feed(text).calls if c.id]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_a_stop_token_left_in_the_text_is_dropped():
    text = "why</think>because<｜end▁of▁sentence｜>"
    assert_every_split_agrees(text, ParsedCompletion("why", "because", []))
    assert parse_completion("no end of reasoning<｜end▁of▁sentence｜>", thinking=True) == ParsedCompletion(
        "no end of reasoning", "", [])
