"""The scheduler: which sequences run in the next step and how many tokens each computes.

One step has a token budget B (`max_num_batched_tokens`) and a cap on running sequences. Order of service
is (priority, arrival time, choice index): lower priority values first, then first come, first served.

1. Running sequences first, in service order: each gets min(uncomputed tokens, chunk cap, budget left)
   tokens (1 for a decoding sequence). Their blocks are allocated through the CacheManager; when a pool
   is full, the chunk is halved (down to 1 token); if even that fails, the running sequence last in service
   order is preempted (its cache freed, requeued at the head of the waiting queue, recomputed later), until
   the allocation succeeds or the sequence itself is the last one (then it is preempted).
2. Then waiting sequences, while budget and sequence slots remain and nothing was preempted this step:
   on first admission the CacheManager is asked for a prefix hit; computation starts at `recompute_from`
   with `recompute_until = cached_tokens` (tokens in between only rebuild sliding-window/state rows).
   A prompt longer than the budget is split into chunks over several steps (chunked prefill).

Batching delay D: a fresh request (never scheduled) is held back while it has waited less than D and the
fresh prefill work pending is below the budget, so that short bursts are prefilled together; running
decodes continue meanwhile. `SchedulerOutput.wake_at` tells the engine when the hold expires.

The scheduler owns every cache call of a step: `start` / `allocate` / `free` (preemption) while scheduling,
and, after the forward, `update_from_output`: commit what each sequence computed, then free the sequences
that finished.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.engine.request import SeqStatus, Sequence


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    batching_delay_s: float = 0.0
    chunked_prefill_size: int | None = None  # largest prefill chunk of one sequence per step (None: the budget)

    def validate(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.batching_delay_s < 0:
            raise ValueError(f"batching delay must be >= 0, got {self.batching_delay_s * 1000:g} ms")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1, got {self.chunked_prefill_size}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= seq.num_computed when scheduled)
    num_tokens: int
    sample: bool  # the chunk reaches the last known token: sample the next one
    prompt_logprobs: bool  # return logits of every row of this chunk (echo + logprobs)
    recompute_until: int = 0  # positions below this only rebuild swa/state rows (the admission's prefix hit)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    wake_at: float | None = None  # batching delay holds work back until this time (monotonic)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled if not (s.sample and s.num_tokens == 1
                                                                and not s.seq.in_prefill))

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def service_key(seq: Sequence) -> tuple[int, float, str, int]:
    r = seq.request
    return (r.priority, r.arrival_time, r.request_id, seq.index)


class Scheduler:
    """Holds the waiting and running sequences; all cache bookkeeping of a step goes through here."""

    def __init__(self, config: SchedulerConfig, cache: CacheManager):
        config.validate()
        self.config = config
        self.cache = cache
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq.cache_state is not None:
            self.cache.free(seq.seq_id)
            seq.cache_state = None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)  # computed from scratch (or a prefix hit) when admitted again
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, seq)
        out.preempted.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------------
    def _chunk(self, seq: Sequence, budget: int) -> int:
        left = seq.num_uncomputed
        n = min(left, budget)
        cap = self.config.chunked_prefill_size
        if cap is not None and left > 1:
            n = min(n, cap)
        return n

    def _allocate(self, seq: Sequence, n: int) -> int:
        """Allocate blocks for the next n tokens, halving the chunk while the pools cannot take it (a long
        prefill chunk needs many token-pool blocks at once). Returns the tokens allocated, 0 if not even 1."""
        while n >= 1:
            if self.cache.allocate(seq.seq_id, seq.num_computed + n):
                return n
            n //= 2
        return 0

    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed
        return ScheduledSeq(seq, start, n, sample=start + n == seq.num_tokens,
                            prompt_logprobs=seq.wants_prompt_logprobs, recompute_until=seq.recompute_until)

    def _start(self, seq: Sequence) -> None:
        """Register with the CacheManager; computation starts where the prefix hit lets it. Prompt logprobs need
        logits of every prompt row, so such a sequence is started without a prefix lookup (its blocks are
        still registered for others)."""
        hit = self.cache.start(seq.seq_id, seq.tokens, use_prefix=not seq.wants_prompt_logprobs)
        seq.cache_state = self.cache.request(seq.seq_id)
        if seq.first_scheduled_time is None:
            seq.cached_tokens = hit.cached_tokens

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=service_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n <= 0:
                i += 1
                continue
            n = self._allocate(seq, n)
            while not n:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
                n = self._allocate(seq, self._chunk(seq, budget))
            if not n:
                break
            out.scheduled.append(self._scheduled(seq, n))
            budget -= n
            i += 1
        if out.preempted:
            return out
        self._admit(now, budget, out)
        return out

    def _admit(self, now: float, budget: int, out: SchedulerOutput) -> None:
        if not self.waiting:
            return
        self.waiting.sort(key=lambda s: (s.num_preemptions == 0, *service_key(s)))  # preempted ones first
        delay = self.config.batching_delay_s
        if delay > 0:
            fresh = [s for s in self.waiting if s.first_scheduled_time is None]
            if fresh and len(self.waiting) == len(fresh):
                oldest = min(s.request.arrival_time for s in fresh)
                pending = sum(s.num_uncomputed for s in fresh)
                if now - oldest < delay and pending < budget and len(self.running) + len(fresh) < \
                        self.config.max_num_seqs:
                    out.wake_at = oldest + delay
                    return
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.cache_state is None:
                self._start(seq)  # a hit never covers the last known token: its logits are needed
            n = self._allocate(seq, self._chunk(seq, budget))
            if not n:
                break  # not enough free blocks now; retried next step (it stays registered)
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                seq.batching_wait = min(now - seq.request.arrival_time, delay) if delay > 0 else 0.0
                out.admitted.append(seq)
            self.running.append(seq)
            out.scheduled.append(self._scheduled(seq, n))
            budget -= n

    # ---- after the forward ---------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, finished: Iterable[Sequence] = ()) -> None:
        """Record the step in the cache: every scheduled sequence computed its chunk (commit: registers full
        blocks, frees rows that left the window), then the sequences that finished release their blocks."""
        for sch in out.scheduled:
            seq = sch.seq
            self.cache.commit(seq.seq_id, seq.tokens, sch.start + sch.num_tokens)
        for seq in finished:
            self.remove(seq)
