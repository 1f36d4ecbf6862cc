"""The FP8 KV row format (DeepSeek-V4 / FlashMLA `fp8_ds_mla`), torch reference encoder and decoder.

One cached KV entry (K = V, one head, `head_dim` dims, the last `rope_dim` of them rotary) is one row
of raw bytes:

    [ nope dims as e4m3fn, 1 B each | rope dims as bf16, 2 B each | one UE8M0 scale byte per 64 nope
      values | zero padding up to a multiple of 8 B ]

with nope = head_dim - rope_dim. For head_dim 512 / rope 64: 448 + 128 + 7 + 1 = 584 B.

UE8M0 scale of one 64-value tile (the last tile may be shorter): the power of two

    s = 2^e,   e = ceil(log2(max(amax, 1e-4) / 448)),   stored as the byte e + 127,

which is DeepSeek's reference `act_quant(kv[..., :-rope], 64, scale_fmt="ue8m0", inplace=True)` (inference/model.py
of the V4 release: the sliding-window KV and the main compressor's entries; docs/model.md, "Numerics of the
published model"): its amax floor 1e-4 puts an all-zero tile at e = -22,
so |x / s| <= 448 (the e4m3fn maximum) and the tile is stored as e4m3fn(x / s). Decoding is
x ≈ e4m3(x / s) · s: a relative error of at most 2^-4 per value (3 mantissa bits, round to nearest),
plus the e4m3 subnormal step 2^-9 · s for values far below the tile maximum. The rope dims round
to bf16 (relative error <= 2^-8).

The Triton attention kernel decodes the same bytes on load (`triton_attention.py`); these functions
are the test oracle and the CPU path.
"""

from __future__ import annotations

import math

import torch

FP8_TILE = 64  # nope values per UE8M0 scale byte
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant clamp_min
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
UE8M0_BIAS = 127


def _check_dims(head_dim: int, rope_dim: int) -> None:
    if head_dim <= 0:
        raise ValueError(f"head_dim must be > 0, got {head_dim}")
    if not 0 <= rope_dim <= head_dim:
        raise ValueError(f"rope_dim must be in [0, head_dim={head_dim}], got {rope_dim}")
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even (rotary pairs), got {rope_dim}")


def fp8_layout(head_dim: int, rope_dim: int) -> tuple[int, int, int, int]:
    """(nope, rope byte offset, scale byte offset, number of scales) of one row."""
    _check_dims(head_dim, rope_dim)
    nope = head_dim - rope_dim
    return nope, nope, nope + 2 * rope_dim, math.ceil(nope / FP8_TILE)


def fp8_row_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of one row: round_up(nope + 2*rope + ceil(nope/64), 8); 584 for 512 / 64."""
    nope, _, scale_off, n_scales = fp8_layout(head_dim, rope_dim)
    return (scale_off + n_scales + 7) // 8 * 8


def quantize_kv_rows(x: torch.Tensor, rope_dim: int, *, check_finite: bool = True) -> torch.Tensor:
    """x [N, head_dim] (any float dtype) -> uint8 [N, fp8_row_bytes(head_dim, rope_dim)].

    `check_finite=False` skips the finiteness check (a device sync; the model's per-layer writes skip it)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, head_dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    n, hd = x.shape
    nope, rope_off, scale_off, n_scales = fp8_layout(hd, rope_dim)
    xf = x.float()
    if check_finite and n and not bool(torch.isfinite(xf).all()):
        raise ValueError("x must be finite to encode as fp8 KV rows")
    out = torch.zeros(n, fp8_row_bytes(hd, rope_dim), dtype=torch.uint8, device=x.device)
    if nope:
        pad = n_scales * FP8_TILE - nope
        tiles = torch.nn.functional.pad(xf[:, :nope], (0, pad)).view(n, n_scales, FP8_TILE)
        amax = tiles.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
        exp = torch.ceil(torch.log2(amax / E4M3_MAX)).clamp(-UE8M0_BIAS, UE8M0_BIAS)
        scaled = (tiles / torch.exp2(exp)[..., None]).clamp(-E4M3_MAX, E4M3_MAX)
        q = scaled.to(torch.float8_e4m3fn).view(torch.uint8).view(n, n_scales * FP8_TILE)[:, :nope]
        out[:, :nope] = q
        out[:, scale_off:scale_off + n_scales] = (exp + UE8M0_BIAS).to(torch.uint8)
    if rope_dim:
        rope = xf[:, nope:].to(torch.bfloat16).contiguous().view(torch.uint8).view(n, 2 * rope_dim)
        out[:, rope_off:rope_off + 2 * rope_dim] = rope
    return out


def dequantize_kv_rows(rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """uint8 [N, fp8_row_bytes] -> float32 [N, head_dim]."""
    nope, rope_off, scale_off, n_scales = fp8_layout(head_dim, rope_dim)
    rb = fp8_row_bytes(head_dim, rope_dim)
    if rows.dim() != 2 or rows.dtype != torch.uint8 or rows.shape[1] != rb:
        raise ValueError(f"rows must be uint8 [N, {rb}] for head_dim={head_dim} rope_dim={rope_dim}, "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    n = rows.shape[0]
    parts = []
    if nope:
        q = rows[:, :nope].contiguous().view(torch.float8_e4m3fn).float()
        exp = rows[:, scale_off:scale_off + n_scales].float() - UE8M0_BIAS
        parts.append(q * torch.exp2(exp).repeat_interleave(FP8_TILE, dim=-1)[:, :nope])
    if rope_dim:
        parts.append(rows[:, rope_off:rope_off + 2 * rope_dim].contiguous().view(torch.bfloat16).float())
    return torch.cat(parts, dim=-1).view(n, head_dim)


def scales_of(rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """The decoded UE8M0 scales [N, ceil(nope/64)] (powers of two) of encoded rows."""
    _, _, scale_off, n_scales = fp8_layout(head_dim, rope_dim)
    return torch.exp2(rows[:, scale_off:scale_off + n_scales].float() - UE8M0_BIAS)
