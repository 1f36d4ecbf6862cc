"""`DataParallelEngine`: N data-parallel attention ranks behind one front end (`dsv4 serve --dp N --ep`).

Each rank is a whole `LLMEngine` — its own scheduler, its own `CacheManager` over its own KV pools (the full
per-device budget) — and owns the requests dispatched to it (`dispatch.choose_rank`: prefix affinity, then load).
The rank engines' bookkeeping lives in this process; their pools live in the rank processes. One step:

    plans   = [rank.begin_step() for rank in ranks]          (each schedules its own requests)
    logits  = step_all([batch of each rank, None if idle])   (one forward on every rank; MoE tokens exchanged)
    outputs = [rank.finish_step(plan, its logits) ...]       (sampling + cache commit per rank)

Idle ranks still take part in the forward (their MoE exchange), so every step is one collective round. The
engine looks like an `LLMEngine` to `AsyncEngine` (add / abort / step / has_work / counts / stats), so the server
is unchanged. Metrics: replica-level gauges from the aggregate (occupancy = max over ranks, counts = sums), and
per-rank series (`dsv4_rank_*`, label `rank`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dsv4.runtime.cache.stats import CacheStats, PoolStats
from dsv4.runtime.engine.dispatch import RankLoad, choose_rank
from dsv4.runtime.engine.engine import EngineObserver, LLMEngine, StepInfo
from dsv4.runtime.engine.request import Request, RequestOutput, SamplingParams, Sequence
from dsv4.runtime.engine.runner import StepLogits

StepAll = Callable[[list[Any]], list[Any]]  # one ForwardBatch (or None) per rank -> each rank's logits rows


def aggregate_stats(per_rank: list[CacheStats]) -> CacheStats:
    """The replica's cache as one: sizes and counters summed, a pool's occupancy the max over ranks (the fullest
    rank is the one that refuses work first, so routers and the autoscaler must see it)."""
    pools: dict[str, PoolStats] = {}
    for name in per_rank[0].pools:
        ps = [s.pools[name] for s in per_rank]
        pools[name] = PoolStats(sum(p.blocks_total for p in ps), sum(p.blocks_used for p in ps),
                                sum(p.bytes_allocated for p in ps), sum(p.bytes_used for p in ps),
                                sum(p.tokens_held for p in ps), max(p.occupancy for p in ps),
                                sum(p.evictions for p in ps))
    return CacheStats(pools, *(sum(getattr(s, f) for s in per_rank) for f in (
        "prefix_queries_tokens", "prefix_hit_tokens", "prefix_recompute_tokens", "swa_checkpoints_kept",
        "cached_blocks", "tombstoned_blocks", "running_requests")))


class RankObserver(EngineObserver):
    """A rank engine's observer: request events go to the replica's observer as they are; steps are reported
    once for the replica by the DP engine (and each rank's series after every step and abort)."""

    def __init__(self, replica: EngineObserver):
        self.replica = replica

    def on_admitted(self, seq: Sequence, queue_time: float, batching_wait: float | None) -> None:
        self.replica.on_admitted(seq, queue_time, batching_wait)

    def on_prompt(self, request: Request) -> None:
        self.replica.on_prompt(request)

    def on_tokens(self, seq: Sequence, n: int, now: float, first: bool, itl: float | None) -> None:
        self.replica.on_tokens(seq, n, now, first, itl)

    def on_finished(self, request: Request, e2e: float, reason: str) -> None:
        self.replica.on_finished(request, e2e, reason)


class DataParallelEngine:
    """Not thread-safe, like `LLMEngine`: the engine thread calls everything but `check`."""

    def __init__(self, ranks: list[LLMEngine], step_all: StepAll, observer: EngineObserver | None = None):
        self.ranks = ranks
        self.step_all = step_all
        self.observer = observer or EngineObserver()
        for r in ranks:
            r.observer = RankObserver(self.observer)
        self.owner: dict[str, int] = {}  # request id -> rank
        self.last_dispatch = [-1] * len(ranks)  # per rank: the number of the last request sent to it
        self.dispatched = 0
        self.block_size = int(ranks[0].cache.spec.block_size)

    # ---- what AsyncEngine and the server read -----------------------------------------------------
    @property
    def config(self) -> Any:
        return self.ranks[0].config

    @property
    def model_config(self) -> Any:
        return self.ranks[0].model_config

    @property
    def cache(self) -> Any:
        """Rank 0's cache manager (every rank's is built the same: same spec and block counts)."""
        return self.ranks[0].cache

    @property
    def e2e_ewma(self) -> float:
        return max(r.e2e_ewma for r in self.ranks)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.ranks[0].check(prompt_ids, params)

    @property
    def has_work(self) -> bool:
        return any(r.has_work for r in self.ranks)

    def num_running_requests(self) -> int:
        return sum(r.num_running_requests() for r in self.ranks)

    def num_waiting_requests(self) -> int:
        return sum(r.num_waiting_requests() for r in self.ranks)

    def rank_stats(self) -> list[CacheStats]:
        return [r.cache.stats() for r in self.ranks]

    def stats_snapshot(self) -> CacheStats:
        return aggregate_stats(self.rank_stats())

    def check_invariants(self) -> None:
        for r in self.ranks:
            r.cache.check_invariants()

    # ---- requests ----------------------------------------------------------------------------------
    def rank_loads(self, prompt_ids: list[int]) -> list[RankLoad]:
        loads = []
        for r in self.ranks:
            stats = r.cache.stats()
            occ = max((p.occupancy for p in stats.pools.values()), default=0.0)
            hit = r.cache.peek(prompt_ids).cached_tokens if r.cache.enable_prefix_caching else 0
            loads.append(RankLoad(r.num_running_requests() + r.num_waiting_requests(), occ, hit,
                                  self.last_dispatch[len(loads)]))
        return loads

    def add(self, request: Request) -> None:
        rank, reason = choose_rank(self.rank_loads(request.prompt_ids), self.block_size)
        self.owner[request.request_id] = rank
        self.last_dispatch[rank] = self.dispatched
        self.dispatched += 1
        on_dispatch = getattr(self.observer, "on_dispatch", None)
        if on_dispatch is not None:
            on_dispatch(rank, reason)
        self.ranks[rank].add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        rank = self.owner.pop(request_id, None)
        out = None if rank is None else self.ranks[rank].abort(request_id)
        self.report_ranks(self.rank_stats())
        return out

    def report_ranks(self, stats: list[CacheStats]) -> None:
        """Each rank's requests and cache occupancy (`stats`, one per rank) to the `rank`-labelled series."""
        update = getattr(self.observer, "update_rank", None)
        if update is None:
            return
        for k, (r, s) in enumerate(zip(self.ranks, stats, strict=True)):
            update(k, r.num_running_requests(), r.num_waiting_requests(), s)

    def fail_all(self, message: str) -> list[RequestOutput]:
        self.owner.clear()
        return [o for r in self.ranks for o in r.fail_all(message)]

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], float | None]:
        t0 = time.monotonic()
        plans = [r.begin_step() for r in self.ranks]
        if all(p.sched.is_empty for p in plans):
            wakes = [p.sched.wake_at for p in plans if p.sched.wake_at is not None]
            return [], min(wakes) if wakes else None
        batches: list[Any] = []
        rows: list[list[tuple[int, int]]] = []
        for r, p in zip(self.ranks, plans, strict=True):
            if p.sched.is_empty:
                batches.append(None)
                rows.append([])
            else:
                batch, seq_rows = r.runner.build_batch(p.sched.scheduled)
                batches.append(batch)
                rows.append(seq_rows)
        t1 = time.monotonic()
        logits = self.step_all(batches)  # a failure here ends the replica (the group is out of step)
        t2 = time.monotonic()
        outs: list[RequestOutput] = []
        for r, p, lg, rw in zip(self.ranks, plans, logits, rows, strict=True):
            if not p.sched.is_empty:
                outs += r.finish_step(p, StepLogits(lg.float(), rw))
        for o in outs:
            if o.finished:
                self.owner.pop(o.request_id, None)
        t3 = time.monotonic()
        num_tokens = sum(p.sched.num_tokens for p in plans)
        info = StepInfo({"schedule": t1 - t0, "forward": t2 - t1, "sample": t3 - t2, "total": t3 - t0},
                        num_tokens, sum(p.sched.num_prefill_tokens for p in plans),
                        sum(len(p.sched.preempted) for p in plans), self.num_running_requests(),
                        self.num_waiting_requests())
        stats = self.rank_stats()  # once per step: the replica's aggregate and each rank's series
        self.observer.on_step(info, aggregate_stats(stats))
        self.report_ranks(stats)
        return outs, None
