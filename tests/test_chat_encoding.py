"""DeepSeek-V4's chat encoding (dsv4.runtime.chat.encoding), the request mapping (options) and the tokenizer's
choice of chat format.

Expected prompts come from DeepSeek's reference examples shipped with the V4 weights: `encoding/encoding_dsv4.py`
and its golden files `encoding/tests/test_input_{1,2,3,4}.json` -> `test_output_{n}.txt` (huggingface.co/
deepseek-ai/DeepSeek-V4-Flash; mirrored in vLLM as tests/tokenizers_/fixtures/deepseek_v4/). Cases 1, 3 are
those golden files verbatim; 2 is the reference's rules applied to test_input_2.json (vLLM's copy ships no
test_output_2.txt); 4 is test_input_4.json without its internal `task` field; the rest are small conversations
worked out by hand from the reference's rules (and vLLM's tests/tokenizers_/test_deepseek_v4.py for effort).
"""

from __future__ import annotations

import json

import pytest
from dsv4.runtime.chat.encoding import encode_messages
from dsv4.runtime.chat.options import ChatOptions, chat_options
from dsv4.runtime.config import tiny
from dsv4.runtime.tokenizer import Tokenizer, build_tokenizer, is_deepseek_v4_config, load_chat_template

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

# The effort prompts of encoding_dsv4.py (0731 revision: low adds nothing).
HIGH = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
        "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
        "scenarios.\n"
        "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
        "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
MAX = ("Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
       "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
       "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
       "resolve the underlying cause rather than any surface symptom.\n"
       "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
       "certain that no assumption remains unchecked and no error remains undiscovered.\n\n")

# The tools section of test_output_1.txt / test_output_3.txt around the schema lines.
TOOLS_HEAD = (
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by "
    "writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n"
    "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n")
TOOLS_TAIL = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"


def tools_block(*schemas: str) -> str:
    return TOOLS_HEAD + "\n".join(schemas) + TOOLS_TAIL


# -- test_input_1.json: a full tool round trip in thinking mode
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a specific location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
        "required": ["location"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web for information",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "Search query"},
        "num_results": {"type": "integer", "description": "Number of results to return"}},
        "required": ["query"]}}}
WEATHER_SCHEMA = ('{"name": "get_weather", "description": "Get the weather for a specific location", "parameters": '
                  '{"type": "object", "properties": {"location": {"type": "string", "description": "The city name"}, '
                  '"unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}}, '
                  '"required": ["location"]}}')
SEARCH_SCHEMA = ('{"name": "search", "description": "Search the web for information", "parameters": {"type": '
                 '"object", "properties": {"query": {"type": "string", "description": "Search query"}, '
                 '"num_results": {"type": "integer", "description": "Number of results to return"}}, '
                 '"required": ["query"]}}')
ROUND_TRIP = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Beijing?"},
    {"role": "assistant",
     "reasoning": "The user wants to know the weather in Beijing. I should use the get_weather tool.",
     "tool_calls": [{"id": "call_001", "type": "function", "function": {
         "name": "get_weather", "arguments": "{\"location\": \"Beijing\", \"unit\": \"celsius\"}"}}]},
    {"role": "tool", "tool_call_id": "call_001",
     "content": "{\"temperature\": 22, \"condition\": \"sunny\", \"humidity\": 45}"},
    {"role": "assistant", "reasoning": "Got the weather data. Let me format a nice response.",
     "content": "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity."},
]
ROUND_TRIP_OUT = (
    BOS + "You are a helpful assistant.\n\n" + tools_block(WEATHER_SCHEMA, SEARCH_SCHEMA)
    + U + "What's the weather in Beijing?" + A
    + "<think>The user wants to know the weather in Beijing. I should use the get_weather tool.</think>\n\n"
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    "<｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"unit\" string=\"true\">celsius</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS
    + U + "<tool_result>{\"temperature\": 22, \"condition\": \"sunny\", \"humidity\": 45}</tool_result>" + A
    + "<think>Got the weather data. Let me format a nice response.</think>"
    "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity." + EOS)

# -- test_input_2.json: multi-turn with reasoning; the earlier turn's reasoning is dropped
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "reasoning": "The user said hello, I should greet back.",
     "content": "Hi there! How can I help you?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "reasoning": "The user asks about the capital of France. It is Paris.",
     "content": "The capital of France is Paris."},
]
MULTI_TURN_OUT = (BOS + "You are a helpful assistant." + U + "Hello" + A + "</think>Hi there! How can I help you?"
                  + EOS + U + "What is the capital of France?" + A
                  + "<think>The user asks about the capital of France. It is Paris.</think>"
                  "The capital of France is Paris." + EOS)

# -- test_input_3.json: developer role carrying tools, latest_reminder, an id-less tool result
_DEFAULT_MINUS_ONE = {"type": "integer", "description": "", "default": -1}
DEV_TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "Web search. Split multiple queries with '||'.",
        "parameters": {"type": "object", "properties": {"queries": {"type": "string", "description": "query1||query2"}},
                       "required": ["queries"], "additionalProperties": False,
                       "$schema": "http://json-schema.org/draft-07/schema#"}}},
    {"type": "function", "function": {
        "name": "open", "description": "Batch open IDs (format 【{id}†...】) or URLs.",
        "parameters": {"type": "object", "properties": {"open_list": {"type": "array", "items": {
            "type": "object", "properties": {
                "id": {"description": "ID or URL", "anyOf": [{"type": "integer"}, {"type": "string"}], "default": -1},
                "cursor": _DEFAULT_MINUS_ONE,
                "loc": {"type": "integer", "description": "Start line", "default": -1},
                "num_lines": _DEFAULT_MINUS_ONE,
                "view_source": {"type": "boolean", "description": "", "default": False}},
            "additionalProperties": False}, "description": ""}},
            "required": ["open_list"], "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#"}}},
    {"type": "function", "function": {
        "name": "find", "description": "Find exact text pattern in pages.",
        "parameters": {"type": "object", "properties": {"find_list": {"type": "array", "items": {
            "type": "object", "properties": {"pattern": {"type": "string", "description": ""},
                                             "cursor": _DEFAULT_MINUS_ONE},
            "required": ["pattern"], "additionalProperties": False}, "description": ""}},
            "required": ["find_list"], "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#"}}},
]
DEV_SCHEMAS = (
    '{"name": "search", "description": "Web search. Split multiple queries with \'||\'.", "parameters": {"type": '
    '"object", "properties": {"queries": {"type": "string", "description": "query1||query2"}}, "required": '
    '["queries"], "additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}}',
    '{"name": "open", "description": "Batch open IDs (format 【{id}†...】) or URLs.", "parameters": {"type": "object", '
    '"properties": {"open_list": {"type": "array", "items": {"type": "object", "properties": {"id": {"description": '
    '"ID or URL", "anyOf": [{"type": "integer"}, {"type": "string"}], "default": -1}, "cursor": {"type": "integer", '
    '"description": "", "default": -1}, "loc": {"type": "integer", "description": "Start line", "default": -1}, '
    '"num_lines": {"type": "integer", "description": "", "default": -1}, "view_source": {"type": "boolean", '
    '"description": "", "default": false}}, "additionalProperties": false}, "description": ""}}, "required": '
    '["open_list"], "additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}}',
    '{"name": "find", "description": "Find exact text pattern in pages.", "parameters": {"type": "object", '
    '"properties": {"find_list": {"type": "array", "items": {"type": "object", "properties": {"pattern": {"type": '
    '"string", "description": ""}, "cursor": {"type": "integer", "description": "", "default": -1}}, "required": '
    '["pattern"], "additionalProperties": false}, "description": ""}}, "required": ["find_list"], '
    '"additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}}',
)
DEV_QUESTION = "小柴胡冲剂和布洛芬能一起吃吗？\n\nCITATION FORMAT: 【{cursor_id}†L{start_line_id}(-L{end_line_id})?】"
DEVELOPER = [
    {"role": "system", "content": "该助手为DeepSeek，由深度求索公司创造。"},
    {"role": "latest_reminder", "content": "2026-02-21,星期六,广州,App,中文"},
    {"role": "developer", "content": DEV_QUESTION, "tools": DEV_TOOLS},
    {"role": "assistant", "content": "", "reasoning": "用户想知道小柴胡冲剂和布洛芬能否一起服用。",
     "tool_calls": [{"type": "function", "function": {
         "name": "search", "arguments": "{\"queries\": \"小柴胡冲剂 布洛芬 相互作用 一起吃\"}"}}]},
    {"role": "tool", "content": "[0]"},
    {"role": "assistant", "content": "请及时就医。", "reasoning": "现在开始组织回答。", "tool_calls": []},
]
DEVELOPER_OUT = (
    BOS + "该助手为DeepSeek，由深度求索公司创造。<｜latest_reminder｜>2026-02-21,星期六,广州,App,中文"
    + U + DEV_QUESTION
    + "\n\n" + tools_block(*DEV_SCHEMAS) + A + "<think>用户想知道小柴胡冲剂和布洛芬能否一起服用。</think>\n\n"
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"search\">\n"
    "<｜DSML｜parameter name=\"queries\" string=\"true\">小柴胡冲剂 布洛芬 相互作用 一起吃</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS + U + "<tool_result>[0]</tool_result>" + A
    + "<think>现在开始组织回答。</think>请及时就医。" + EOS)

# -- test_input_4.json (chat mode), without the internal `task` field
SPRINGS = "关于热海大滚锅……\n\n| 维度 | 特点 |\n| :--- | :--- |\n希望这些信息能帮助你。"
CHAT_MODE = [
    {"role": "system", "content": "该助手为DeepSeek-V3，由深度求索公司创造。\n今天是2025年10月17日，星期五。"},
    {"role": "latest_reminder", "content": "2024-11-15,上海市,App,中文"},
    {"role": "user", "content": "热海大滚锅是世界著名温泉吗"},
    {"role": "assistant", "content": SPRINGS},
    {"role": "user", "content": "世界著名温泉有哪些"},
    {"role": "assistant", "content": "Search"},
]
CHAT_MODE_OUT = (BOS + "该助手为DeepSeek-V3，由深度求索公司创造。\n今天是2025年10月17日，星期五。"
                 "<｜latest_reminder｜>2024-11-15,上海市,App,中文" + U + "热海大滚锅是世界著名温泉吗" + A + "</think>"
                 + SPRINGS + EOS + U + "世界著名温泉有哪些" + A + "</think>Search" + EOS)

# -- small conversations by the same rules
HELLO = [{"role": "user", "content": "Hello"}]
PARALLEL = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "reasoning_content": "Two cities.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}},
        {"id": "b", "type": "function", "function": {"name": "get_weather",
                                                     "arguments": "{\"location\": \"Rome\", \"days\": 2}"}}]},
    {"role": "tool", "tool_call_id": "b", "content": "rain"},
    {"role": "tool", "tool_call_id": "a", "content": "sun"},
    {"role": "user", "content": "Thanks"},
]
PARALLEL_OUT = (BOS + "\n\n" + tools_block(WEATHER_SCHEMA) + U + "Weather in Paris and Rome?" + A
                + "<think>Two cities.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
                "<｜DSML｜parameter name=\"location\" string=\"true\">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
                "<｜DSML｜invoke name=\"get_weather\">\n"
                "<｜DSML｜parameter name=\"location\" string=\"true\">Rome</｜DSML｜parameter>\n"
                "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
                "</｜DSML｜tool_calls>" + EOS
                + U + "<tool_result>sun</tool_result>\n\n<tool_result>rain</tool_result>\n\nThanks" + A + "<think>")
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}

# (id, messages, request fields, expected prompt)
CASES = [
    ("round-trip-thinking-low", ROUND_TRIP, {"tools": [WEATHER, SEARCH], "reasoning_effort": "low"}, ROUND_TRIP_OUT),
    ("multi-turn-drops-reasoning", MULTI_TURN, {"reasoning_effort": "low"}, MULTI_TURN_OUT),
    ("developer-with-tools", DEVELOPER, {"chat_template_kwargs": {"thinking": True}, "reasoning_effort": "low"},
     DEVELOPER_OUT),
    ("chat-mode-multi-turn", CHAT_MODE, {"chat_template_kwargs": {"thinking": False}}, CHAT_MODE_OUT),
    ("default-is-thinking-high", HELLO, {}, BOS + HIGH + U + "Hello" + A + "<think>"),
    ("effort-low", HELLO, {"reasoning_effort": "low"}, BOS + U + "Hello" + A + "<think>"),
    ("effort-minimal", HELLO, {"reasoning_effort": "minimal"}, BOS + U + "Hello" + A + "<think>"),
    ("effort-medium", HELLO, {"reasoning_effort": "medium"}, BOS + U + "Hello" + A + "<think>"),
    ("effort-high", HELLO, {"reasoning_effort": "high"}, BOS + HIGH + U + "Hello" + A + "<think>"),
    ("effort-max", HELLO, {"reasoning_effort": "max"}, BOS + MAX + U + "Hello" + A + "<think>"),
    ("effort-none-is-chat", HELLO, {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}},
     BOS + U + "Hello" + A + "</think>"),
    ("thinking-false", HELLO, {"chat_template_kwargs": {"thinking": False}}, BOS + U + "Hello" + A + "</think>"),
    ("enable-thinking-false", HELLO, {"chat_template_kwargs": {"enable_thinking": False}},
     BOS + U + "Hello" + A + "</think>"),
    ("chat-mode-ignores-effort", HELLO, {"chat_template_kwargs": {"thinking": False}, "reasoning_effort": "max"},
     BOS + U + "Hello" + A + "</think>"),
    ("tools-synthesise-system-results-in-call-order", PARALLEL, {"tools": [WEATHER], "reasoning_effort": "low"},
     PARALLEL_OUT),
    ("tools-replace-system-tools", [{"role": "system", "content": "S", "tools": [SEARCH]}] + HELLO,
     {"tools": [WEATHER], "reasoning_effort": "low"},
     BOS + "S\n\n" + tools_block(WEATHER_SCHEMA) + U + "Hello" + A + "<think>"),
    ("response-format", [{"role": "system", "content": "S", "response_format": SCHEMA}] + HELLO,
     {"reasoning_effort": "low"},
     BOS + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
     + json.dumps(SCHEMA) + U + "Hello" + A + "<think>"),
    ("developer-dropped-before-last-user",
     [{"role": "developer", "content": "Be terse."}, {"role": "assistant", "content": "ok"}] + HELLO,
     {"reasoning_effort": "low"}, BOS + "ok" + EOS + U + "Hello" + A + "<think>"),
    ("consecutive-users-merge", [{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "text", "text": "b"}, {"type": "text", "text": "c"}]}], {"reasoning_effort": "low"},
     BOS + U + "a\n\nb\nc" + A + "<think>"),
]


def request_prompt(messages, fields, **kw):
    options = chat_options(fields.get("chat_template_kwargs"), fields.get("reasoning_effort"))
    return encode_messages(messages, options, tools=fields.get("tools"), **kw)


@pytest.mark.parametrize("messages,fields,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_prompt_matches_reference(messages, fields, expected):
    assert request_prompt(messages, fields) == expected


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return Tokenizer(build_tokenizer(tiny().vocab_size, seed=3))


@pytest.mark.parametrize("messages,fields,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tiny_tokenizer_encodes_each_prompt_exactly(tiny_tokenizer, messages, fields, expected):
    """What /tokenize returns: the prompt's ids, special and think / DSML tokens one id each, decoding back to
    the exact prompt."""
    tok = tiny_tokenizer
    ids = tok.encode_chat(messages, tools=fields.get("tools"), chat_template_kwargs=fields.get("chat_template_kwargs"),
                          reasoning_effort=fields.get("reasoning_effort"))
    assert ids == tok.encode(expected)
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    for token in ("<think>", "</think>", "｜DSML｜", "<｜User｜>", "<｜Assistant｜>", EOS):
        single = tok.encode(token)
        assert len(single) == 1
        assert ids.count(single[0]) == expected.count(token)


def test_think_and_dsml_survive_skipping_special_tokens(tiny_tokenizer):
    text = "a</think>b\n\n<｜DSML｜tool_calls>"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(BOS + text + EOS)) == text


@pytest.mark.parametrize("kwargs,effort,expected", [
    (None, None, ChatOptions(True, "high")),
    ({"thinking": True}, None, ChatOptions(True, "high")),
    ({"enable_thinking": True}, None, ChatOptions(True, "high")),
    ({"thinking": False}, None, ChatOptions(False, None)),
    ({"enable_thinking": False}, None, ChatOptions(False, None)),
    ({"thinking": False, "enable_thinking": True}, None, ChatOptions(True, "high")),
    (None, "none", ChatOptions(False, None)),
    (None, "minimal", ChatOptions(True, "low")),
    (None, "low", ChatOptions(True, "low")),
    (None, "medium", ChatOptions(True, "low")),
    (None, "high", ChatOptions(True, "high")),
    (None, "xhigh", ChatOptions(True, "high")),
    (None, "max", ChatOptions(True, "max")),
    ({"thinking": False}, "low", ChatOptions(False, "low")),
    ({"drop_thinking": False}, None, ChatOptions(True, "high", drop_thinking=False)),
])
def test_request_mapping_as_vllm(kwargs, effort, expected):
    assert chat_options(kwargs, effort) == expected


def test_keeping_reasoning_renders_every_turns_thinking():
    prompt = encode_messages(MULTI_TURN, ChatOptions(True, "low", drop_thinking=False))
    assert (U + "Hello" + A + "<think>The user said hello, I should greet back.</think>Hi there! How can I help you?"
            + EOS) in prompt


def test_add_generation_prompt_false_leaves_the_assistant_opening_out():
    assert encode_messages(HELLO, ChatOptions(False, None), add_generation_prompt=False) == BOS + U + "Hello"


def test_request_response_format_goes_to_the_first_system_message():
    prompt = encode_messages(HELLO, ChatOptions(False, None), response_format={"type": "json_object"})
    assert prompt == (BOS + "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                      '{"type": "json_object"}' + U + "Hello" + A + "</think>")


@pytest.mark.parametrize("messages,match", [
    ([{"role": "wizard", "content": "x"}], "unknown role"),
    ([{"role": "developer", "content": ""}], "developer message needs content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "function name"),
    ([{"role": "assistant", "tool_calls": ["f"]}], "function` object"),
    (["hello"], "not an object"),
    ([{"role": "system", "content": "s", "tools": ["f"]}], "each tool must be an object"),
])
def test_invalid_messages_are_value_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages)


def test_chat_format_choice(tmp_path, tiny_tokenizer):
    tiny_tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "CFG{{ messages[0]['content'] }}"}))
    hello = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(hello) == "CFGhi"  # no config.json: not known as V4
    (tmp_path / "chat_template.jinja").write_text("JINJA{{ messages[0]['content'] }}{{ tools[0].x }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(hello, tools=[{"x": 1}]) == "JINJAhi1"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV4ForCausalLM"]}))
    v4 = Tokenizer.from_dir(tmp_path)
    assert v4.uses_v4_encoding and v4.thinking() and not v4.thinking({"thinking": False})
    assert not v4.thinking(None, "none") and v4.thinking({"enable_thinking": True}, "low")
    v4_prompt = Tokenizer.from_dir(tmp_path).apply_chat_template(hello, reasoning_effort="low")
    assert v4_prompt == BOS + U + "hi" + A + "<think>"
    override = Tokenizer.from_dir(tmp_path, chat_template=load_chat_template("OVR{{ messages|length }}"))
    assert override.apply_chat_template(hello) == "OVR1" and not override.thinking()
    (tmp_path / "t.jinja").write_text("FILE")
    assert Tokenizer.from_dir(tmp_path).with_chat_template(load_chat_template(tmp_path / "t.jinja")) \
        .apply_chat_template(hello) == "FILE"
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(tmp_path / "missing.jinja")


def test_v4_config_recognition():
    assert is_deepseek_v4_config({"model_type": "deepseek_v4"})
    assert is_deepseek_v4_config({"architectures": ["DeepseekV4ForCausalLM"]})
    assert not is_deepseek_v4_config({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]})
    assert not is_deepseek_v4_config({})
    assert is_deepseek_v4_config(tiny().to_dict())  # the built-in tiny model uses V4's encoding
