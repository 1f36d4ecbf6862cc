"""The engine: `LLMEngine.step()` (schedule -> forward -> sample -> detokenise -> stop checks), and
`AsyncEngine`, which runs steps in a background thread and bridges results to asyncio streams.

Threading: only the engine thread touches the scheduler, the CacheManager and the model. Callers talk to
it through an inbox (add / abort) guarded by a condition variable; results go back with
`loop.call_soon_threadsafe` onto one asyncio.Queue per request. An abort (client disconnect) is taken
from the inbox before the next step, so the request's cache is freed within one step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.stats import CacheStats
from dsv4.runtime.engine.detok import TextState
from dsv4.runtime.engine.request import (
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
    SeqDelta,
    Sequence,
    TokenLogprob,
)
from dsv4.runtime.engine.runner import ModelRunner, StepLogits
from dsv4.runtime.engine.sampling import INVALID, RowSpec, make_generator, sample, take_rows, token_logprob
from dsv4.runtime.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from dsv4.runtime.engine.seams import Detokenizer, ForwardModel

if TYPE_CHECKING:
    import torch
    from dsv4.runtime.config import ModelConfig
    from dsv4.runtime.model.kv_pools import KVPools

log = logging.getLogger("dsv4.engine")


class QueueFull(RuntimeError):
    """The bounded waiting queue is full (HTTP 429); `retry_after` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Draining(RuntimeError):
    """The engine accepts no new requests (shutting down; HTTP 503)."""


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_model_len: int = 4096  # prompt + generated tokens of one request
    max_queue: int = 256  # waiting requests before 429


@dataclass
class StepInfo:
    """What one step did, for the metrics observer."""

    durations: dict[str, float]  # phase -> seconds: schedule, forward, sample, total
    num_tokens: int
    num_prefill_tokens: int
    num_preempted: int
    num_running: int
    num_waiting: int


@dataclass
class StepPlan:
    """A scheduled step waiting for its logits (`LLMEngine.begin_step` -> `finish_step`)."""

    sched: SchedulerOutput
    t0: float  # monotonic: the step began
    t1: float  # monotonic: scheduling done


class EngineObserver:
    """Metric hooks called from the engine thread (no-ops here; the server's exporter overrides them)."""

    def on_step(self, info: StepInfo, cache_stats: CacheStats) -> None: ...
    def on_idle(self, num_running: int, num_waiting: int, cache_stats: CacheStats) -> None: ...
    def on_admitted(self, seq: Sequence, queue_time: float, batching_wait: float | None) -> None: ...
    def on_prompt(self, request: Request) -> None: ...
    def on_tokens(self, seq: Sequence, n: int, now: float, first: bool, itl: float | None) -> None: ...
    def on_finished(self, request: Request, e2e: float, reason: str) -> None: ...


class LLMEngine:
    """The synchronous core. Not thread-safe: one thread calls `add`, `abort` and `step`."""

    def __init__(self, model: ForwardModel, model_config: ModelConfig, tokenizer: Detokenizer, cache: CacheManager,
                 pools: KVPools, config: EngineConfig | None = None, device: torch.device | str = "cpu",
                 observer: EngineObserver | None = None):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config.scheduler, cache)
        self.runner = ModelRunner(model, pools, cache, device)
        self.observer = observer or EngineObserver()
        self.requests: dict[str, Request] = {}
        self.e2e_ewma = 1.0  # seconds; moving average of request latency (Retry-After estimate)
        self.vocab_size = int(model_config.vocab_size)
        eos = model_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.update(getattr(tokenizer, "stop_token_ids", []) or [])
        self.eos_ids = sorted(int(e) for e in eos_ids)

    # ---- admission (pure checks; safe from any thread) ---------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError (400) for a request that is invalid or can never fit."""
        params.validate(self.vocab_size)
        if not prompt_ids:
            raise RequestError("prompt must contain at least one token", "prompt")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:5]}",
                               "prompt")
        limit = self.config.max_model_len
        if len(prompt_ids) + params.max_tokens > limit:
            raise RequestError(
                f"this model's maximum context length is {limit} tokens (max_model_len); the request has "
                f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} = "
                f"{len(prompt_ids) + params.max_tokens}", "max_tokens" if len(prompt_ids) < limit else "prompt")

    # ---- inbox operations ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        for i, seq in enumerate(request.sequences):
            p = request.params
            seed = None if p.seed is None else p.seed + i
            seq.generator = make_generator(seed)
            seq.text_state = TextState(stops=list(p.stop), include_stop=p.include_stop_str_in_output)
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for seq in req.sequences:
            if not seq.finished:
                seq.finish_reason = "abort"
            self.scheduler.remove(seq)
        self.observer.on_finished(req, time.monotonic() - req.arrival_time, "abort")
        return self._final(req, [])

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def num_running_requests(self) -> int:
        return len({s.request.request_id for s in self.scheduler.running})

    def num_waiting_requests(self) -> int:
        running = {s.request.request_id for s in self.scheduler.running}
        return len({s.request.request_id for s in self.scheduler.waiting} - running)

    # ---- one step --------------------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], float | None]:
        """Run one step. Returns the outputs and, when nothing ran because of the batching delay, the
        monotonic time at which work becomes schedulable."""
        plan = self.begin_step()
        if plan.sched.is_empty:
            return [], plan.sched.wake_at
        try:
            result: StepLogits | str = self.runner.execute(plan.sched.scheduled)
        except Exception as e:  # a model failure fails the requests of this step, not the server
            log.exception("model forward failed")
            result = f"model forward failed: {type(e).__name__}: {e}"
        return self.finish_step(plan, result), None

    # The two halves of a step, for engines that run several ranks' batches in one forward
    # (engine/data_parallel.py): begin_step schedules, finish_step samples and commits.
    def begin_step(self) -> StepPlan:
        t0 = time.monotonic()
        sched = self.scheduler.schedule(t0)
        t1 = time.monotonic()
        for seq in sched.admitted:
            self.observer.on_admitted(seq, t1 - seq.request.arrival_time, seq.batching_wait)
            if seq.index == 0 and seq.num_preemptions == 0:
                self.observer.on_prompt(seq.request)
        return StepPlan(sched, t0, t1)

    def finish_step(self, plan: StepPlan, result: StepLogits | str) -> list[RequestOutput]:
        """Sample from the step's logits (or fail its requests with `result`, an error message), commit the
        step in the cache, and return the outputs."""
        sched, t0, t1 = plan.sched, plan.t0, plan.t1
        t2 = time.monotonic()
        outputs: dict[str, list[SeqDelta]] = {}
        if isinstance(result, str):
            reqs = {s.seq.request.request_id for s in sched.scheduled}
            outs = [self._fail(rid, result) for rid in reqs]
            return [o for o in outs if o is not None]
        # gather prompt logprobs, collect rows to sample
        to_sample: list[tuple[Sequence, int]] = []
        for sch, (r0, r1) in zip(sched.scheduled, result.rows, strict=True):
            if sch.prompt_logprobs:
                self._prompt_logprobs(sch.seq, sch.start, result.logits[r0:r1])
            if sch.sample:
                to_sample.append((sch.seq, r1 - 1))
        broken: set[str] = set()
        finished: list[Sequence] = []
        if to_sample:
            rows = [self._row_spec(seq) for seq, _ in to_sample]
            idx = [r for _, r in to_sample]
            tokens, lps = sample(take_rows(result.logits, idx), rows)
            now = time.monotonic()
            for (seq, _), tok, lp in zip(to_sample, tokens, lps, strict=True):
                if tok == INVALID:
                    broken.add(seq.request.request_id)
                    continue
                delta = self._append(seq, tok, lp, now)
                if delta.finish_reason is not None:
                    finished.append(seq)
                outputs.setdefault(seq.request.request_id, []).append(delta)
        self.scheduler.update_from_output(sched, finished)  # commit the step, free the finished
        fails: list[RequestOutput] = []
        for rid in broken:  # this request alone fails; the rest of the batch goes on
            log.error("request %s: the model's logits are not finite (NaN/inf); failing it", rid)
            outputs.pop(rid, None)
            failed_out = self._fail(rid, "sampling failed: the model produced non-finite logits (NaN/inf) "
                                         "for this request")
            if failed_out is not None:
                fails.append(failed_out)
        t3 = time.monotonic()
        outs = []
        for rid, deltas in outputs.items():
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.finished:
                self.requests.pop(rid, None)
                reason = next((s.finish_reason for s in req.sequences if s.finish_reason == "length"), "stop")
                self.e2e_ewma = 0.9 * self.e2e_ewma + 0.1 * (t3 - req.arrival_time)
                self.observer.on_finished(req, t3 - req.arrival_time, reason)
                outs.append(self._final(req, deltas))
            else:
                outs.append(RequestOutput(rid, deltas))
        outs += fails
        info = StepInfo({"schedule": t1 - t0, "forward": t2 - t1, "sample": t3 - t2, "total": t3 - t0},
                        sched.num_tokens, sched.num_prefill_tokens, len(sched.preempted),
                        self.num_running_requests(), self.num_waiting_requests())
        self.observer.on_step(info, self.cache.stats())
        return outs

    def _row_spec(self, seq: Sequence) -> RowSpec:
        p = seq.request.params
        banned: list[int] = []
        if len(seq.output_ids) < p.min_tokens:
            banned = sorted(set(self.eos_ids) | set(p.stop_token_ids))
        if p.constraint is not None and seq.constraint is None:
            seq.constraint = p.constraint.start()
        return RowSpec(p, seq.generator, seq.token_counts, banned, p.logprobs, seq.constraint)

    def _prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        n_prompt = len(seq.prompt_ids)
        top_n = seq.request.params.prompt_logprobs or 0
        if start == 0:
            seq.prompt_logprobs = [None]
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)
        for j in range(logp.shape[0]):
            p = start + j + 1
            if p < n_prompt:
                seq.prompt_logprobs.append(token_logprob(logp[j], seq.prompt_ids[p], top_n))
        if len(seq.prompt_logprobs) >= n_prompt:
            seq.prompt_logprobs_done = True

    def _append(self, seq: Sequence, tok: int, lp: TokenLogprob | None, now: float) -> SeqDelta:
        p = seq.request.params
        first = not seq.output_ids
        itl = None if first or seq.last_token_time is None else now - seq.last_token_time
        seq.output_ids.append(tok)
        seq.token_counts[tok] = seq.token_counts.get(tok, 0) + 1
        if lp is not None:
            seq.output_logprobs.append(lp)
        if first and seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        self.observer.on_tokens(seq, 1, now, first, itl)
        ts: TextState = seq.text_state
        reason: str | None = None
        stop_reason: str | int | None = None
        if tok in p.stop_token_ids:
            reason, stop_reason = "stop", tok
        elif tok in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        else:
            hit = ts.push(self.tokenizer, tok)
            if hit is not None:
                reason, stop_reason = "stop", hit
        if reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_model_len):
            reason = "length"
        if reason is not None:  # the scheduler frees it after committing the step (update_from_output)
            seq.finish_reason, seq.stop_reason = reason, stop_reason
        text = ts.release(final=reason is not None)
        return SeqDelta(seq.index, [tok], text, [lp] if lp is not None else [], reason, stop_reason)

    def _final(self, req: Request, deltas: list[SeqDelta]) -> RequestOutput:
        s0 = req.sequences[0]
        return RequestOutput(
            req.request_id, deltas, finished=True, prompt_tokens=len(req.prompt_ids),
            completion_tokens=sum(len(s.output_ids) for s in req.sequences), cached_tokens=s0.cached_tokens,
            prompt_logprobs=s0.prompt_logprobs if req.params.prompt_logprobs is not None else None,
        )

    def _fail(self, request_id: str, message: str) -> RequestOutput | None:
        out = self.abort(request_id)
        if out is not None:
            out.error = message
        return out

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Abort every request with `message` as its error (the step itself failed)."""
        return [o for rid in list(self.requests) if (o := self._fail(rid, message)) is not None]

    def stats_snapshot(self) -> CacheStats:
        return self.cache.stats()


# ---------------------------------------------------------------------------------------------------
class RequestStream:
    """The outputs of one queued request, as an async iterator. `aclose()` (idempotent) before the final
    output aborts the request in the engine, whether or not the stream was ever iterated."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine, self.request_id, self._queue = engine, request_id, queue
        self.done = False  # the final output was taken
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done or self.closed:
            raise StopAsyncIteration
        out: RequestOutput = await self._queue.get()
        if out.finished:
            self.done = True
            self.engine.forget(self.request_id)
        return out

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.engine.forget(self.request_id)
        if not self.done:
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Runs `LLMEngine` in a daemon thread; `generate()` admits and queues a request and returns its
    `RequestStream` (an async iterator of `RequestOutput`s)."""

    def __init__(self, engine: LLMEngine, on_idle: Callable[[], Any] | None = None):
        self.engine = engine
        self.on_idle = on_idle  # called in the engine thread when it runs out of work after steps (heap trim)
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self.num_running = 0
        self.num_waiting = 0
        self.cache_stats: CacheStats | None = None
        self._ids = itertools.count()
        self.error: BaseException | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self.cache_stats = self.engine.stats_snapshot()
            self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests queued or running whose stream has not delivered its final output (and was not closed)."""
        return len(self._streams)

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse new requests from now on (`admit` raises Draining); requests in flight go on."""
        self._draining = True

    def abort_all(self) -> None:
        """Abort every request in flight (each stream gets its final output)."""
        for rid in list(self._streams):
            self.abort(rid)

    def forget(self, request_id: str) -> None:
        """Stop delivering outputs of a request to its stream (the stream ended or was closed)."""
        self._streams.pop(request_id, None)

    # ---- requests ----------------------------------------------------------------------------------
    def admit(self, prompt_ids: list[int], params: SamplingParams, count: int = 1) -> None:
        """Raise Draining (503), RequestError (400) or QueueFull (429) before a request is queued. `count`
        requests with these parameters are about to be queued together (a completions batch of prompts).

        Waiting = max(submitted and unfinished - max_num_seqs, waiting at the engine's last step): the first
        term needs nothing from the engine thread (a burst is counted at once), the second counts requests
        the cache cannot place yet. Submission happens in the same synchronous call as admission (`generate`),
        so concurrent bursts cannot overshoot: at most max_num_seqs + max_queue requests are ever in flight."""
        if self._draining:
            raise Draining("server is shutting down; not accepting new requests")
        self.engine.check(prompt_ids, params)
        cfg = self.engine.config
        if count > cfg.max_queue:
            raise RequestError(f"a request may hold at most max_queue={cfg.max_queue} prompts, got {count}",
                               "prompt")
        waiting = max(0, len(self._streams) - cfg.scheduler.max_num_seqs, self.num_waiting)
        if waiting + count > cfg.max_queue:
            per_slot = self.engine.e2e_ewma / max(1, cfg.scheduler.max_num_seqs)
            retry = int(min(60, max(1, math.ceil(per_slot * (waiting + count - cfg.max_queue)))))
            raise QueueFull(f"too many requests waiting ({waiting} + {count} > max_queue {cfg.max_queue}); "
                            f"retry later", retry)

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 priority: int = 0) -> RequestStream:
        """Admit and queue one request now (raising like `admit`); returns its output stream. Closing the
        stream before its last output (`aclose`, also when it was never iterated) aborts the request."""
        return self.generate_many([prompt_ids], params, request_id, priority)[0]

    def generate_many(self, prompts: list[list[int]], params: SamplingParams, request_id: str | None = None,
                      priority: int = 0) -> list[RequestStream]:
        """Admit all prompts or none (request ids `request_id-i` when there are several), then queue them.
        Must be called on the event loop thread that consumes the streams."""
        for ids in prompts[1:]:
            self.engine.check(ids, params)
        self.admit(prompts[0], params, count=len(prompts))
        base = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        streams = []
        for i, ids in enumerate(prompts):
            rid = base if len(prompts) == 1 else f"{base}-{i}"
            queue: asyncio.Queue = asyncio.Queue()
            self._streams[rid] = (loop, queue)
            streams.append(RequestStream(self, rid, queue))
            self._submit("add", Request(rid, list(ids), params, priority=priority))
        return streams

    def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float = 30.0) -> Any:
        """Run `fn(llm_engine)` on the engine thread between steps and return its result (tests, admin: the
        cache manager and scheduler may only be touched there). Raises TimeoutError if the thread is stuck."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def job(eng: LLMEngine) -> None:
            try:
                box["value"] = fn(eng)
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            finally:
                done.set()

        if not self.alive:
            job(self.engine)
        else:
            self._submit("call", job)
            if not done.wait(timeout):
                raise TimeoutError(f"engine thread did not run the call within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _submit(self, kind: str, item: Any) -> None:
        with self._cv:
            self._inbox.append((kind, item))
            self._cv.notify_all()

    # ---- engine thread -------------------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # event loop closed
            pass

    def _loop(self) -> None:
        eng = self.engine
        wake_at: float | None = None
        stepped = False
        while True:
            with self._cv:
                while not self._stop and not self._inbox:
                    if not eng.has_work:
                        self._cv.wait()
                        continue
                    if wake_at is None:
                        break
                    remaining = wake_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                if self._stop:
                    break
                items, self._inbox = self._inbox, []
            wake_at = None
            for kind, item in items:
                if kind == "add":
                    eng.add(item)
                elif kind == "abort":
                    out = eng.abort(item)
                    if out is not None:
                        self._deliver(out)
                elif kind == "call":
                    item(eng)
            if eng.has_work:
                stepped = True
                try:
                    outs, wake_at = eng.step()
                except BaseException as e:  # keep serving other requests; fail what was running
                    log.exception("engine step failed")
                    self.error = e
                    outs = eng.fail_all(f"engine error: {e}")
                for out in outs:
                    self._deliver(out)
                if wake_at is None and not outs and eng.has_work and not eng.num_running_requests():
                    wake_at = time.monotonic() + 0.005  # waiting work that cannot be placed yet: poll
            self.num_running = eng.num_running_requests()
            self.num_waiting = eng.num_waiting_requests()
            self.cache_stats = eng.stats_snapshot()
            if not eng.has_work:
                eng.observer.on_idle(self.num_running, self.num_waiting, self.cache_stats)
                if stepped and self.on_idle is not None:
                    stepped = False
                    self.on_idle()

