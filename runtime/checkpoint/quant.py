"""DeepSeek's published weight formats and their dequantisation.

* FP8: weight e4m3 `[out, in]` + `.scale` `[ceil(out/128), ceil(in/128)]` (UE8M0 or fp32): W = q · s(block).
* FP4 (routed experts): weight int8/uint8 `[out, in/2]`, two e2m1 codes per byte (low nibble = even column),
  + `.scale` `[out, in/32]` UE8M0 / fp32: W = e2m1(code) · s(row, col // 32).
"""

from __future__ import annotations

import math

import torch
from dsv4.runtime.checkpoint.errors import CheckpointError
from dsv4.runtime.checkpoint.files import TensorMeta

BLOCK = 128
FP4_BLOCK = 32
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_PACKED_FP4_DTYPES = ("I8", "U8")  # header shape [out, in/2]; safetensors `F4` headers give the logical shape
_E2M1_PAIRS = torch.stack([E2M1[torch.arange(256) & 0x0F], E2M1[torch.arange(256) >> 4]], dim=-1)  # byte -> (lo, hi)
_E2M1_MIDPOINTS = (E2M1[1:8] + E2M1[:7]) / 2  # 0.25, 0.75, ..., 5.0: bucket i of |x| is the i-th magnitude


def logical_shape(meta: TensorMeta, scale: TensorMeta | None) -> tuple[int, ...]:
    """The dequantised shape of a file tensor: int8/uint8 FP4 packs two values per byte along the last dim."""
    if scale is not None and meta.dtype in _PACKED_FP4_DTYPES and len(meta.shape) == 2:
        return (meta.shape[0], meta.shape[1] * 2)
    return tuple(meta.shape)


def _scale_f32(s: torch.Tensor) -> torch.Tensor:
    if s.dtype == torch.uint8:  # raw UE8M0 exponent bytes
        return torch.exp2(s.float() - 127)
    return s.float()


def dequantize(w: torch.Tensor, s: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    out_f, in_f = shape
    sf = _scale_f32(s)
    if w.dtype in (torch.int8, torch.uint8) or str(w.dtype).startswith("torch.float4"):
        if w.shape != (out_f, in_f // 2) or sf.shape != (out_f, math.ceil(in_f / FP4_BLOCK)):
            raise CheckpointError(f"FP4 tensor {name}: packed shape {list(w.shape)} / scale {list(sf.shape)} do not "
                                  f"match logical shape {list(shape)} (expected scale [{out_f}, "
                                  f"{math.ceil(in_f / FP4_BLOCK)}])")
        b = w.contiguous().view(torch.uint8)
        # one gather per byte from a 256 x 2 table (low nibble = even column), scales broadcast per 32-block:
        # ~6 B of temporaries per value instead of ~20 (int64 codes + expanded scales)
        vals = _E2M1_PAIRS.to(b.device)[b.int()].view(out_f, in_f)
        if in_f % FP4_BLOCK == 0:
            return vals.view(out_f, in_f // FP4_BLOCK, FP4_BLOCK).mul_(sf[..., None]).view(out_f, in_f)
        return vals.mul_(sf.repeat_interleave(FP4_BLOCK, dim=1)[:, :in_f])
    if w.dtype == torch.float8_e4m3fn:
        want = (math.ceil(out_f / BLOCK), math.ceil(in_f / BLOCK))
        if tuple(sf.shape) != want:
            raise CheckpointError(f"FP8 tensor {name}: scale shape {list(sf.shape)}, expected {list(want)}")
        if out_f % BLOCK == 0 and in_f % BLOCK == 0:  # broadcast the block scales, no expanded copy
            bo, bi = want
            return w.float().view(bo, BLOCK, bi, BLOCK).mul_(sf[:, None, :, None]).view(out_f, in_f)
        full = sf.repeat_interleave(BLOCK, dim=0)[:out_f].repeat_interleave(BLOCK, dim=1)[:, :in_f]
        return w.float() * full
    raise CheckpointError(f"tensor {name}: has a .scale but dtype {w.dtype} is neither FP8 e4m3 nor packed FP4")


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (e4m3 weights, fp32 block scales [ceil(out/128), ceil(in/128)]), UE8M0 (power-of-2) scales."""
    out_f, in_f = w.shape
    bo, bi = math.ceil(out_f / BLOCK), math.ceil(in_f / BLOCK)
    pad = torch.nn.functional.pad(w.float(), (0, bi * BLOCK - in_f, 0, bo * BLOCK - out_f))
    tiles = pad.view(bo, BLOCK, bi, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (tiles / scale[:, None, :, None]).view(bo * BLOCK, bi * BLOCK)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (uint8 packed e2m1 [out, in/2], fp32 UE8M0 scales [out, in/32]) by nearest e2m1 value."""
    out_f, in_f = w.shape
    t = w.float().view(out_f, in_f // FP4_BLOCK, FP4_BLOCK)
    amax = t.abs().amax(dim=-1).clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))
    x = (t / scale[..., None]).view(out_f, in_f)
    # nearest representable value, ties to the smaller magnitude (the first of E2M1 = argmin over |x - E2M1|);
    # codes 8..15 are the negatives, and a value rounding to zero is +0 (code 0)
    magnitude = torch.bucketize(x.abs(), _E2M1_MIDPOINTS)
    codes = torch.where((x < 0) & (magnitude > 0), magnitude + 8, magnitude).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scale
