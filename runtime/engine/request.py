"""Requests, their sampling parameters, and the sequences (one per choice) the scheduler moves around.

A `Request` is what a client asked for: prompt token ids + `SamplingParams`. It owns `n` `Sequence`s
(choice i samples with seed `seed + i`). A sequence's tokens are `prompt_ids + output_ids`;
`num_computed` of them have their KV rows in the cache pools (read from the cache's record of the sequence,
which is the one owner of that count). The scheduler computes
`tokens[num_computed:]` in chunks; when a chunk reaches the end of the known tokens, the model's
logits for the last row are sampled and the new token is appended (its KV is computed in the next step).
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field
from typing import Any

from dsv4.runtime.cache.tables import CacheRequest
from dsv4.runtime.engine.detok import TextState

MAX_LOGPROBS = 20
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily


class RequestError(ValueError):
    """A request that can never be served as asked; `field` names the offending parameter, `code` the HTTP status."""

    def __init__(self, message: str, field: str | None = None, code: int = 400):
        super().__init__(message)
        self.field = field
        self.code = code


@dataclass
class SamplingParams:
    """OpenAI sampling parameters. `temperature < 1e-5` (or `top_k == 1`) is greedy.

    Order of logit processing: penalties (on tokens generated so far), then temperature, top-k, top-p:
        l'[v] = l[v] - frequency_penalty * count[v] - presence_penalty * [count[v] > 0]
        p = softmax(l' / T), restricted to the k largest, then to the smallest set with cumulative mass >= top_p.
    Reported logprobs are log_softmax of the penalised logits before temperature (as vLLM reports them).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top-N alternatives per generated token (0 = only the chosen token)
    prompt_logprobs: int | None = None  # same for prompt tokens (completions echo + logprobs)
    n: int = 1
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    constraint: Any = None  # sampling.ConstraintSpec: which tokens each choice may sample (structured output)

    def validate(self, vocab_size: int | None = None) -> None:
        def need(cond: bool, msg: str, fld: str) -> None:
            if not cond:
                raise RequestError(msg, fld)

        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        need(0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        need(self.top_k == -1 or self.top_k >= 0, f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}",
             "top_k")
        need(-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        need(-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            need(v is None or 0 <= v <= MAX_LOGPROBS, f"{name} must be in [0, {MAX_LOGPROBS}], got {v}", name)
        need(1 <= self.n <= 16, f"n must be in [1, 16], got {self.n}", "n")
        need(0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}", "min_tokens")
        need(len(self.stop) <= 8, f"stop accepts at most 8 strings, got {len(self.stop)}", "stop")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty", "stop")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            need(not bad, f"stop_token_ids must be in [0, {vocab_size}), got {bad}", "stop_token_ids")

    @property
    def greedy(self) -> bool:
        """temperature below SAMPLING_EPS is greedy (vLLM's rule): l / T would overflow to inf and NaN."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Logprob of one token and its top alternatives (token id -> logprob), highest first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Sequence:
    """One choice of a request: the unit the scheduler and the cache manager see (`seq_id`)."""

    seq_id: str
    request: Request
    index: int
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    cache_state: CacheRequest | None = None  # the CacheManager's record while this sequence holds blocks
    generator: random.Random | None = None  # this choice's uniforms for sampling (sampling.make_generator)
    constraint: Any = None  # sampling.TokenConstraint of this choice (from params.constraint), made when first sampled
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_done: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    cached_tokens: int = 0  # prefix-cache hit of the first admission
    text_state: TextState | None = None  # engine thread
    token_counts: dict[int, int] = field(default_factory=dict)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    batching_wait: float | None = None  # how long the batching delay held this sequence back
    _all_ids: list[int] = field(default_factory=list, repr=False, compare=False)

    @property
    def tokens(self) -> list[int]:
        """prompt_ids + output_ids as one list, extended by the tokens appended since the last call (O(new
        tokens), not O(context) per step). The same list object every time: read it, never mutate it."""
        known = self._all_ids
        if not known:
            known.extend(self.prompt_ids)
        done = len(known) - len(self.prompt_ids)
        if done < len(self.output_ids):
            known.extend(self.output_ids[done:])
        return known

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        """Tokens whose KV rows are in the pools (0 while the sequence holds no cache)."""
        return self.cache_state.num_computed if self.cache_state is not None else 0

    @property
    def recompute_until(self) -> int:
        """Positions below this only rebuild swa/state rows (the prefix hit of the current admission)."""
        return self.cache_state.hit.cached_tokens if self.cache_state is not None else 0

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.request.params.prompt_logprobs is not None and not self.prompt_logprobs_done


@dataclass
class Request:
    """A client request as the engine sees it. `priority`: lower is served first (vLLM convention), then FCFS."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    sequences: list[Sequence] = field(default_factory=list)
    aborted: bool = False

    def __post_init__(self) -> None:
        if not self.sequences:
            self.sequences = [Sequence(f"{self.request_id}-{i}", self, i, list(self.prompt_ids))
                              for i in range(self.params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)


@dataclass
class SeqDelta:
    """What one step produced for one sequence: new token ids, newly released text, logprobs, finish."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    """One event on a request's stream. `finished` is set on the last one, with the usage counts."""

    request_id: str
    deltas: list[SeqDelta]
    finished: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
