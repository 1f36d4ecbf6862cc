"""Triton kernels under the interpreter (CPU) against the torch references, plus the dispatch rule.

Every call here passes `backend="triton"` (interpreted for CPU tensors), so the rest of the test
session keeps the torch reference. Shapes are tiny: the interpreter runs each tl op through numpy.
fp32 and fp16 only (the interpreter's bf16 tl.dot is wrong; the kernels upcast bf16 there anyway).
"""

from __future__ import annotations

import pytest
import torch
from dsv4.kernels import dispatch, reference, settings, triton_loader
from dsv4.kernels.fp8_kv import dequantize_kv_rows, quantize_kv_rows
from dsv4.kernels.settings import BACKEND_ENV, INTERPRET_ENV
from dsv4.kernels.triton_ops import plan_split

from tests.kernel_env import kernel_env

pytest.importorskip("triton")


def _rand_idx(g: torch.Generator, T: int, width: int, pool_rows: int, lengths: list[int]) -> torch.Tensor:
    """[T, width] scattered physical rows, row t valid for its first lengths[t] slots, plus random holes."""
    idx = torch.randperm(pool_rows, generator=g)[: T * width].reshape(T, width) if T * width <= pool_rows else \
        torch.randint(0, pool_rows, (T, width), generator=g)
    for t, n in enumerate(lengths):
        idx[t, n:] = -1
    holes = torch.rand(T, width, generator=g) < 0.15
    return torch.where(holes, torch.full_like(idx, -1), idx)


CASES = [
    # T, H, D, W, K, dtype, num_splits, fp8 rope_dim
    (3, 4, 32, 5, 37, torch.float32, None, None),   # ragged, partial windows
    (2, 20, 24, 16, 0, torch.float32, 1, None),     # 2 head blocks, D padded to 32, window only
    (2, 4, 16, 0, 40, torch.float16, 3, None),      # no window, split-K
    (3, 4, 32, 8, 50, torch.float32, 4, 8),         # fp8 rows, split-K
    (1, 16, 64, 16, 70, torch.float16, 2, 16),      # fp8, fp16 queries, two fp8 scale tiles
]


@pytest.mark.parametrize(("T", "H", "D", "W", "K", "dtype", "splits", "rope"), CASES)
def test_sparse_attention_matches_reference(T, H, D, W, K, dtype, splits, rope):
    g = torch.Generator().manual_seed(T * 1000 + H * 10 + D + W + K)
    Ns, Nc = 3 * W + 7, 2 * K + 5
    q = torch.randn(T, H, D, generator=g).to(dtype)
    swa = torch.randn(Ns, D, generator=g)
    comp = torch.randn(Nc, D, generator=g)
    sink = torch.randn(H, generator=g)
    swa_idx = _rand_idx(g, T, W, Ns, [W - (t % max(W, 1)) for t in range(T)])
    comp_idx = _rand_idx(g, T, K, Nc, [K - 3 * t for t in range(T)]) if K else None
    if rope is not None:
        swa_in, comp_in = quantize_kv_rows(swa, rope), quantize_kv_rows(comp, rope)
        swa_ref, comp_ref = dequantize_kv_rows(swa_in, D, rope), dequantize_kv_rows(comp_in, D, rope)
    else:
        swa_in, comp_in = swa.to(dtype), comp.to(dtype)
        swa_ref, comp_ref = swa_in, comp_in
    if comp_idx is None:
        comp_in = comp_ref = None
    scale = D ** -0.5
    ref = reference.sparse_attention_ref(q, swa_ref, swa_idx, comp_ref, comp_idx, sink, scale)
    out = dispatch.sparse_attention(q, swa_in, swa_idx, comp_in, comp_idx, sink, scale, rope_dim=rope,
                                    num_splits=splits, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (T, H, D)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # the fp8 reference path (uint8 pools straight into the reference) agrees too
    if rope is not None:
        ref8 = dispatch.sparse_attention(q, swa_in, swa_idx, comp_in, comp_idx, sink, scale, rope_dim=rope,
                                         backend="torch")
        torch.testing.assert_close(ref8, ref, atol=1e-6, rtol=1e-6)


def test_sparse_attention_all_masked_and_empty():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 16, generator=g)
    kv = torch.randn(10, 16, generator=g)
    sink = torch.randn(4, generator=g)
    none = torch.full((2, 3), -1)
    for splits in (1, 2):
        out = dispatch.sparse_attention(q, kv, none, kv, torch.full((2, 40), -1), sink, 0.25, num_splits=splits,
                                        backend="triton")
        assert torch.equal(out, torch.zeros_like(out))  # only the sink: zero value contribution
    empty = dispatch.sparse_attention(q[:0], kv, none[:0], None, None, sink, 0.25, backend="triton")
    assert empty.shape == (0, 4, 16)


def test_split_k_equals_no_split():
    """Long compressed list (HCA-like): every split count gives the same output (LSE combine)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, 16, generator=g)
    kv = torch.randn(200, 16, generator=g) * 2
    sink = torch.randn(4, generator=g)
    widx = torch.arange(190, 198)[None]
    cidx = torch.randperm(190, generator=g)[:150][None]
    outs = [dispatch.sparse_attention(q, kv, widx, kv, cidx, sink, 0.25, num_splits=s, backend="triton")
            for s in (1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "C"), [(torch.float32, 37), (torch.float16, 20)])
def test_indexer_scores_match_reference(dtype, C):
    g = torch.Generator().manual_seed(C)
    T, Hi, Di, N = 3, 20, 16, 60
    q = torch.randn(T, Hi, Di, generator=g).to(dtype)
    w = torch.randn(T, Hi, generator=g)
    keys = torch.randn(N, Di, generator=g).to(dtype)
    cand = _rand_idx(g, T, C, N, [C, C - 9, 0])
    ref = reference.indexer_scores_ref(q, w, keys, cand)
    out = dispatch.indexer_scores(q, w, keys, cand, backend="triton")
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and bool((ref[2] == float("-inf")).all())
    fin = torch.isfinite(ref)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[fin], ref[fin], atol=tol, rtol=tol)


def test_indexer_topk_selects_best_rows_and_fast_path():
    g = torch.Generator().manual_seed(5)
    T, Hi, Di, N, C, k = 3, 16, 16, 80, 40, 8
    q, w = torch.randn(T, Hi, Di, generator=g), torch.rand(T, Hi, generator=g)
    keys = torch.randn(N, Di, generator=g)
    cand = _rand_idx(g, T, C, N, [C, 30, 5])  # row 2: fewer visible than k
    top = dispatch.indexer_topk(q, w, keys, cand, k, backend="triton")
    ref_top = reference.indexer_topk_ref(q, w, keys, cand, k)
    assert top.shape == (T, k)
    scores = reference.indexer_scores_ref(q, w, keys, cand)
    for t in range(T):
        got = sorted(int(r) for r in top[t] if r >= 0)
        want = sorted(int(r) for r in ref_top[t] if r >= 0)
        assert len(got) == len(want) == min(k, int((cand[t] >= 0).sum()))
        # same scores selected (robust to exact ties)
        score_of = {int(c): float(s) for c, s in zip(cand[t], scores[t], strict=True) if c >= 0}
        assert sorted(score_of[r] for r in got) == pytest.approx(sorted(score_of[r] for r in want), rel=1e-5)
    # fast path: C <= k returns the candidates, padded with -1
    small = cand[:, :5]
    fast = dispatch.indexer_topk(q, w, keys, small, k, backend="triton")
    assert torch.equal(fast[:, :5], small) and bool((fast[:, 5:] == -1).all())


def test_plan_split_decode_vs_prefill():
    dec = plan_split(1, 64, 8192 + 128)
    assert dec.splits > 1 and dec.rows_per_split % dec.block_n == 0
    assert dec.splits * dec.rows_per_split >= 8320 > (dec.splits - 1) * dec.rows_per_split
    assert plan_split(4096, 64, 640).splits == 1  # prefill-sized batches fill the device without splitting
    assert plan_split(1, 64, 200).splits == 1  # short lists are not split
    with pytest.raises(ValueError, match="block_n"):
        plan_split(1, 4, 100, block_n=8)


def test_dispatch_rule():
    cpu = torch.zeros(1)
    unset = {INTERPRET_ENV: None, BACKEND_ENV: None}
    with kernel_env(unset):
        assert dispatch.choose_backend(cpu) == "torch"
        assert dispatch.choose_backend(cpu, backend="triton") == "interpret"
    with kernel_env({**unset, INTERPRET_ENV: "1"}):
        assert dispatch.choose_backend(cpu) == "interpret"
    with kernel_env({INTERPRET_ENV: "1", BACKEND_ENV: "torch"}):
        assert dispatch.choose_backend(cpu) == "torch"
    with kernel_env({BACKEND_ENV: "cuda"}), pytest.raises(ValueError, match="DSV4_KERNEL_BACKEND"):
        dispatch.choose_backend(cpu)


def test_environment_is_read_once_at_start_up(monkeypatch):
    """A kernel call does not read os.environ: a change takes effect on `settings.refresh()` (a new process)."""
    cpu = torch.zeros(1)
    with kernel_env({INTERPRET_ENV: None, BACKEND_ENV: "torch"}):
        monkeypatch.setenv(BACKEND_ENV, "cuda")  # not re-read by the call
        assert dispatch.choose_backend(cpu) == "torch"
        assert settings.refresh().backend == "cuda"
        with pytest.raises(ValueError, match="DSV4_KERNEL_BACKEND"):
            dispatch.choose_backend(cpu)
        monkeypatch.undo()
    assert settings.current() == settings.KernelSettings.from_env()


def test_interpreter_is_scoped_to_the_call():
    import triton
    from triton.runtime.jit import JITFunction

    q = torch.randn(1, 4, 16)
    kv = torch.randn(4, 16)
    dispatch.sparse_attention(q, kv, torch.arange(4)[None], None, None, torch.zeros(4), 0.25, backend="triton")
    assert triton.knobs.runtime.interpret is False or not triton.knobs.runtime.interpret
    assert isinstance(triton.language.zeros, JITFunction)  # the stdlib swap was undone
    # the compiled build is a different module object from the interpreted one
    assert triton_loader.load("triton_attention", True) is not triton_loader.load("triton_attention", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_on_cuda_model_shapes(fp8):
    """DeepSeek-V4-Flash shapes: 64 heads x 512 dims, bf16 queries, window 128 + top-512 compressed rows."""
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, D, W, K = 4, 64, 512, 128, 512
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    swa = torch.randn(4096, D, device="cuda", generator=g)
    comp = torch.randn(8192, D, device="cuda", generator=g)
    sink = torch.randn(H, device="cuda", generator=g)
    widx = torch.randint(0, 4096, (T, W), device="cuda", generator=g)
    cidx = torch.randint(0, 8192, (T, K), device="cuda", generator=g)
    cidx[0, 100:] = -1
    if fp8:
        swa_in, comp_in = quantize_kv_rows(swa, 64), quantize_kv_rows(comp, 64)
        swa, comp = dequantize_kv_rows(swa_in, D, 64), dequantize_kv_rows(comp_in, D, 64)
    else:
        swa_in, comp_in = swa.bfloat16(), comp.bfloat16()
    ref = reference.sparse_attention_ref(q, swa_in.float() if not fp8 else swa, widx,
                                         comp_in.float() if not fp8 else comp, cidx, sink, D ** -0.5)
    for splits in (None, 1):
        out = dispatch.sparse_attention(q, swa_in, widx, comp_in, cidx, sink, D ** -0.5, rope_dim=64,
                                        num_splits=splits)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
