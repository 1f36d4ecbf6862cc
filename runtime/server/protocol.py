"""OpenAI request models (pydantic v2) and the mapping onto the engine's `SamplingParams`.

Unknown fields are rejected (`extra="forbid"`), so a typo never silently changes sampling. Extensions
beyond OpenAI follow vLLM's names: top_k, min_tokens, stop_token_ids, ignore_eos, priority,
include_stop_str_in_output.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from dsv4.runtime.engine.request import MAX_LOGPROBS, SamplingParams
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="Send a final chunk with token usage (default: true).")


class _Sampling(_Strict):
    model: str | None = Field(None, description="Served model name (see /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 8 stop strings.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be empty.")
    # vLLM-style extensions
    top_k: int = Field(0, ge=-1, description="Sample from the k most likely tokens (0 or -1: all).")
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    priority: int = Field(0, description="Lower values are scheduled first.")
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
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists.")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate (default 16).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token (<= 20).")
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, description="Not supported: must be null.")

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


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1,
                                              description="Tokens to generate (default: up to max_model_len).")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    response_format: dict[str, Any] | None = Field(None, description="Only {\"type\": \"text\"} is supported.")

    @field_validator("response_format")
    @classmethod
    def _fmt(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type", "text") != "text":
            raise ValueError(f"response_format type {v.get('type')!r} is not supported (only 'text')")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    """The OpenAI error JSON shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
