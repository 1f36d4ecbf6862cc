"""Indexer top-k (Triton radix select, interpreted) and quantised indexer keys against the references."""

from __future__ import annotations

import pytest
import torch
from dsv4.kernels import dispatch, reference
from dsv4.kernels.index_quant import dequantize_index_rows, quantize_index_rows

pytest.importorskip("triton")


def _scores(g: torch.Generator, T: int, C: int, visible: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores with many exact ties (small integers, ReLU zeros, negatives), -inf / -1 holes, ragged rows."""
    s = torch.randint(-3, 4, (T, C), generator=g).float() * 0.5
    s[:, ::7] = 0.0
    s[0, : C // 2] = torch.randn(C // 2, generator=g)  # row 0: mostly distinct
    cand = torch.randperm(4 * T * C, generator=g)[: T * C].reshape(T, C)
    for t, n in enumerate(visible):
        cand[t, n:] = -1
        s[t, n:] = float("-inf")
    holes = torch.rand(T, C, generator=g) < 0.1
    cand = torch.where(holes, torch.full_like(cand, -1), cand)  # a -1 candidate never counts, whatever its score
    return s, cand


@pytest.mark.parametrize(("T", "C", "k", "visible"), [
    (4, 150, 8, [150, 150, 5, 0]),   # several 64-column blocks, fewer visible than k, nothing visible
    (3, 40, 16, [40, 33, 16]),       # ties straddle the k-th place
    (2, 70, 1, [70, 3]),             # k = 1
])
def test_topk_triton_equals_reference(T, C, k, visible):
    g = torch.Generator().manual_seed(T * C + k)
    s, cand = _scores(g, T, C, visible)
    ref = reference.topk_from_scores(s, cand, k)
    out = dispatch.select_topk(s, cand, k, backend="triton")
    assert out.dtype == cand.dtype and torch.equal(out, ref)
    for t in range(T):
        ok = torch.isfinite(s[t]) & (cand[t] >= 0)
        assert int((out[t] >= 0).sum()) == min(k, int(ok.sum()))
        # every selected score >= every unselected visible score
        chosen = set(out[t][out[t] >= 0].tolist())
        sel = torch.tensor([int(c) in chosen for c in cand[t]]) & ok
        if bool(sel.any()) and bool((ok & ~sel).any()):
            assert float(s[t][sel].min()) >= float(s[t][ok & ~sel].max())
            # ties at the k-th place went to the lowest columns
            kth = float(s[t][sel].min())
            tied_cols = torch.nonzero(ok & (s[t] == kth)).flatten()
            taken = sel[tied_cols]
            assert bool((taken[:-1].int() >= taken[1:].int()).all())


@pytest.mark.parametrize("case", range(8))
def test_fast_torch_topk_equals_reference(case):
    """`topk_torch.py` (the CPU dispatch) = the reference on tie-heavy rows, float rows, -1 candidates with
    finite scores, +inf / NaN scores and rows with fewer than k finite scores."""
    from dsv4.kernels.topk_torch import topk_from_scores_fast

    g = torch.Generator().manual_seed(case)
    T, C, k = 6, 97, [1, 5, 16, 33][case % 4]
    if case < 4:
        s, cand = _scores(g, T, C, [C, C - 3, k + 1, k, 3, 0])
    else:
        s = torch.randn(T, C, generator=g)
        cand = torch.randperm(10 * C, generator=g)[: T * C].reshape(T, C)
        cand[1, 5] = -1  # invisible but with a high finite score
        s[1, 5] = 100.0
        s[2, 7], s[3, 9], s[4, :C - 2] = float("inf"), float("nan"), float("-inf")
        s[5, 11] = s[5, 12] = s[5].max() + 1  # tie at the top
    ref = reference.topk_from_scores(s, cand, k)
    assert torch.equal(topk_from_scores_fast(s, cand, k), ref)
    assert torch.equal(dispatch.select_topk(s, cand, k, backend="torch"), ref)


def test_model_selects_through_the_dispatch():
    """The model has no top-k of its own: `runtime/model/topk.py` is the dispatch's (Triton on CUDA)."""
    from dsv4.runtime.model import attention, topk

    assert topk.select_topk is dispatch.select_topk
    # attention takes its top-k through dispatch.indexer_topk (Attention.top_entries), with no selection of its own
    assert attention.dispatch is dispatch and not hasattr(attention, "select_topk")


def test_indexer_topk_end_to_end_and_fast_path():
    g = torch.Generator().manual_seed(2)
    T, Hi, Di, N, C, k = 2, 16, 16, 90, 40, 6
    q, w = torch.randn(T, Hi, Di, generator=g), torch.rand(T, Hi, generator=g)
    keys = torch.randn(N, Di, generator=g)
    cand = torch.randperm(N, generator=g)[: T * C].reshape(T, C)
    cand[1, 20:] = -1
    top = dispatch.indexer_topk(q, w, keys, cand, k, backend="triton")
    scores = reference.indexer_scores_ref(q, w, keys, cand)
    assert torch.equal(top, reference.topk_from_scores(scores, cand, k))  # distinct scores: one answer
    fast = dispatch.indexer_topk(q, w, keys, cand[:, :4], k, backend="triton")
    assert torch.equal(fast[:, :4], cand[:, :4]) and bool((fast[:, 4:] == -1).all())


@pytest.mark.parametrize(("fmt", "dtype"), [("fp8", torch.float32), ("fp4", torch.float32), ("fp8", torch.float16)])
def test_indexer_scores_quantised_keys(fmt, dtype):
    """uint8 fp8 / fp4 index rows are decoded on load: same scores as the float path on the decoded keys."""
    g = torch.Generator().manual_seed(len(fmt))
    T, Hi, Di, N, C = 3, 16, 64, 80, 24
    q = torch.randn(T, Hi, Di, generator=g).to(dtype)
    w = torch.randn(T, Hi, generator=g)
    rows = quantize_index_rows(torch.randn(N, Di, generator=g) * 3, fmt)
    cand = torch.randperm(N, generator=g)[: T * C].reshape(T, C)
    cand[2, 10:] = -1
    decoded = dequantize_index_rows(rows, Di, fmt)
    want = reference.indexer_scores_ref(q, w, decoded, cand)
    ref = dispatch.indexer_scores(q, w, rows, cand, index_format=fmt, backend="torch")
    assert torch.equal(ref, want)
    out = dispatch.indexer_scores(q, w, rows, cand, index_format=fmt, backend="triton")
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    fin = torch.isfinite(want)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[fin], want[fin], atol=tol, rtol=tol)


def test_indexer_scores_bad_key_rows():
    q, w = torch.zeros(1, 2, 64), torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"uint8 \[N, 68\]"):
        dispatch.indexer_scores(q, w, torch.zeros(4, 64, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.long),
                                index_format="fp8")
    with pytest.raises(ValueError, match="index format"):
        dispatch.indexer_scores(q, w, torch.zeros(4, 64, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.long),
                                index_format="int4")
    with pytest.raises(ValueError, match="k must be"):
        dispatch.select_topk(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_topk_compiled_on_cuda():
    """Flash decode shape: k = 512 over 32K candidates (128K context), ties included; equals the reference."""
    g = torch.Generator().manual_seed(0)
    s, cand = _scores(g, 4, 32768, [32768, 20000, 300, 0])
    ref = reference.topk_from_scores(s, cand, 512)
    out = dispatch.select_topk(s.cuda(), cand.cuda(), 512)
    assert torch.equal(out.cpu(), ref)
