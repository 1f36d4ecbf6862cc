"""Host-side launchers of the Triton kernels in `triton_attention.py` (shapes, tiles, split-K plan).

Tile rules: every `tl.dot` operand dimension is >= 16 and a power of two (GPU compilation rejects
smaller tiles; `tl.arange` needs powers of two); head_dim is padded up to a power of two and masked.
In the interpreter bf16 `tl.dot` is wrong (triton-lang/triton#11584), so bf16 operands are upcast to
fp32 there; fp32 inputs always use an exact ("ieee") fp32 dot.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from dsv4.kernels import triton_loader
from dsv4.kernels.fp8_kv import fp8_layout, fp8_row_bytes


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SplitPlan:
    """How one sparse-attention launch is cut: programs = T x head_blocks x splits."""

    block_h: int
    block_n: int
    head_blocks: int
    splits: int
    rows_per_split: int


def plan_split(T: int, H: int, total_rows: int, *, num_splits: int | None = None, block_h: int | None = None,
               block_n: int = 32, num_sms: int = 132) -> SplitPlan:
    """Split-K decision: cut the row list only when T x head_blocks programs cannot fill the device.

    splits = min(ceil(total / (4·BLOCK_N)), ceil(2·SMs / programs)) for long lists and few programs
    (decode); 1 for prefill-sized T. Each split covers a multiple of BLOCK_N list positions.
    """
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    bh = block_h or min(_pow2(H), 16)
    if bh < 16 or bh & (bh - 1):
        raise ValueError(f"block_h must be a power of two >= 16, got {bh}")
    hb = _cdiv(H, bh)
    programs = max(1, T * hb)
    if num_splits is None:
        num_splits = 1
        if programs < num_sms and total_rows > 8 * block_n:
            num_splits = max(1, min(_cdiv(total_rows, 4 * block_n), _cdiv(2 * num_sms, programs), 128))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    rps = max(block_n, _cdiv(_cdiv(max(total_rows, 1), num_splits), block_n) * block_n)
    splits = max(1, _cdiv(total_rows, rps))
    return SplitPlan(bh, block_n, hb, splits, rps)


def _launch_ctx(interpret: bool):
    return triton_loader.interpret_mode(True) if interpret else contextlib.nullcontext()


def _dot_f32(dtype: torch.dtype, interpret: bool) -> bool:
    return dtype == torch.float32 or (interpret and dtype == torch.bfloat16)


def sparse_attention_triton(q: torch.Tensor, swa_kv: torch.Tensor, swa_idx: torch.Tensor,
                            comp_kv: torch.Tensor | None, comp_idx: torch.Tensor | None, sink: torch.Tensor,
                            scale: float, *, rope_dim: int | None, interpret: bool, num_splits: int | None = None,
                            block_h: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Triton hybrid sparse attention; same contract as `reference.sparse_attention_ref`. Returns fp32."""
    mod = triton_loader.load("triton_attention", interpret)
    T, H, D = q.shape
    q = q.contiguous()
    swa_idx = swa_idx.contiguous()
    if comp_kv is None or comp_idx is None:
        comp_kv, comp_idx = swa_kv, swa_idx[:, :0]
    comp_idx = comp_idx.contiguous()
    W, K = swa_idx.shape[1], comp_idx.shape[1]
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    if T == 0:
        return out
    swa_fp8, comp_fp8 = swa_kv.dtype == torch.uint8, comp_kv.dtype == torch.uint8
    nope = rope_off = scale_off = 0
    if swa_fp8 or comp_fp8:
        if rope_dim is None:
            raise ValueError("rope_dim is required for fp8 (uint8) KV rows")
        nope, rope_off, scale_off, _ = fp8_layout(D, rope_dim)
        rb = fp8_row_bytes(D, rope_dim)
        for name, t in (("swa_kv", swa_kv), ("comp_kv", comp_kv)):
            if t.dtype == torch.uint8 and t.shape[1] != rb:
                raise ValueError(f"{name}: fp8 rows must have {rb} bytes for head_dim={D} rope_dim={rope_dim}, "
                                 f"got {t.shape[1]}")
    if swa_kv.stride(1) != 1 or comp_kv.stride(1) != 1:
        raise ValueError("KV pools must have unit stride along the row")
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    plan = plan_split(T, H, W + K, num_splits=num_splits, block_h=block_h,
                      block_n=block_n or (16 if interpret else 32), num_sms=num_sms)
    BLOCK_D = _pow2(D)
    common = dict(BLOCK_H=plan.block_h, BLOCK_N=plan.block_n, BLOCK_D=BLOCK_D, SWA_FP8=swa_fp8, COMP_FP8=comp_fp8,
                  NOPE=nope, ROPE_OFF=rope_off, SCALE_OFF=scale_off, DOT_F32=_dot_f32(q.dtype, interpret))
    sink = sink.contiguous()
    grid = (T, plan.head_blocks, plan.splits)
    with _launch_ctx(interpret):
        if plan.splits == 1:
            mod.sparse_attention_kernel[grid](
                q, q.stride(0), q.stride(1), swa_kv, swa_kv.stride(0), swa_idx, swa_idx.stride(0), W,
                comp_kv, comp_kv.stride(0), comp_idx, comp_idx.stride(0), K,
                sink, out, out.stride(0), out.stride(1), out, 0, 0, 0, H, D, float(scale), plan.rows_per_split,
                SPLIT=False, **common)
            return out
        part = torch.empty(plan.splits, T, H, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(plan.splits, T, H, dtype=torch.float32, device=q.device)
        mod.sparse_attention_kernel[grid](
            q, q.stride(0), q.stride(1), swa_kv, swa_kv.stride(0), swa_idx, swa_idx.stride(0), W,
            comp_kv, comp_kv.stride(0), comp_idx, comp_idx.stride(0), K,
            sink, part, part.stride(1), part.stride(2), lse, lse.stride(0), lse.stride(1), part.stride(0),
            H, D, float(scale), plan.rows_per_split, SPLIT=True, **common)
        mod.combine_kernel[(T, plan.head_blocks)](
            part, part.stride(0), part.stride(1), part.stride(2), lse, lse.stride(0), lse.stride(1), sink,
            out, out.stride(0), out.stride(1), plan.splits, H, D, BLOCK_H=plan.block_h, BLOCK_D=BLOCK_D)
    return out


def indexer_scores_triton(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, cand_idx: torch.Tensor, *,
                          interpret: bool, block_c: int | None = None, index_format: str | None = None) -> torch.Tensor:
    """Triton indexer scores [T, C] fp32 (-inf where cand < 0); contract of `reference.indexer_scores_ref`.
    `index_format` "fp8" / "fp4": keys are uint8 `index_quant` rows, decoded on load."""
    mod = triton_loader.load("triton_attention", interpret)
    T, HI, DI = q.shape
    C = cand_idx.shape[1]
    out = torch.empty(T, C, dtype=torch.float32, device=q.device)
    if T == 0 or C == 0:
        return out
    q, weights, cand_idx = q.contiguous(), weights.contiguous(), cand_idx.contiguous()
    if keys.stride(1) != 1:
        raise ValueError("indexer keys must have unit stride along the row")
    bc = block_c or (16 if interpret else 64)
    if bc < 16 or bc & (bc - 1):
        raise ValueError(f"block_c must be a power of two >= 16, got {bc}")
    grid = (T, _cdiv(C, bc))
    with _launch_ctx(interpret):
        mod.indexer_scores_kernel[grid](
            q, q.stride(0), q.stride(1), weights, weights.stride(0), keys, keys.stride(0),
            cand_idx, cand_idx.stride(0), out, out.stride(0), HI, DI, C,
            BLOCK_HI=min(_pow2(HI), 64), BLOCK_C=bc, BLOCK_DI=_pow2(DI), DOT_F32=_dot_f32(q.dtype, interpret),
            KEY_FMT={None: 0, "fp8": 1, "fp4": 2}[index_format])
    return out


def topk_triton(scores: torch.Tensor, cand_idx: torch.Tensor, k: int, *, interpret: bool,
                block_c: int | None = None) -> torch.Tensor:
    """Triton radix-select top-k (`triton_topk.py`); contract of `reference.topk_from_scores`."""
    mod = triton_loader.load("triton_topk", interpret)
    T, C = scores.shape
    out = torch.full((T, k), -1, dtype=cand_idx.dtype, device=cand_idx.device)
    if T == 0 or C == 0:
        return out
    scores, cand_idx = scores.contiguous(), cand_idx.contiguous()
    bc = block_c or (64 if interpret else 1024)
    if bc < 16 or bc & (bc - 1):
        raise ValueError(f"block_c must be a power of two >= 16, got {bc}")
    with _launch_ctx(interpret):
        mod.topk_kernel[(T,)](scores, scores.stride(0), cand_idx, cand_idx.stride(0), out, out.stride(0), C, k,
                              BLOCK_C=bc)
    return out
