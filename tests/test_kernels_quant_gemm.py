"""The GEMMs over weights kept FP8 / FP4 (`kernels/quant_gemm.py`, `kernels/triton_quant_gemm.py`): Triton under
the interpreter against the torch references, the expert tile schedule, argument errors, and the quantised tiny
model on the Triton backend against the torch backend.

Tolerance (`_bound`): both sides sum the same exact products (e4m3 / e2m1 times a power of two is exact in every
activation dtype) in fp32, in different orders. Each order is within γ_K·Σ_k |x_k·w_k| of the exact sum
(γ_K = K·2^-24), so they differ by at most 2·γ_K·Σ|x·w|; bf16 / fp16 outputs add one rounding of each side,
u·(|y| + |y'|) with u = 2^-8 / 2^-11. Weights use random codes and widely spread block exponents, so a wrong
scale block or nibble would be off by powers of two, far outside the bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from dsv4.kernels import dispatch, quant_gemm
from dsv4.runtime.checkpoint.quant import dequantize

from tests.kernel_env import kernel_env

pytest.importorskip("triton")

UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _bound(x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, out_dtype: torch.dtype | None = None
           ) -> torch.Tensor:
    k = x.shape[-1]
    acc = 2 * k * 2.0 ** -24 * (x.float().abs() @ w.float().abs().T)
    u = UNIT_ROUNDOFF[out_dtype or y_ref.dtype]
    return acc + u * (2 * y_ref.float().abs() + acc) + 1e-30


def _assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    assert out.shape == ref.shape
    excess = ((out.float() - ref.float()).abs() - bound).max().item()
    assert excess <= 0, f"exceeds the fp32 summation-order bound by {excess}"


def _fp8_weight(g: torch.Generator, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes (every finite code, subnormals included) and block exponents 2^-10 .. 2^10."""
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes).to(torch.uint8)  # no NaN codes
    scale = torch.randint(117, 138, (math.ceil(n / 128), math.ceil(k / 128)), generator=g, dtype=torch.int32)
    return codes.view(torch.float8_e4m3fn), scale.to(torch.uint8)


def _fp4_experts(g: torch.Generator, e: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed e2m1 codes (all 16, ±0 included) and per-32 exponents 2^-6 .. 2^6."""
    codes = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(121, 134, (e, n, math.ceil(k / 32)), generator=g, dtype=torch.int32).to(torch.uint8)
    return codes, scales


FP8_CASES = [
    # lead dims of x, N, K, x dtype, (block_m, block_n, block_k, split_k) or None for the interpreter defaults
    ((5,), 200, 300, torch.float32, None),          # ragged N and K: partial scale blocks on both
    ((2, 3), 130, 260, torch.bfloat16, None),       # 3-D x, ragged
    ((1,), 64, 128, torch.bfloat16, None),          # decode row, one block
    ((19,), 96, 384, torch.float32, (16, 32, 128, 1)),  # a K step covering a whole 128-column scale block
    ((40,), 136, 200, torch.float16, (32, 64, 64, 1)),  # two M tiles, fp16
    ((3,), 72, 300, torch.bfloat16, (16, 32, 64, 3)),   # split-K: 128 + 128 + 44 columns, fp32 partials added
    ((2,), 40, 512, torch.float32, (16, 32, 32, 2)),    # split-K: 2 x 256 columns
]


@pytest.mark.parametrize(("lead", "n", "k", "dtype", "blocks"), FP8_CASES)
def test_fp8_block_gemm_matches_reference(lead, n, k, dtype, blocks):
    g = torch.Generator().manual_seed(n * 1000 + k)
    q, s = _fp8_weight(g, n, k)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    ref = dispatch.fp8_block_gemm(x, q, s, backend="torch")
    if blocks is None:
        out = dispatch.fp8_block_gemm(x, q, s, backend="triton")
    else:
        bm, bn, bk, splits = blocks
        out = quant_gemm.fp8_block_gemm_triton(x, q, s, interpret=True, block_m=bm, block_n=bn, block_k=bk,
                                               split_k=splits)
    w = dequantize(q, s, (n, k), "w")
    assert out.dtype == ref.dtype == dtype
    _assert_within(out, ref, _bound(x.reshape(-1, k), w, ref.reshape(-1, n)).view(ref.shape))


def test_fp8_reference_is_the_dequantised_linear():
    g = torch.Generator().manual_seed(3)
    q, s = _fp8_weight(g, 130, 200)
    x = torch.randn(4, 200, generator=g).bfloat16()
    w = dequantize(q, s, (130, 200), "w")
    assert torch.equal(w.bfloat16().float(), w)  # e4m3 times a power of two is exact in bf16
    assert torch.equal(dispatch.fp8_block_gemm(x, q, s, backend="torch"), torch.nn.functional.linear(x, w.bfloat16()))


MXFP4_CASES = [
    # counts per expert (zeros: experts without tokens), N, K, x dtype, blocks
    ([3, 0, 17, 0, 1], 70, 96, torch.float32, None),   # empty experts between; 17 rows = 2 tiles of 16
    ([0, 5, 0, 0, 2, 0], 48, 80, torch.bfloat16, None),  # K = 80: a partial last 32-column scale group
    ([1, 1, 1], 130, 64, torch.float16, None),          # decode-like: one row per expert, ragged N
    ([40, 0, 9], 64, 256, torch.bfloat16, (32, 64, 128)),  # bigger tiles: 4 scale groups per K step
    ([2, 0, 3], 40, 160, torch.float32, (16, 32, 64)),     # 2 groups per step, the last step half empty
]


@pytest.mark.parametrize(("counts", "n", "k", "dtype", "blocks"), MXFP4_CASES)
def test_mxfp4_grouped_gemm_matches_reference(counts, n, k, dtype, blocks):
    g = torch.Generator().manual_seed(sum(counts) * 100 + n + k)
    codes, scales = _fp4_experts(g, len(counts), n, k)
    x = torch.randn(sum(counts), k, generator=g).to(dtype)
    ref = dispatch.mxfp4_grouped_gemm(x, codes, scales, counts, backend="torch")
    if blocks is None:
        out = dispatch.mxfp4_grouped_gemm(x, codes, scales, torch.tensor(counts), backend="triton")
    else:
        bm, bn, bk = blocks
        out = quant_gemm.mxfp4_grouped_gemm_triton(x, codes, scales, counts, interpret=True, block_m=bm, block_n=bn,
                                                   block_k=bk)
    assert out.dtype == ref.dtype == dtype
    bound = torch.empty_like(ref, dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        w = quant_gemm.expert_weight(codes, scales, e, torch.float32)
        bound[start:start + c] = _bound(x[start:start + c], w, ref[start:start + c])
        start += c
    _assert_within(out, ref, bound)


def test_mxfp4_no_rows_and_reference_is_per_expert_linear():
    g = torch.Generator().manual_seed(4)
    codes, scales = _fp4_experts(g, 3, 16, 64)
    empty = torch.zeros(0, 64)
    assert dispatch.mxfp4_grouped_gemm(empty, codes, scales, [0, 0, 0], backend="triton").shape == (0, 16)
    x = torch.randn(5, 64, generator=g).bfloat16()
    ref = dispatch.mxfp4_grouped_gemm(x, codes, scales, [2, 0, 3], backend="torch")
    w0 = dequantize(codes[0], scales[0], (16, 64), "w0").bfloat16()
    assert torch.equal(ref[:2], torch.nn.functional.linear(x[:2], w0))


def test_plan_split_k():
    # decode over a narrow weight (8 tiles, K 4096 on 132 SMs): min(ceil(264 / 8), 4096 / 512) = 8 splits of 512
    assert quant_gemm.plan_split_k(8, 4096, 132) == (8, 512)
    # ceil(264 / 32) = 9 wanted; 8192 / 9 columns rounded up to whole 128-blocks = 1024: 8 splits
    assert quant_gemm.plan_split_k(32, 8192, 132) == (8, 1024)
    assert quant_gemm.plan_split_k(256, 1024, 132) == (1, 1024)  # enough tiles: no split
    assert quant_gemm.plan_split_k(4, 896, 132) == (1, 896)  # K under 2 x 4 blocks: no split
    assert quant_gemm.plan_split_k(4, 300, 132, split_k=3) == (3, 128)
    assert quant_gemm.plan_split_k(4, 300, 132, split_k=5) == (3, 128)  # never an empty split
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        quant_gemm.plan_split_k(4, 300, 132, split_k=0)


def test_tile_schedule():
    expert, start, end = quant_gemm.tile_schedule([3, 0, 17, 0, 1], 16, torch.device("cpu"))
    assert expert.tolist() == [0, 2, 2, 4]
    assert start.tolist() == [0, 3, 19, 20]
    assert end.tolist() == [3, 20, 20, 21]
    assert [t.numel() for t in quant_gemm.tile_schedule([0, 0], 16, torch.device("cpu"))] == [0, 0, 0]


def test_argument_errors_name_the_field():
    q, s = _fp8_weight(torch.Generator().manual_seed(0), 130, 200)
    with pytest.raises(ValueError, match="last dim must equal qweight's K=200"):
        dispatch.fp8_block_gemm(torch.zeros(2, 100), q, s)
    with pytest.raises(ValueError, match=r"scale must be uint8 UE8M0 .* \[2, 2\]"):
        dispatch.fp8_block_gemm(torch.zeros(2, 200), q, s[:1])
    with pytest.raises(ValueError, match="qweight must be float8_e4m3fn"):
        dispatch.fp8_block_gemm(torch.zeros(2, 200), q.float(), s)
    codes, scales = _fp4_experts(torch.Generator().manual_seed(0), 2, 8, 64)
    with pytest.raises(ValueError, match="counts must be E=2 non-negative row counts summing to x's R=3"):
        dispatch.mxfp4_grouped_gemm(torch.zeros(3, 64), codes, scales, [1, 1])
    with pytest.raises(ValueError, match="K=32 must be twice the packed codes' last dim 32"):
        dispatch.mxfp4_grouped_gemm(torch.zeros(2, 32), codes, scales, [1, 1])
    with pytest.raises(ValueError, match=r"scales must be uint8 UE8M0 \[E, N, ceil\(K/32\)\] = \[2, 8, 2\]"):
        dispatch.mxfp4_grouped_gemm(torch.zeros(2, 64), codes, scales[..., :1], [1, 1])


def test_auto_backend_keeps_torch_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the CPU auto path must not launch Triton")

    monkeypatch.setattr(quant_gemm, "fp8_block_gemm_triton", fail)
    monkeypatch.setattr(quant_gemm, "mxfp4_grouped_gemm_triton", fail)
    q, s = _fp8_weight(torch.Generator().manual_seed(0), 16, 32)
    codes, scales = _fp4_experts(torch.Generator().manual_seed(0), 2, 8, 32)
    with kernel_env({dispatch.BACKEND_ENV: None, "TRITON_INTERPRET": None}):
        dispatch.fp8_block_gemm(torch.zeros(1, 32), q, s)
        dispatch.mxfp4_grouped_gemm(torch.zeros(1, 32), codes, scales, [1, 0])


def test_fp4_experts_forward_on_triton_equals_torch():
    """`Experts.forward` with FP4 experts: the grouped-GEMM path (Triton, interpreted) gives the torch loop's
    output; 5 experts of which 2 receive no token."""
    from dsv4.runtime.model.layers import Experts
    from dsv4.runtime.model.quantized import quantize_experts

    g = torch.Generator().manual_seed(8)
    ex = Experts(5, 64, 32, 7.0, torch.float32)
    quantize_experts(ex)
    for name, (n, k) in (("w1", (32, 64)), ("w2", (64, 32)), ("w3", (32, 64))):
        codes, scales = _fp4_experts(g, 5, n, k)
        ex._buffers[name + "_q"].copy_(codes)
        ex._buffers[name + "_s"].copy_(scales - 6)  # values ~2^-6 .. 2^6 / 64: activations stay O(1)
    x = torch.randn(6, 64, generator=g)
    idx = torch.tensor([[0, 3], [3, 0], [0, 1], [3, 1], [1, 0], [3, 0]])
    w = torch.rand(6, 2, generator=g)
    with kernel_env({dispatch.BACKEND_ENV: "torch"}):
        ref = ex(x, idx, w)
    with kernel_env({dispatch.BACKEND_ENV: "triton"}):
        out = ex(x, idx, w)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fp4_experts_are_never_gathered():
    """The compiled decode step gathers a small batch's expert matrices only from plain stacked weights; FP4 experts
    (no `w1` parameter) answer `gathers` False instead of failing on the missing parameter, and take the grouped
    path (an eager island in the compiled step)."""
    from dsv4.runtime.model.layers import Experts
    from dsv4.runtime.model.quantized import quantize_experts

    plain, fp4 = Experts(5, 64, 32, 7.0, torch.float32), Experts(5, 64, 32, 7.0, torch.float32)
    quantize_experts(fp4)
    assert not plain.fp4 and plain.gathers(2)
    assert fp4.fp4 and not fp4.gathers(2)


def test_quantised_model_logits_on_triton_equal_torch(tmp_path):
    """The tiny "mix" model (every layer kind, MTP weights held too) loaded with its FP8 linears and FP4 experts
    kept quantised: a prefill on DSV4_KERNEL_BACKEND=triton (every kernel interpreted, these GEMMs included) gives
    the torch backend's logits (measured ≤ 4e-6 on logits of magnitude ~4).

    fp32 only: in bf16 a one-ulp difference in any GEMM can flip a discrete choice of this random tiny model
    (learned routing, the indexer's top-2), after which the two bf16 runs differ by O(1) at some positions; which
    run is nearer the fp32 model is then a coin toss. The kernel tests above bound bf16 per GEMM."""
    from dsv4.runtime.checkpoint.published import write_published_checkpoint
    from dsv4.runtime.checkpoint.random_init import random_tensors
    from dsv4.runtime.model import load_model

    from tests.model_utils import prefill_logits, tiny_configs

    cfg = tiny_configs()["mix"]
    write_published_checkpoint(cfg, random_tensors(cfg, seed=6), tmp_path)
    model, _, _ = load_model(tmp_path, progress=False, dtype="float32", weights_dtype="checkpoint")
    ids = list(range(5, 21))  # 16 tokens: 4 CSA blocks (ratio 4), 2 HCA blocks (ratio 8)
    calls = {"fp8": 0, "fp4": 0}
    fp8_triton, fp4_triton = quant_gemm.fp8_block_gemm_triton, quant_gemm.mxfp4_grouped_gemm_triton

    def count_fp8(*args, **kwargs):
        calls["fp8"] += 1
        return fp8_triton(*args, **kwargs)

    def count_fp4(*args, **kwargs):
        calls["fp4"] += 1
        return fp4_triton(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant_gemm, "fp8_block_gemm_triton", count_fp8)
        mp.setattr(quant_gemm, "mxfp4_grouped_gemm_triton", count_fp4)
        with kernel_env({dispatch.BACKEND_ENV: "torch"}):
            ref = prefill_logits(model, cfg, ids)
        assert calls == {"fp8": 0, "fp4": 0}
        with kernel_env({dispatch.BACKEND_ENV: "triton"}):
            out = prefill_logits(model, cfg, ids)
    assert calls["fp8"] > 0 and calls["fp4"] == 3 * cfg.num_hidden_layers  # w1, w3, w2 per MoE layer
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref.abs().max().item()), f"logits differ by {diff}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_gemms_compiled_on_cuda(dtype):
    """DeepSeek-V4-Flash shapes: an FP8 weight [4096, 1024] at decode and prefill rows; MXFP4 experts [2048, 4096]
    (64 of Flash's 256, to keep the test short) with 6 choices per token, most experts empty at decode. Against
    an fp32 product of the dequantised weights (cuBLAS bf16 may reduce split-K partials in bf16, so the torch
    bf16 path is not the oracle here)."""
    g = torch.Generator().manual_seed(0)
    q, s = _fp8_weight(g, 4096, 1024)
    w = dequantize(q, s, (4096, 1024), "w").cuda()
    q, s = q.cuda(), s.cuda()
    for m in (1, 64, 1000):
        x = torch.randn(m, 1024, generator=g).to(dtype).cuda()
        out = dispatch.fp8_block_gemm(x, q, s)
        ref = x.float() @ w.T
        assert out.dtype == dtype
        _assert_within(out, ref, _bound(x, w, ref, dtype))
    codes, scales = _fp4_experts(g, 64, 2048, 4096)
    codes, scales = codes.cuda(), scales.cuda()
    for tokens in (4, 512):
        idx = torch.stack([torch.randperm(64, generator=g)[:6] for _ in range(tokens)]).flatten()
        counts = torch.bincount(idx, minlength=64).tolist()
        x = torch.randn(6 * tokens, 4096, generator=g).to(dtype).cuda()
        out = dispatch.mxfp4_grouped_gemm(x, codes, scales, counts)
        start = 0
        for e, c in enumerate(counts):
            if c:
                we = quant_gemm.expert_weight(codes, scales, e, torch.float32)
                rows = x[start:start + c]
                ref = rows.float() @ we.T
                _assert_within(out[start:start + c], ref, _bound(rows, we, ref, dtype))
            start += c
