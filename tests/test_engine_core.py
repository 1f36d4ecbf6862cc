"""The engine with the real tiny model, CacheManager and KV pools (in-process, no HTTP).

Greedy outputs must not depend on how requests were batched, chunked, preempted or served from the prefix
cache: each variant is compared token for token with a plain run.
"""

from __future__ import annotations

import pytest
from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.engine.engine import EngineConfig, LLMEngine
from dsv4.runtime.engine.request import Request, RequestError, SamplingParams
from dsv4.runtime.engine.runner import StepLogits
from dsv4.runtime.engine.scheduler import SchedulerConfig
from dsv4.runtime.model import KVPools, load_model
from dsv4.runtime.server.build import ensure_tiny_model
from dsv4.runtime.server.config import default_model_dir


@pytest.fixture(scope="module")
def loaded():
    path = default_model_dir()
    ensure_tiny_model(path)
    model, cfg, tok = load_model(str(path), progress=False)
    model.eval()
    return model, cfg, tok


def make_engine(loaded, policy="full", num_blocks=256, prefix=True, hca_state="raw", **sched) -> LLMEngine:
    model, cfg, tok = loaded
    spec = CacheSpec.from_model(cfg, kv_dtype="fp32", hca_state=hca_state)
    cache = CacheManager(spec, {p: num_blocks for p in spec.block_pools}, policy=policy,
                         enable_prefix_caching=prefix)
    pools = KVPools.for_model(cfg, spec, cache.num_blocks)
    ec = EngineConfig(SchedulerConfig(**sched), max_model_len=cache.max_request_tokens())
    return LLMEngine(model, cfg, tok, cache, pools, ec)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(salt * 131 + i * 37) % 900 + 20 for i in range(n)]


def greedy(max_tokens=8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(eng: LLMEngine, reqs: list[Request]) -> list[list[int]]:
    for r in reqs:
        eng.add(r)
    while eng.has_work:
        eng.step()
    return [list(r.sequences[0].output_ids) for r in reqs]


def test_batched_equals_one_by_one(loaded):
    eng = make_engine(loaded)
    lens = [5, 17, 33, 64, 70]
    together = run(eng, [Request(f"b{i}", prompt(n, i), greedy()) for i, n in enumerate(lens)])
    alone = [run(eng, [Request(f"s{i}", prompt(n, i), greedy())])[0] for i, n in enumerate(lens)]
    assert together == alone
    assert all(len(o) == 8 for o in together)


def test_chunked_prefill_equals_single_chunk(loaded):
    p = prompt(150, 3)
    whole = run(make_engine(loaded, prefix=False), [Request("w", p, greedy())])[0]
    chunked = run(make_engine(loaded, prefix=False, max_num_batched_tokens=24), [Request("c", p, greedy())])[0]
    assert chunked == whole


@pytest.mark.parametrize("policy", ["full", "checkpoint", "recompute"])
def test_prefix_hit_gives_same_tokens(loaded, policy):
    eng = make_engine(loaded, policy=policy)
    p = prompt(150, 5)
    first = run(eng, [Request("a", p, greedy())])[0]
    r = Request("b", p, greedy())
    second = run(eng, [r])[0]
    assert r.sequences[0].cached_tokens == 128
    assert eng.cache.stats().prefix_hit_tokens >= 128
    assert second == first
    cold = run(make_engine(loaded, policy=policy, prefix=False), [Request("c", p, greedy())])[0]
    assert cold == first


@pytest.mark.parametrize("policy", ["full", "checkpoint", "recompute"])
def test_online_hca_state_serves_the_same_tokens(loaded, policy):
    """`--hca-state online` (one online-softmax slot per open HCA group) gives the raw tail's greedy tokens on a
    cold run, in small chunks, and after a prefix hit that ends inside an open HCA group."""
    p = prompt(300, 5)
    raw = run(make_engine(loaded, policy=policy, prefix=False), [Request("r", p, greedy(40))])[0]
    eng = make_engine(loaded, policy=policy, hca_state="online")
    assert eng.cache.spec.pools["hca_state"].rows_per_block == 1
    assert run(eng, [Request("a", p, greedy(40))])[0] == raw
    longer = p + prompt(70, 9)
    hit = Request("b", longer, greedy(40))
    out = run(eng, [hit])[0]
    assert hit.sequences[0].cached_tokens >= 128
    assert out == run(make_engine(loaded, policy=policy, prefix=False), [Request("c", longer, greedy(40))])[0]
    chunked = make_engine(loaded, policy=policy, prefix=False, hca_state="online", max_num_batched_tokens=24)
    assert run(chunked, [Request("d", p, greedy(40))])[0] == raw


def test_preemption_recomputes_to_identical_output(loaded):
    reqs = lambda: [Request(f"p{i}", prompt(100, 10 + i), greedy(60), arrival_time=float(i)) for i in range(2)]  # noqa: E731
    ref = [run(make_engine(loaded, prefix=False), [r])[0] for r in reqs()]
    eng = make_engine(loaded, num_blocks=4, prefix=False)  # compressed pools: 4 blocks = 256 tokens in all
    rs = reqs()
    out = run(eng, rs)
    assert eng.scheduler.num_preemptions >= 1
    assert out == ref
    assert all(p.blocks_used == 0 for p in eng.cache.stats().pools.values())


def test_seed_stop_tokens_and_n(loaded):
    eng = make_engine(loaded)
    p = prompt(12, 7)
    sp = lambda seed: SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True, n=2)  # noqa: E731
    a, b, c = Request("a", p, sp(1)), Request("b", p, sp(1)), Request("c", p, sp(2))
    run(eng, [a])
    run(eng, [b, c])
    ids = lambda r: [s.output_ids for s in r.sequences]  # noqa: E731
    assert ids(a) == ids(b)  # same seed, different batch
    assert ids(a) != ids(c)
    assert ids(a)[0] != ids(a)[1]  # choices use seed + index
    stop_tok = ids(a)[0][3]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True, stop_token_ids=[stop_tok])
    d = Request("d", p, params)
    run(eng, [d])
    s0 = d.sequences[0]
    assert s0.output_ids == ids(a)[0][: ids(a)[0].index(stop_tok) + 1]
    assert s0.finish_reason == "stop" and s0.stop_reason == stop_tok


def test_abort_frees_cache_and_check_names_limits(loaded):
    eng = make_engine(loaded, prefix=False)
    r = Request("x", prompt(90, 1), greedy(50))
    eng.add(r)
    for _ in range(3):
        eng.step()
    assert any(p.blocks_used for p in eng.cache.stats().pools.values())
    out = eng.abort("x")
    assert out is not None and out.finished
    assert all(p.blocks_used == 0 for p in eng.cache.stats().pools.values())
    with pytest.raises(RequestError, match="max_model_len"):
        eng.check(prompt(10), SamplingParams(max_tokens=eng.config.max_model_len))
    with pytest.raises(RequestError, match="prompt"):
        eng.check([], SamplingParams())
    with pytest.raises(RequestError, match="token ids"):
        eng.check([5000], SamplingParams())


def test_prompt_logprobs_independent_of_chunking(loaded):
    p = prompt(40, 9)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2, logprobs=1)
    r1 = Request("l1", p, params)
    run(make_engine(loaded), [r1])
    eng = make_engine(loaded, max_num_batched_tokens=16)
    run(eng, [Request("warm", p, greedy(1))])  # a prefix entry exists: prompt logprobs must not use it
    r2 = Request("l2", p, params)
    run(eng, [r2])
    a, b = r1.sequences[0].prompt_logprobs, r2.sequences[0].prompt_logprobs
    assert a[0] is None and len(a) == len(p) == len(b)
    assert [x.token_id for x in a[1:]] == p[1:]
    for x, y in zip(a[1:], b[1:], strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_non_finite_logits_fail_that_request_alone(loaded):
    """A forward that yields NaN logits for one sequence fails that request with a clear error; the other
    requests of the same steps finish with the tokens they get without it, and no cache block leaks."""
    eng = make_engine(loaded)
    reqs = [Request(f"ok{i}", prompt(20, i), greedy(6)) for i in range(3)]
    want = run(eng, [Request(f"ref{i}", prompt(20, i), greedy(6)) for i in range(3)])
    victim = Request("victim", prompt(20, 9), SamplingParams(max_tokens=6, temperature=0.8, seed=1))
    orig = eng.runner.execute

    def poisoned(scheduled):
        out = orig(scheduled)
        logits = out.logits.clone()  # the runner's are inference tensors
        for sch, (r0, r1) in zip(scheduled, out.rows, strict=True):
            if sch.seq.request.request_id == "victim" and r1 > r0 and len(sch.seq.output_ids) == 2:
                logits[r1 - 1, 5] = float("nan")
        return StepLogits(logits, out.rows)

    eng.runner.execute = poisoned
    for r in [*reqs, victim]:
        eng.add(r)
    finals = {}
    while eng.has_work:
        for out in eng.step()[0]:
            if out.finished:
                finals[out.request_id] = out
    assert "non-finite logits" in (finals["victim"].error or "")
    assert len(victim.sequences[0].output_ids) == 2
    assert all(finals[r.request_id].error is None for r in reqs)
    assert [list(r.sequences[0].output_ids) for r in reqs] == want
    eng.cache.check_invariants()
    assert eng.cache.stats().running_requests == 0


def test_async_engine_drain_and_abort_all(loaded):
    import asyncio

    from dsv4.runtime.engine.engine import AsyncEngine, Draining

    eng = AsyncEngine(make_engine(loaded))
    eng.start()

    async def scenario() -> list:
        streams = eng.generate_many([prompt(8, 1), prompt(8, 2)], greedy(max_tokens=2000))
        assert eng.in_flight == 2 and not eng.draining
        eng.begin_drain()
        assert eng.draining
        with pytest.raises(Draining):
            eng.generate(prompt(8, 3), greedy())
        assert eng.in_flight == 2  # a drain lets requests in flight go on
        eng.abort_all()
        finals = []
        for st in streams:
            async for out in st:
                if out.finished:
                    finals.append(out)
        return finals

    try:
        finals = asyncio.run(scenario())
        assert len(finals) == 2 and eng.in_flight == 0
        assert all(out.completion_tokens < 2000 for out in finals)  # aborted, not run to the end
        assert eng.call(lambda e: e.cache.stats().running_requests) == 0
    finally:
        eng.shutdown()


def test_async_engine_calls_on_idle_once_after_its_steps(loaded):
    """`dsv4 serve` on CPU trims the freed heap here (runtime/malloc_tuning.trim_free_heap): once per busy
    period, when the last request finishes, never while it still has work."""
    import asyncio

    from dsv4.runtime.engine.engine import AsyncEngine

    busy_when_called = []
    eng = AsyncEngine(make_engine(loaded), on_idle=lambda: busy_when_called.append(eng.engine.has_work))
    eng.start()

    async def run_one(seed: int) -> None:
        async for _ in eng.generate(prompt(8, seed), greedy(max_tokens=4)):
            pass

    try:
        asyncio.run(run_one(1))
        eng.call(lambda e: None)  # a call without steps does not count as a busy period
        assert busy_when_called == [False]
        asyncio.run(run_one(2))
        eng.call(lambda e: None)
        assert busy_when_called == [False, False]
    finally:
        eng.shutdown()
