"""The torch path's indexer and sparse attention (`kernels/prefix_gemm.py`: one GEMM per run of prefill rows)
against the references' per-query gather, on batches laid out as the engine lays them out: prefill chunks of
several sequences, decode tokens, prefix hits sharing physical rows, holes, quantised keys and FP8 rows."""

from __future__ import annotations

import torch
from dsv4.kernels import dispatch, reference
from dsv4.kernels.fp8_kv import quantize_kv_rows
from dsv4.kernels.index_quant import quantize_index_rows
from dsv4.kernels.prefix_gemm import RUN_MIN, indexer_scores_shared, prefix_runs, sparse_attention_shared
from hypothesis import given, settings
from hypothesis import strategies as st


def _batch(seqs: list[tuple[int, int, int]], shared: int, holes: bool, seed: int
           ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """cand_idx [T, C] for sequences given as (entries before the chunk, rows in the chunk, growth per row):
    row r of a sequence sees entries [0, before + r * growth); every sequence's first `shared` entries
    are the same physical rows (a prefix hit); `holes` drops one entry of each sequence everywhere.
    Also returns each sequence's row range."""
    g = torch.Generator().manual_seed(seed)
    rows, ranges, next_row = [], [], 1000
    width = max(b + (n - 1) * gr for b, n, gr in seqs)
    common = torch.arange(shared)
    for b, n, gr in seqs:
        longest = b + (n - 1) * gr
        own = torch.randperm(4 * width + 8, generator=g)[: max(0, longest - shared)] + next_row
        next_row += 4 * width + 8
        phys = torch.cat([common[: min(shared, longest)], own])[:longest]
        if holes and longest > 2:
            phys[longest // 2] = -1
        ranges.append((len(rows), len(rows) + n))
        for r in range(n):
            row = torch.full((width,), -1, dtype=torch.int64)
            vis = b + r * gr
            row[:vis] = phys[:vis]
            rows.append(row)
    return torch.stack(rows), ranges


def _inputs(cand: torch.Tensor, H: int, Di: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    T = cand.shape[0]
    n_rows = int(cand.max()) + 1 if cand.numel() else 1
    keys = torch.randn(max(n_rows, 1), Di, generator=g)
    return torch.randn(T, H, Di, generator=g), torch.randn(T, H, generator=g), keys


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-5, atol=1e-5)


def test_runs_are_each_sequences_prefill_rows_and_skip_decode_tokens():
    # two prefill chunks (6 and 5 rows), three decode tokens of other sequences, one short chunk
    cand, ranges = _batch([(3, 6, 1), (0, 5, 2), (9, 1, 0), (4, 1, 0), (7, 1, 0), (2, 3, 1)], shared=2,
                          holes=False, seed=1)
    assert prefix_runs(cand) == [ranges[0], ranges[1]]  # the 3-row chunk is below RUN_MIN
    assert RUN_MIN == 4
    # a row that is not a prefix of the next splits a run
    broken = cand.clone()
    broken[1, 0] = 77_777
    assert prefix_runs(broken) == [(2, 6), ranges[1]]


@settings(max_examples=60, deadline=None)
@given(seqs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 9), st.integers(0, 3)), min_size=1, max_size=5),
       shared=st.integers(0, 6), holes=st.booleans(), H=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))
def test_scores_equal_the_reference(seqs, shared, holes, H, seed):
    cand, _ = _batch(seqs, shared, holes, seed)
    q, w, keys = _inputs(cand, H, 16, seed)
    _close(indexer_scores_shared(q, w, keys, cand), reference.indexer_scores_ref(q, w, keys, cand))


def test_quantised_keys_and_small_gemm_blocks(monkeypatch):
    import dsv4.kernels.prefix_gemm as mod

    cand, _ = _batch([(5, 12, 3), (0, 1, 0), (20, 7, 1)], shared=3, holes=True, seed=7)
    q, w, keys = _inputs(cand, 4, 64, 7)
    monkeypatch.setattr(mod, "BLOCK_ELEMS", 4 * cand.shape[1] * 3)  # 3 rows per GEMM block
    for fmt in ("fp8", "fp4"):
        packed = quantize_index_rows(keys, fmt)
        _close(indexer_scores_shared(q, w, packed, cand, index_format=fmt),
               reference.indexer_scores_ref(q, w, packed, cand, index_format=fmt))


def test_cpu_dispatch_uses_it_and_selects_the_same_rows():
    cand, _ = _batch([(40, 16, 1), (10, 1, 0)], shared=0, holes=False, seed=3)
    q, w, keys = _inputs(cand, 4, 32, 3)
    out = dispatch.indexer_topk(q, w, keys, cand, 8, backend="torch")
    ref = reference.topk_from_scores(reference.indexer_scores_ref(q, w, keys, cand), cand, 8)
    assert torch.equal(out, ref)


def _window(T: int, W: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query window rows (ragged: some rows partly or fully -1) into a pool of 3*W rows."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 3 * W, (T, W), generator=g)
    keep = torch.randint(0, W + 1, (T,), generator=g)
    idx = torch.where(torch.arange(W)[None, :] < keep[:, None], idx, torch.full_like(idx, -1))
    return idx, torch.randn(3 * W, 32, generator=g)


@settings(max_examples=50, deadline=None)
@given(seqs=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 9), st.integers(0, 2)), min_size=1, max_size=4),
       shared=st.integers(0, 5), holes=st.booleans(), comp=st.sampled_from(["rows", "none", "empty"]),
       seed=st.integers(0, 2**16))
def test_sparse_attention_equals_the_reference(seqs, shared, holes, comp, seed):
    """Runs, per-query rows, sliding-window-only layers (no compressed rows) and an empty compressed list;
    the window helper leaves some rows' windows fully masked (only the sink remains)."""
    comp_idx, _ = _batch(seqs, shared, holes, seed)
    T, H, D = comp_idx.shape[0], 4, 32
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=g) * 2
    comp_kv = torch.randn(int(comp_idx.max()) + 1 if comp_idx.numel() else 1, D, generator=g)
    if comp == "none":
        comp_kv = comp_idx = None
    elif comp == "empty":
        comp_idx = comp_idx[:, :0]
    swa_idx, swa_kv = _window(T, 8, seed)
    sink = torch.randn(H, generator=g)
    ref = reference.sparse_attention_ref(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, D ** -0.5)
    import dsv4.kernels.prefix_gemm as mod

    few, cols = mod.FEW_ROWS, mod.MIN_RUN_COLS
    try:  # (0, 0): every run and every small batch takes the GEMM / unconcatenated paths
        for mod.FEW_ROWS, mod.MIN_RUN_COLS in ((0, 0), (few, 0), (few, cols)):
            out = sparse_attention_shared(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, D ** -0.5)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    finally:
        mod.FEW_ROWS, mod.MIN_RUN_COLS = few, cols


def test_sparse_attention_fp8_rows_small_blocks_and_dispatch(monkeypatch):
    import dsv4.kernels.prefix_gemm as mod

    comp_idx, _ = _batch([(6, 10, 2), (3, 1, 0), (0, 6, 1)], shared=2, holes=True, seed=11)
    T, H, D, rope = comp_idx.shape[0], 4, 64, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(T, H, D, generator=g)
    comp = quantize_kv_rows(torch.randn(int(comp_idx.max()) + 1, D, generator=g), rope)
    swa_idx, _ = _window(T, 8, 11)
    swa = quantize_kv_rows(torch.randn(24, D, generator=g), rope)
    sink = torch.randn(H, generator=g)
    monkeypatch.setattr(mod, "BLOCK_ELEMS", H * comp_idx.shape[1] * 3)  # 3 rows per GEMM block
    monkeypatch.setattr(mod, "MIN_RUN_COLS", 0)
    ref = reference.sparse_attention_ref(q, swa, swa_idx, comp, comp_idx, sink, 0.1, rope_dim=rope)
    torch.testing.assert_close(sparse_attention_shared(q, swa, swa_idx, comp, comp_idx, sink, 0.1, rope_dim=rope),
                               ref, rtol=1e-5, atol=1e-5)
    via = dispatch.sparse_attention(q, swa, swa_idx, comp, comp_idx, sink, 0.1, rope_dim=rope, backend="torch")
    torch.testing.assert_close(via, ref, rtol=1e-5, atol=1e-5)


def test_decode_rows_after_a_shared_prompt_skip_the_gather(monkeypatch):
    """Sixteen sequences decoding after the same 60-entry prompt (a prefix hit), each with two entries of its
    own: one GEMM against the longest row's keys plus the 30 own entries; no per-query gather."""
    import dsv4.kernels.prefix_gemm as mod

    cand, _ = _batch([(62, 1, 0)] * 16, shared=60, holes=False, seed=5)
    q, w, keys = _inputs(cand, 4, 16, 5)
    ref = reference.indexer_scores_ref(q, w, keys, cand)
    calls = []
    monkeypatch.setattr(mod, "indexer_scores_ref", lambda *a, **k: calls.append(1) or ref)
    assert prefix_runs(cand) == []
    _close(indexer_scores_shared(q, w, keys, cand), ref)
    assert not calls
    # sequences without a common prompt: the reference's gather
    alone, _ = _batch([(62, 1, 0)] * 16, shared=0, holes=False, seed=5)
    indexer_scores_shared(q, w, keys, alone)
    assert calls == [1]


def test_gathered_rows_are_attended_in_bounded_blocks(monkeypatch):
    """Rows outside runs (and every row's window) are gathered a block of queries at a time, so a long prefill
    step's temporaries do not grow with its token count; blocked results equal the reference."""
    import dsv4.kernels.prefix_gemm as mod

    assert 1 < mod.gather_rows_per_block(128, 256, 128) <= mod.GATHER_BLOCK_ELEMS // ((128 + 256) * 128)
    comp_idx, _ = _batch([(40, 30, 1), (3, 1, 0), (0, 20, 2)], shared=2, holes=True, seed=3)
    T, H, D = comp_idx.shape[0], 4, 32
    g = torch.Generator().manual_seed(3)
    q = torch.randn(T, H, D, generator=g)
    comp_kv = torch.randn(int(comp_idx.max()) + 1, D, generator=g)
    swa_idx, swa_kv = _window(T, 8, 3)
    sink = torch.randn(H, generator=g)
    ref = reference.sparse_attention_ref(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, D ** -0.5)
    sizes = []
    real_gather = mod.gather_kv

    def counted_gather(pool, idx, *a):
        sizes.append(idx.shape[0])
        return real_gather(pool, idx, *a)

    monkeypatch.setattr(mod, "gather_kv", counted_gather)
    monkeypatch.setattr(mod, "GATHER_BLOCK_ELEMS", 5 * (8 + comp_idx.shape[1]) * D)  # 5 queries per block
    for cols in (0, 10_000):  # runs through the GEMM path, or every row gathered
        monkeypatch.setattr(mod, "MIN_RUN_COLS", cols)
        sizes.clear()
        out = sparse_attention_shared(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, D ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # window gathers of the run path: the window alone sets the block (5 * (8 + C) / 8 queries)
        assert sizes and max(sizes) <= 5 * (8 + comp_idx.shape[1]) // 8 < T, (sizes, T)


def test_long_prefill_step_attention_memory_does_not_grow_with_its_tokens():
    """2,048 query rows with their own top-256 compressed rows and a 128-row window (D 128): unblocked, the
    gathers alone were 2048 x 384 x 128 fp32 = 384 MiB; blocked, the step's peak stays near one block."""
    import os

    from dsv4.bench.rss_watch import RssWatch

    T, H, D, W, K, N = 2048, 8, 128, 128, 256, 4096
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, H, D, generator=g)
    kv = torch.randn(N, D, generator=g)
    swa_idx = torch.randint(0, N, (T, W), generator=g)
    comp_idx = torch.randint(0, N, (T, K), generator=g)  # top-k rows: no prefix runs
    sink = torch.randn(H, generator=g)
    sparse_attention_shared(q[:64], kv, swa_idx[:64], kv, comp_idx[:64], sink, D ** -0.5)  # warm-up
    watch = RssWatch(os.getpid(), interval_s=0.005)
    out = sparse_attention_shared(q, kv, swa_idx, kv, comp_idx, sink, D ** -0.5)
    grown = watch.stop() - watch.start_rss
    assert out.shape == (T, H, D)
    assert grown < 160 * 2**20, grown / 2**20
