"""CacheManager: block tables, out-of-window freeing, prefix hits per SWA policy, eviction, admission."""

from __future__ import annotations

import pytest
from dsv4.runtime.cache.manager import CacheError, CacheManager, PrefixHit
from dsv4.runtime.cache.spec import CacheConfigError, CacheSpec
from dsv4.runtime.config import flash, tiny

SPEC = CacheSpec.from_model(tiny())  # block 64, swa/state blocks 16, window 16, csa 4, hca 16, 6 layers


def mgr(policy="full", n=64, **kw):
    return CacheManager(SPEC, {p: n for p in SPEC.block_pools}, policy, **kw)


def run(m, rid, tokens, chunk=1000):
    hit = m.start(rid, tokens)
    n = hit.recompute_from
    while n < len(tokens):
        n2 = min(len(tokens), n + chunk)
        assert m.allocate(rid, n2)
        m.commit(rid, tokens, n2)
        n = n2
    m.check_invariants()
    return hit


def test_tables_and_out_of_window_freeing():
    m = mgr("recompute")
    toks = list(range(200))
    assert run(m, "a", toks) == PrefixHit(0, 0)
    t = m.block_tables("a")
    assert len(t["csa"]) == len(t["hca"]) == 4  # ceil(200 / 64) logical blocks, all kept
    assert all(b >= 0 for b in t["csa"] + t["hca"])
    live = [k for k, b in enumerate(t["swa"]) if b >= 0]
    assert live == [11, 12]  # [184, 200) lives in small blocks 11 and 12
    assert [k for k, b in enumerate(t["csa_state"]) if b >= 0] == [12]  # [192, 200)
    assert [k for k, b in enumerate(t["hca_state"]) if b >= 0] == [12]  # [192, 200)
    st = m.stats()
    assert st.pools["swa"].blocks_used == 2 and st.pools["swa"].tokens_held == 16 + 8
    assert st.pools["csa"].tokens_held == 200 and st.pools["idx"].blocks_used == 4
    assert st.pools["csa"].bytes_used == 4 * SPEC.pools["csa"].bytes_per_block
    assert st.pools["idx"].bytes_used == 4 * SPEC.pools["idx"].bytes_per_block


@pytest.mark.parametrize("policy,recompute_from", [("full", 192), ("checkpoint", 192), ("recompute", 96)])
def test_prefix_hit_per_policy(policy, recompute_from):
    m = mgr(policy)
    base = list(range(200))
    run(m, "a", base)
    m.free("a")
    hit = run(m, "b", base + [7] * 50)
    # 3 full blocks are cached; recompute must rebuild window x layers = 16 x 6 = 96 tokens
    assert hit == PrefixHit(192, recompute_from)
    assert m.stats().prefix_hit_tokens == 192
    tb = m.block_tables("b")
    assert tb["csa"][:3] == m.block_tables("b")["csa"][:3]


def test_hit_shares_compressed_blocks_and_checkpoint():
    m = mgr("full")
    run(m, "a", list(range(200)))
    ta = m.block_tables("a")
    hit = m.start("b", list(range(200)) + [1])
    tb = m.block_tables("b")
    assert hit.cached_tokens == 192
    assert tb["csa"] == ta["csa"][:3] and tb["hca"] == ta["hca"][:3]
    assert tb["swa"][11] >= 0  # the window [176, 192) at the hit point comes from the checkpoint
    assert tb["csa_state"][11] >= 0
    m.check_invariants()


def test_checkpoint_policy_keeps_every_kth_and_tail():
    m = mgr("checkpoint", n=256, checkpoint_every=2)
    toks = list(range(64 * 7 + 5))
    run(m, "a", toks, chunk=64)
    m.free("a")
    st = m.stats()
    # boundaries 2, 4, 6 (every 2nd) plus the tail boundary 7
    assert st.cached_blocks == 7 and st.swa_checkpoints_kept == 4
    # a prompt that diverges inside block 6 hits 6 blocks and continues from checkpoint 6
    hit = m.peek(toks[: 64 * 6] + [9999] * 70)
    assert hit == PrefixHit(384, 384)
    hit = m.peek(toks[: 64 * 5 + 3] + [9999] * 70)
    assert hit == PrefixHit(320, 256)  # checkpoint at 4 blocks, gap of one block re-run


def test_no_prefix_caching_means_no_hits():
    m = mgr("full", enable_prefix_caching=False)
    run(m, "a", list(range(200)))
    m.free("a")
    assert m.start("b", list(range(200))) == PrefixHit(0, 0)
    m.free("b")
    m.check_invariants()
    assert all(v.blocks_used == 0 for v in m.stats().pools.values())


def test_swa_eviction_tombstones_and_keeps_compressed():
    m = mgr("full", n=40)
    run(m, "a", list(range(64 * 5)))  # 5 blocks: 20 swa blocks kept by entries
    m.free("a")
    st = m.stats()
    assert st.swa_checkpoints_kept == 5 and st.pools["swa"].blocks_used == 20
    run(m, "b", list(range(10_000, 10_000 + 64 * 6)), chunk=64)  # needs swa blocks -> tombstones a's
    st = m.stats()
    assert st.pools["swa"].evictions > 0 and st.tombstoned_blocks > 0
    assert st.pools["csa"].evictions == 0  # compressed history of a is still there
    hit = m.peek(list(range(64 * 5)) + [1])
    assert hit.cached_tokens == 320 and hit.recompute_from < 320  # continuable only via recompute


def test_compressed_eviction_lru_and_failure():
    m = CacheManager(SPEC, {"swa": 64, "csa": 8, "hca": 8, "csa_state": 64, "hca_state": 64}, "recompute")
    run(m, "a", list(range(64 * 4)))
    m.free("a")
    run(m, "b", list(range(5000, 5000 + 64 * 4)))
    m.free("b")
    run(m, "c", list(range(9000, 9000 + 64 * 3)))  # needs 3 blocks: evicts a's tail blocks first
    st = m.stats()
    assert st.pools["csa"].evictions == 3 and st.pools["hca"].evictions == 3
    assert m.peek(list(range(64 * 4)) + [1]).cached_tokens == 64  # a's first block survives
    assert m.peek(list(range(5000, 5000 + 64 * 4)) + [1]).cached_tokens == 256
    assert m.start("d", list(range(20000, 20000 + 64 * 8))) == PrefixHit(0, 0)
    assert not m.allocate("d", 64 * 8)  # c is running and holds 3 of 8 blocks
    m.check_invariants()


def test_admission_and_misuse_errors():
    m = mgr("recompute", n=8)
    assert m.max_request_tokens() == 8 * 64
    m.start("a", [1, 2, 3])
    assert not m.allocate("a", 8 * 64 + 1)
    with pytest.raises(CacheError, match="already started"):
        m.start("a", [1])
    with pytest.raises(CacheError, match="unknown request"):
        m.allocate("zz", 4)
    with pytest.raises(CacheError, match="not allocated|only"):
        m.commit("a", [1, 2, 3], 3)
    small = CacheManager(SPEC, {"swa": 1, "csa": 8, "hca": 8, "csa_state": 8, "hca_state": 8})
    assert small.max_request_tokens() == 0  # one swa block cannot hold a 16-token window
    with pytest.raises(CacheConfigError, match="policy"):
        mgr("lru")
    with pytest.raises(CacheConfigError, match="idx"):
        CacheManager(SPEC, {"csa": 4, "idx": 5})


def test_preempt_frees_everything_and_requeue_hits():
    m = mgr("full")
    toks = list(range(300))
    run(m, "a", toks)
    m.free("a")  # preemption = free + requeue the tokens (the scheduler's job)
    m.check_invariants()
    assert m.stats().running_requests == 0
    hit = m.start("a", toks)
    assert hit.cached_tokens == 256 and hit.recompute_from == 256
    m.free("a")
    m.clear_cached()
    m.check_invariants()
    assert all(v.blocks_used == 0 for v in m.stats().pools.values())


@pytest.mark.parametrize("policy", ["full", "checkpoint", "recompute"])
def test_from_budget_capacity_matches_simulation(policy):
    budget = 48 * 2**20
    m = CacheManager.from_budget(SPEC, budget, expected_context=1000, policy=policy, prefill_chunk=256)
    rep = m.capacity_report(1000)
    assert rep["total_bytes"] <= budget
    conc = rep["concurrent_sequences"]
    assert conc >= 1
    # the real allocator holds at least that many 1000-token sequences at once
    for i in range(conc):
        toks = [i * 100_000 + t for t in range(1000)]
        m.start(f"r{i}", toks)
        n = 0
        while n < 1000:
            n2 = min(1000, n + 256)
            assert m.allocate(f"r{i}", n2), (i, n2, policy)
            m.commit(f"r{i}", toks, n2)
            n = n2
    m.check_invariants()
    assert "concurrent sequences" in m.format_capacity_report(1000)


def test_from_budget_split_override_and_errors():
    m = CacheManager.from_budget(SPEC, 32 * 2**20, expected_context=512, policy="recompute",
                                 split_override={"swa": 0.5})
    swa_bytes = m.num_blocks["swa"] * SPEC.block_bytes("swa")
    assert swa_bytes == pytest.approx(0.5 * 32 * 2**20, rel=0.05)
    with pytest.raises(CacheConfigError, match="split_override"):
        CacheManager.from_budget(SPEC, 2**25, expected_context=512, split_override={"swa": 0.7, "csa": 0.6})
    with pytest.raises(CacheConfigError, match="split_override"):
        CacheManager.from_budget(SPEC, 2**25, expected_context=512, split_override={"idx": 0.1})
    with pytest.raises(CacheConfigError, match="budget_bytes"):
        CacheManager.from_budget(SPEC, 1000, expected_context=512)


def test_flash_capacity_report_orders_policies():
    spec = CacheSpec.from_model(flash(), "fp8", index_dtype="fp4")
    budget = 100 * 2**30
    caps = {p: CacheManager.from_budget(spec, budget, expected_context=131072, policy=p).capacity_report(131072)
            for p in ("full", "checkpoint", "recompute")}
    assert caps["recompute"]["token_capacity"] > caps["checkpoint"]["token_capacity"] > caps["full"]["token_capacity"]
    assert caps["recompute"]["token_capacity"] * spec.slope_bytes_per_token() <= budget


@pytest.mark.parametrize("policy", ["full", "recompute"])
def test_batch_block_tables_equal_the_padded_tables_step_by_step(policy):
    """The runner's numpy tables (refreshed only from the first entry written since the last read) equal the
    CacheManager's tables padded with -1 at every step: requests of different lengths, a prefix hit, a
    request freed and another started in between, decode steps crossing small-block boundaries."""
    import numpy as np

    m = mgr(policy, n=128)
    shared = list(range(1000, 1130))
    run(m, "a", shared + [1, 2, 3])
    run(m, "b", list(range(40)))
    m.start("c", shared + [7])  # prefix hit on a's blocks
    seqs = {"a": shared + [1, 2, 3], "b": list(range(40)), "c": shared + [7]}
    pools = ["swa", "csa", "hca", "csa_state", "hca_state"]

    def check(ids):
        got = m.batch_block_tables(ids, pools)
        for p in pools:
            rows = [m.block_tables(r)[p] for r in ids]
            width = max([1, *(len(r) for r in rows)])
            want = np.array([r + [-1] * (width - len(r)) for r in rows], dtype=np.int64)
            assert got[p].dtype == np.int64 and np.array_equal(got[p], want), (p, ids)

    for step in range(60):
        ids = sorted(seqs)
        for rid in ids:
            toks = seqs[rid]
            done = m.request(rid).num_computed
            n = min(len(toks), done + 37) if done < len(toks) else len(toks)
            assert m.allocate(rid, n)
            m.commit(rid, toks, n)
            if n == len(toks):
                toks.append(step)  # the next decode token
        check(ids)
        if step == 25:
            m.free("b")
            del seqs["b"]
            m.start("d", list(range(500, 520)))
            seqs["d"] = list(range(500, 520))
    m.check_invariants()
