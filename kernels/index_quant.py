"""Quantised indexer-key row formats (the cache's `index_dtype` "fp8" / "fp4"), torch reference codec.

Byte-identical to the model's own codec (`runtime/model/fp8_codec.py`); the Triton compressor kernel
writes these bytes and the Triton indexer-scores kernel decodes them on load.

- "fp8": `[dim e4m3fn bytes | fp32 scale, 4 B little-endian]` (132 B for dim 128), one scale per row

      s = max(amax(|x|) / 448, 1e-30),   q_i = e4m3(clamp(x_i / s, ±448)),   x̂_i = q_i · s

- "fp4": `[dim/2 bytes of packed e2m1 codes (low nibble = even channel) | dim/32 UE8M0 bytes]`
  (68 B for dim 128), one power-of-two scale per 32 channels

      e = clamp(ceil(log2(max(amax, 1e-30) / 6)), ±127),   v_i = x_i / 2^e,
      code_i = argmin_c |v_i − E2M1[c]| (first index on ties),   x̂_i = E2M1[code_i] · 2^e
"""

from __future__ import annotations

import torch

INDEX_FORMATS = ("fp8", "fp4")
E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = 32


def index_row_bytes(dim: int, fmt: str) -> int:
    """Bytes of one quantised key row: dim + 4 (fp8) or dim/2 + dim/32 (fp4)."""
    _check(dim, fmt)
    return dim + 4 if fmt == "fp8" else dim // 2 + dim // FP4_GROUP


def _check(dim: int, fmt: str) -> None:
    if fmt not in INDEX_FORMATS:
        raise ValueError(f"index format must be one of {INDEX_FORMATS}, got {fmt!r}")
    if dim <= 0 or (fmt == "fp4" and dim % FP4_GROUP):
        raise ValueError(f"index dim must be > 0 (and a multiple of {FP4_GROUP} for fp4), got {dim}")


def quantize_index_rows(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [N, dim] float -> uint8 [N, index_row_bytes(dim, fmt)]."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, dim], got shape {tuple(x.shape)}")
    n, d = x.shape
    _check(d, fmt)
    x = x.float()
    if fmt == "fp8":
        scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=1e-30)
        q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q, scale.contiguous().view(torch.uint8).view(n, 4)], dim=-1)
    t = x.view(n, d // FP4_GROUP, FP4_GROUP)
    exp = torch.ceil(torch.log2(t.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    v = (t / torch.exp2(exp)[..., None]).view(n, d)
    table = torch.tensor(E2M1_VALUES, device=x.device)
    codes = (v[..., None] - table).abs().argmin(-1).to(torch.uint8)
    return torch.cat([codes[:, 0::2] | (codes[:, 1::2] << 4), (exp + 127).to(torch.uint8)], dim=-1)


def dequantize_index_rows(rows: torch.Tensor, dim: int, fmt: str) -> torch.Tensor:
    """uint8 [N, index_row_bytes(dim, fmt)] -> float32 [N, dim]."""
    rb = index_row_bytes(dim, fmt)
    if rows.dim() != 2 or rows.dtype != torch.uint8 or rows.shape[1] != rb:
        raise ValueError(f"index rows must be uint8 [N, {rb}] for dim={dim} fmt={fmt!r}, "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    n = rows.shape[0]
    if fmt == "fp8":
        q = rows[:, :dim].contiguous().view(torch.float8_e4m3fn).float()
        return q * rows[:, dim:dim + 4].contiguous().view(torch.float32)
    b = rows[:, : dim // 2]
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(n, dim).long()
    scale = torch.exp2(rows[:, dim // 2:].float() - 127).repeat_interleave(FP4_GROUP, dim=-1)
    return torch.tensor(E2M1_VALUES, device=rows.device)[codes] * scale
