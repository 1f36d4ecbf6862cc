"""GEMMs over weights kept in their checkpoint format: the torch references (the CPU path and the test oracle),
the argument checks every backend shares, and the Triton launchers (`triton_quant_gemm.py`).

* FP8 block-scaled linear: x [..., K] · Wᵀ with W = q · 2^(s − 127), q e4m3 [N, K] and one UE8M0 byte s per
  128 x 128 block, [⌈N/128⌉, ⌈K/128⌉].
* MXFP4 grouped expert GEMM: rows of x sorted by expert, `counts[e]` rows for expert e; expert e's rows times
  W_eᵀ with W_e[n, k] = e2m1(code) · 2^(s[e, n, k // 32] − 127), codes packed two per byte [E, N, K/2] (low
  nibble = even column), scales [E, N, ⌈K/32⌉].

The references dequantise with `checkpoint/quant.dequantize`, round to the activation dtype (exact: e4m3 and
e2m1 times a power of two fit bf16) and call `F.linear` — what the model computed before these kernels existed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dsv4.kernels import triton_loader
from dsv4.runtime.checkpoint.quant import BLOCK, FP4_BLOCK, dequantize

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_fp8_args(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    """x [..., K] float; qweight e4m3 [N, K]; scale uint8 [⌈N/128⌉, ⌈K/128⌉]."""
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be one of {ACT_DTYPES}, got {x.dtype}")
    if qweight.dtype != torch.float8_e4m3fn or qweight.dim() != 2:
        raise ValueError(f"qweight must be float8_e4m3fn [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim must equal qweight's K={k}, got x {tuple(x.shape)}")
    want = (math.ceil(n / BLOCK), math.ceil(k / BLOCK))
    if scale.dtype != torch.uint8 or tuple(scale.shape) != want:
        raise ValueError(f"scale must be uint8 UE8M0 [ceil(N/{BLOCK}), ceil(K/{BLOCK})] = {list(want)}, got "
                         f"{scale.dtype} {tuple(scale.shape)}")


def check_mxfp4_args(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, counts: Sequence[int]) -> None:
    """x [R, K] float; codes uint8 [E, N, K/2]; scales uint8 [E, N, ⌈K/32⌉]; counts E ints summing to R."""
    if x.dtype not in ACT_DTYPES or x.dim() != 2:
        raise ValueError(f"x must be [R, K] of one of {ACT_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if codes.dtype != torch.uint8 or codes.dim() != 3:
        raise ValueError(f"codes must be uint8 [E, N, K/2] (packed e2m1), got {codes.dtype} {tuple(codes.shape)}")
    e, n, half = codes.shape
    k = x.shape[1]
    if 2 * half != k:
        raise ValueError(f"x's K={k} must be twice the packed codes' last dim {half}")
    want = (e, n, math.ceil(k / FP4_BLOCK))
    if scales.dtype != torch.uint8 or tuple(scales.shape) != want:
        raise ValueError(f"scales must be uint8 UE8M0 [E, N, ceil(K/{FP4_BLOCK})] = {list(want)}, got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    if len(counts) != e or any(c < 0 for c in counts) or sum(counts) != x.shape[0]:
        raise ValueError(f"counts must be E={e} non-negative row counts summing to x's R={x.shape[0]}, got "
                         f"{len(counts)} counts summing to {sum(counts)}")


def fp8_block_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x · dequant(W)ᵀ with the dequantised weight in x's dtype: [..., N]."""
    w = dequantize(qweight, scale, tuple(qweight.shape), "fp8_block_gemm")
    return F.linear(x, w.to(x.dtype))


def expert_weight(codes: torch.Tensor, scales: torch.Tensor, e: int, dtype: torch.dtype,
                  name: str = "expert") -> torch.Tensor:
    """Expert e's dequantised [N, K] matrix in `dtype` (`name` goes into shape errors)."""
    q = codes[e]
    return dequantize(q, scales[e], (q.shape[0], 2 * q.shape[1]), f"{name}[{e}]").to(dtype)


def mxfp4_grouped_gemm_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                           counts: Sequence[int]) -> torch.Tensor:
    """One `F.linear` per expert with rows: y[rows of e] = x[rows of e] · W_eᵀ, [R, N] in x's dtype."""
    y = torch.empty(x.shape[0], codes.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c:
            y[start:start + c] = F.linear(x[start:start + c], expert_weight(codes, scales, e, x.dtype))
        start += c
    return y


# -- Triton launchers ------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_ctx(interpret: bool):
    return triton_loader.interpret_mode(True) if interpret else contextlib.nullcontext()


def _dot_f32(dtype: torch.dtype, interpret: bool) -> bool:
    return dtype == torch.float32 or (interpret and dtype == torch.bfloat16)


def _check_block(name: str, value: int, most: int, least: int = 16) -> None:
    if value < least or value & (value - 1) or value > most:
        raise ValueError(f"{name} must be a power of two in [{least}, {most}], got {value}")


def gpu_options(block_m: int, block_n: int) -> dict[str, int]:
    """Compiled launches: 8 warps for 128 x 128 output tiles, else 4; 3 pipeline stages (within Hopper's 227 KiB of
    shared memory at every launcher tile: `tests/test_kernels_compile.py`)."""
    return dict(num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=3)


def fp8_native_supported(device: torch.device) -> bool:
    """The FP8 kernel converts e4m3 with Triton's fp8e4nv type: compiled only for sm_89 and newer."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def plan_split_k(programs: int, k: int, num_sms: int, *, split_k: int | None = None) -> tuple[int, int]:
    """(splits, columns per split) of the FP8 GEMM's K. Split only when the output tiles cannot fill the device
    (decode rows over a narrow weight: N = 1024 gives 8 programs at BLOCK_N 128): splits = min(⌈2·SMs / programs⌉,
    K / 512), each a multiple of 128 columns (whole scale blocks) and at least 4 of them. `split_k` forces a count."""
    if split_k is None:
        split_k = 1
        if programs < num_sms and k >= 2 * 4 * BLOCK:
            split_k = min(_cdiv(2 * num_sms, programs), k // (4 * BLOCK))
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    per = _cdiv(_cdiv(k, split_k), BLOCK) * BLOCK
    return _cdiv(k, per), per


def fp8_block_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *, interpret: bool,
                          block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                          split_k: int | None = None) -> torch.Tensor:
    """Triton FP8 block-scaled GEMM; the contract of `fp8_block_gemm_ref`. `split_k` forces the K split count
    (default `plan_split_k`)."""
    n, k = qweight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    if not interpret and not fp8_native_supported(x.device):
        raise RuntimeError(f"the Triton FP8 GEMM needs compute capability >= 8.9 (fp8e4nv), "
                           f"{torch.cuda.get_device_name(x.device)} has "
                           f"{'.'.join(map(str, torch.cuda.get_device_capability(x.device)))}")
    w = qweight.view(torch.uint8)
    if w.stride(1) != 1:
        w = w.contiguous()
    scale = scale.contiguous()
    bm = block_m or (16 if interpret else min(_pow2(m), 128))
    bn = block_n or (32 if interpret else 128)
    bk = block_k or (32 if interpret else 128)
    _check_block("block_m", bm, 256)
    _check_block("block_n", bn, 256)
    _check_block("block_k", bk, BLOCK)  # one K step stays inside one 128-column scale block
    tiles = _cdiv(m, bm) * _cdiv(n, bn)
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    splits, per = plan_split_k(tiles, k, num_sms, split_k=split_k)
    # one split stores in x's dtype; several store fp32 partial sums, added in split order below
    y = torch.empty(splits if splits > 1 else 1, m, n, dtype=torch.float32 if splits > 1 else x.dtype,
                    device=x.device)
    mod = triton_loader.load("triton_quant_gemm", interpret)
    with _launch_ctx(interpret):
        mod.fp8_block_gemm_kernel[(tiles, splits)](
            x2, x2.stride(0), w, w.stride(0), scale, scale.stride(0), y, y.stride(1), y.stride(0), m, n, k, per,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, DOT_F32=_dot_f32(x.dtype, interpret),
            **({} if interpret else gpu_options(bm, bn)))
    out = y[0] if splits == 1 else y.sum(dim=0).to(x.dtype)
    return out.view(*lead, n)


def tile_schedule(counts: Sequence[int], block_m: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles of an expert-sorted batch: (expert, first row, expert's end row) per tile, int32 on `device`.
    Expert e with c rows starting at row r gets ⌈c / block_m⌉ tiles at r, r + block_m, …; empty experts none."""
    c = torch.tensor(list(counts), dtype=torch.int64)
    ends = torch.cumsum(c, 0)
    tiles = (c + block_m - 1) // block_m
    expert = torch.repeat_interleave(torch.arange(len(c)), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    start = (ends - c)[expert] + (torch.arange(len(expert)) - first_tile[expert]) * block_m
    return tuple(t.to(torch.int32).to(device) for t in (expert, start, ends[expert]))  # type: ignore[return-value]


def mxfp4_grouped_gemm_triton(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, counts: Sequence[int], *,
                              interpret: bool, block_m: int | None = None, block_n: int | None = None,
                              block_k: int | None = None) -> torch.Tensor:
    """Triton MXFP4 grouped expert GEMM; the contract of `mxfp4_grouped_gemm_ref`."""
    r, k = x.shape
    n = codes.shape[1]
    y = torch.empty(r, n, dtype=x.dtype, device=x.device)
    if r == 0 or n == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    if codes.stride(2) != 1 or scales.stride(2) != 1:
        codes, scales = codes.contiguous(), scales.contiguous()
    most_rows = max(counts)
    bm = block_m or (16 if interpret else min(_pow2(most_rows), 64))
    bn = block_n or (32 if interpret else 128)
    bk = block_k or (32 if interpret else 128)
    _check_block("block_m", bm, 256)
    _check_block("block_n", bn, 256)
    _check_block("block_k", bk, 256, least=FP4_BLOCK)  # whole scale groups; each nibble half is a dot of >= 16
    expert, start, end = tile_schedule(counts, bm, x.device)
    grid = (expert.shape[0], _cdiv(n, bn))
    mod = triton_loader.load("triton_quant_gemm", interpret)
    with _launch_ctx(interpret):
        mod.mxfp4_grouped_gemm_kernel[grid](
            x, x.stride(0), codes, codes.stride(0), codes.stride(1), scales, scales.stride(0), scales.stride(1),
            y, y.stride(0), expert, start, end, n, k,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=_dot_f32(x.dtype, interpret),
            **({} if interpret else gpu_options(bm, bn)))
    return y

