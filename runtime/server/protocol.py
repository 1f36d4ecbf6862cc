"""OpenAI request models (pydantic v2) and the mapping onto the engine's `SamplingParams`.

Unknown fields are rejected (`extra="forbid"`), so a typo never silently changes sampling. Extensions
beyond OpenAI follow vLLM's names: top_k, min_tokens, stop_token_ids, ignore_eos, priority,
include_stop_str_in_output.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from dsv4.runtime.engine.request import MAX_LOGPROBS, SamplingParams
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

MAX_N = 16
_Text = Annotated[str, Field(min_length=1)]


_TokenId = Annotated[int, Field(ge=0)]
_T = TypeVar("_T")
_NonEmpty = Annotated[_T, Field(min_length=1)]
_Ids = Annotated[list[_TokenId], Field(min_length=1)]


def _integral(v: Any) -> Any:
    """JSON Schema's integer includes 2.0: floats without a fraction become ints (also inside lists); strings,
    booleans and 2.5 stay errors for integer fields (the models are strict)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integral_floats(cls, v: Any) -> Any:
        return _integral(v)


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="Send a final chunk with token usage (default: true).")
    continuous_usage_stats: bool | None = Field(
        None, description="Sent by vLLM clients (guidellm): accepted; usage still comes once, in the final chunk.")


class _Sampling(_Strict):
    model: str | None = Field(None, description="Served model name (see /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: _Text | Annotated[list[_Text], Field(max_length=8)] | None = Field(None, description="Up to 8 stop strings.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # bounds exact in float64 (covering int64 and uint64; the sampler takes the seed mod 2**64): a client that
    # writes a boundary it computed in floating point (-2**63 prints as -9223372036854776000) stays inside them
    seed: int | None = Field(None, ge=-(10**19), le=2 * 10**19)
    user: str | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(
        None, description="Not supported: must be empty.")
    # vLLM-style extensions
    top_k: int = Field(0, ge=-1, description="Sample from the k most likely tokens (0 or -1: all).")
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[_TokenId] | None = None
    ignore_eos: bool = False
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="Lower values are scheduled first.")
    include_stop_str_in_output: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if len(v) > 8:
            raise ValueError(f"at most 8 stop strings, got {len(v)}")
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @property
    def include_usage(self) -> bool:
        return not (self.stream_options and self.stream_options.include_usage is False)

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=list(self.stop or []), stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            n=self.n, min_tokens=self.min_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
        )


class CompletionRequest(_Sampling):
    prompt: _Text | _NonEmpty[list[_Text]] | _NonEmpty[list[_TokenId]] | _NonEmpty[list[_Ids]] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists (none empty).")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate (default 16).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token (<= 20).")
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of == n is supported.")
    suffix: Annotated[str, Field(max_length=0)] | None = Field(None, description="Not supported: null or empty.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported by this server")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments as JSON text (an object).")


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = Field(None, description="tool messages: the id of the call this is the result of.")
    tool_calls: list[ToolCall] | None = Field(None, description="assistant messages: the calls it made.")
    reasoning_content: str | None = Field(
        None, description="assistant messages: their reasoning (left out of the prompt for earlier turns).")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as the chat encoding reads it: text content, optional fields only when given."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments object.")
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                    description="The JSON Schema the output must validate against.")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _format_type(v: Any) -> Any:
    return v.get("type") if isinstance(v, dict) else getattr(v, "type", None)


# tagged by "type", so an error names the member's fields, not the union's members
ResponseFormat = Annotated[Annotated[TextFormat, Tag("text")] | Annotated[JsonObjectFormat, Tag("json_object")]
                           | Annotated[JsonSchemaFormat, Tag("json_schema")], Discriminator(_format_type)]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1,
                                              description="Tokens to generate (default: up to max_model_len).")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = Field(
        None, description="text (default), json_object or json_schema: the output is constrained by a grammar.")
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="Functions the model may call (rendered into the system prompt).")
    tool_choice: ToolChoice | None = Field(
        None, description="none: never parse calls; auto (default with tools): the model decides; required / a "
                          "named function: the model must call (one of) them.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; the model may make several calls.")
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="Thinking effort: none = no thinking; minimal/low/medium -> low; high/xhigh -> high; max.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to the chat encoding: {\"thinking\": false} (or enable_thinking) turns thinking "
                          "off; drop_thinking (default true) leaves earlier turns' reasoning out.")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def response_format_dict(self) -> dict[str, Any] | None:
        """response_format as the encoding and the grammar compiler read it (None for plain text)."""
        rf = self.response_format
        return None if rf is None or rf.type == "text" else rf.model_dump(by_alias=True, exclude_none=True)

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tools(self) -> list[dict[str, Any]] | None:
        """The functions the output must call (tool_choice required: any of tools; named: that one), as
        {"name", "parameters"}; None when the model may answer without calling."""
        if self.tool_choice in (None, "none", "auto") or not self.tools:
            return None
        fns = [t.function for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            fns = [f for f in fns if f.name == self.tool_choice.function.name]
        return [{"name": f.name, "parameters": f.parameters} for f in fns]

    def tool_choice_error(self) -> str | None:
        """Why tool_choice cannot be honoured with these tools (None: it can)."""
        if self.tool_choice in (None, "none", "auto"):
            return None
        names = [t.function.name for t in self.tools or []]
        if not names:
            return f"tool_choice {self.tool_choice if isinstance(self.tool_choice, str) else 'function'} " \
                   "needs tools"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            return f"tool_choice names function {self.tool_choice.function.name!r}, which is not in tools"
        return None


class TokenizePromptRequest(_Strict):
    model: str | None = None
    prompt: str = Field(description="Text to tokenize as it is (no chat encoding).")
    add_special_tokens: bool = Field(False, description="Prepend BOS.")
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(False, description="Accepted (the chat encoding adds BOS itself).")
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[_TokenId]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    """The OpenAI error JSON shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- response shapes (documentation in /openapi.json; the handlers build plain dicts of these shapes) ------
class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Doc):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(_Doc):
    error: ErrorDetail


class PromptTokensDetails(_Doc):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache.")


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Doc):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: str | int | None = None


class CompletionResponse(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Doc):
    content: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(_Doc):
    name: str
    arguments: str


class ResponseToolCall(_Doc):
    id: str
    type: Literal["function"]
    function: ResponseFunctionCall


class ChatResponseMessage(_Doc):
    role: Literal["assistant"]
    content: str | None = None
    reasoning_content: str | None = Field(None, description="The model's reasoning (thinking mode).")
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Doc):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Doc):
    prompt: str


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


SSE_DOC = {"text/event-stream": {"schema": {  # one event (OpenAPI < 3.2: `schema` describes each event)
    "type": "object", "required": ["data"], "description": (
        "Server-sent events (`stream: true`): `data: <chunk JSON>` lines, the last `data: [DONE]`."),
    "properties": {"data": {"type": "string", "description": "A chunk object as JSON text, or [DONE]."},
                   "event": {"type": "string"}}}}}

ERRORS_V1: dict[int | str, dict[str, Any]] = {
    400: _err("Invalid request: the message names the field and the limit (also malformed JSON, a prompt over the "
              "context limit, a wrong type, an unknown field)."),
    401: _err("Missing or wrong API key (only when the server has one)."),
    404: _err("Unknown model."),
    408: _err("The request body did not arrive in time."),
    413: _err("Request body larger than max_body_bytes."),
    429: _err("Waiting queue full (max_queue); see the Retry-After header."),
    500: _err("Model failure."),
    503: _err("Draining (shutting down); see the Retry-After header."),
}
