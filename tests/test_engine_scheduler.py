"""Scheduler decisions against the real CacheManager (tiny model layout; no model forward: each step appends a
fixed token to the sequences that sample and hands the step back to the scheduler's own `update_from_output`,
as the engine does)."""

from __future__ import annotations

import pytest
from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import tiny
from dsv4.runtime.engine.request import Request, SamplingParams
from dsv4.runtime.engine.scheduler import Scheduler, SchedulerConfig


def make(num_blocks: int = 400, prefix: bool = True, policy: str = "full", **kw):
    spec = CacheSpec.from_model(tiny(), kv_dtype="fp32")
    cache = CacheManager(spec, {p: num_blocks for p in spec.block_pools}, policy=policy,
                         enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(**kw), cache), cache


def req(rid: str, n_prompt: int, max_tokens: int = 4, priority: int = 0, t: float = 0.0, base: int = 0) -> Request:
    r = Request(rid, [(base + i) % 1000 + 5 for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens),
                arrival_time=t, priority=priority)
    return r


def step(sched: Scheduler, cache: CacheManager, now: float = 0.0):
    out = sched.schedule(now)
    finished = []
    for s in out.scheduled:
        if s.sample:
            s.seq.output_ids.append(7)
            if len(s.seq.output_ids) >= s.seq.request.params.max_tokens:
                finished.append(s.seq)
    sched.update_from_output(out, finished)
    for s in out.scheduled:
        assert s.seq.num_computed == (0 if s.seq in finished else s.start + s.num_tokens)
    cache.check_invariants()
    return out


def drain(sched, cache, limit=500):
    outs = []
    for i in range(limit):
        if not sched.has_work:
            return outs
        outs.append(step(sched, cache, now=float(i)))
    raise AssertionError("scheduler did not finish")


def test_chunked_prefill_respects_token_budget():
    sched, cache = make(max_num_batched_tokens=32)
    r = req("a", 100, max_tokens=3)
    sched.add(r.sequences[0])
    outs = drain(sched, cache)
    sizes = [o.num_tokens for o in outs]
    assert sizes == [32, 32, 32, 4, 1, 1]
    assert all(o.num_tokens <= 32 for o in outs)
    assert [o.scheduled[0].sample for o in outs] == [False, False, False, True, True, True]


def test_decodes_and_prefill_chunks_share_a_step():
    sched, cache = make(max_num_batched_tokens=40)
    a = req("a", 10, max_tokens=6)
    sched.add(a.sequences[0])
    step(sched, cache)
    b = req("b", 100, max_tokens=2, t=1.0, base=300)
    sched.add(b.sequences[0])
    out = step(sched, cache)
    assert [(s.seq.seq_id, s.num_tokens) for s in out.scheduled] == [("a-0", 1), ("b-0", 39)]


def test_max_num_seqs_caps_running():
    sched, cache = make(max_num_seqs=2)
    for i in range(4):
        sched.add(req(f"r{i}", 8, t=float(i), base=50 * i).sequences[0])
    out = step(sched, cache)
    assert len(out.scheduled) == 2 and len(sched.running) == 2 and len(sched.waiting) == 2
    drain(sched, cache)


def test_priority_then_fcfs():
    sched, cache = make(max_num_seqs=1)
    sched.add(req("late-low", 8, priority=5, t=0.0).sequences[0])
    sched.add(req("early-high", 8, priority=0, t=1.0, base=100).sequences[0])
    sched.add(req("later-high", 8, priority=0, t=2.0, base=200).sequences[0])
    order = []
    for o in drain(sched, cache):
        for s in o.scheduled:
            if s.start == 0:
                order.append(s.seq.request.request_id)
    assert order == ["early-high", "later-high", "late-low"]


def test_preemption_under_cache_pressure_recomputes_and_frees_everything():
    # compressed pools hold 3 logical blocks = 192 tokens: two 120-token requests cannot both grow
    sched, cache = make(num_blocks=3, prefix=False, max_num_batched_tokens=256)
    a, b = req("a", 100, max_tokens=40, t=0.0), req("b", 100, max_tokens=40, t=1.0, base=500)
    sched.add(a.sequences[0])
    sched.add(b.sequences[0])
    outs = drain(sched, cache)
    assert sum(len(o.preempted) for o in outs) >= 1
    assert sched.num_preemptions >= 1
    assert b.sequences[0].num_preemptions >= 1  # the later one is the victim
    assert len(a.sequences[0].output_ids) == 40 and len(b.sequences[0].output_ids) == 40
    stats = cache.stats()
    assert all(p.blocks_used == 0 for p in stats.pools.values())


def test_batching_delay_holds_fresh_prefill_until_deadline():
    sched, cache = make(batching_delay_s=0.05, max_num_batched_tokens=64)
    r = req("a", 10, t=0.0)
    sched.add(r.sequences[0])
    out = sched.schedule(0.01)
    assert out.is_empty and out.wake_at == pytest.approx(0.05)
    out = sched.schedule(0.06)
    assert [s.seq.seq_id for s in out.scheduled] == ["a-0"]
    assert r.sequences[0].batching_wait == pytest.approx(0.05)


def test_batching_delay_releases_when_budget_is_full():
    sched, cache = make(batching_delay_s=10.0, max_num_batched_tokens=32)
    sched.add(req("a", 20, t=0.0).sequences[0])
    assert sched.schedule(0.001).is_empty
    sched.add(req("b", 20, t=0.001, base=100).sequences[0])
    out = sched.schedule(0.002)  # 40 pending tokens >= budget 32: go now
    assert out.num_tokens == 32 and out.wake_at is None


def test_prefix_hit_skips_cached_tokens():
    sched, cache = make(policy="full")
    a = req("a", 130, max_tokens=1)
    sched.add(a.sequences[0])
    drain(sched, cache)
    b = req("b", 130, max_tokens=1, t=5.0)
    sched.add(b.sequences[0])
    out = step(sched, cache)
    s = out.scheduled[0]
    assert b.sequences[0].cached_tokens == 128
    assert s.start == 128  # full policy: the checkpoint at 128 holds the window, nothing is re-run
    assert s.start + s.num_tokens == 130
    assert s.recompute_until == 128
    assert cache.stats().prefix_hit_tokens == 128


def test_recompute_policy_reruns_window_span():
    sched, cache = make(policy="recompute")
    sched.add(req("a", 200, max_tokens=1).sequences[0])
    drain(sched, cache)
    b = req("b", 200, max_tokens=1, t=5.0)
    sched.add(b.sequences[0])
    out = step(sched, cache)
    s = out.scheduled[0]
    assert s.recompute_until == 192
    assert 0 <= s.start < 192  # tokens [start, 192) only rebuild window/state rows
    assert s.start + s.num_tokens == 200
