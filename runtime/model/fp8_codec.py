"""The published FP8 KV row layout (DeepSeek-V4 / FlashMLA `fp8_ds_mla`), as raw uint8 rows.

Row = [nope dims as e4m3 (1 B each) | rope dims as bf16 (2 B each) | one UE8M0 scale byte per 64 nope
values | zero padding to a multiple of 8 B]. For head_dim 512 / rope 64: 448 + 128 + 7 + 1 = 584 B.

UE8M0 scale of a 64-value tile: s = 2^ceil(log2(amax / 448)), stored as the biased exponent (e + 127);
the tile is stored as e4m3(x / s), so |x / s| <= 448 and the relative error is that of e4m3 (~2^-4).
"""

from __future__ import annotations

import math

import torch

TILE = 64
E4M3_MAX = 448.0


def row_bytes(head_dim: int, rope_dim: int) -> int:
    nope = head_dim - rope_dim
    raw = nope + 2 * rope_dim + math.ceil(nope / TILE)
    return (raw + 7) // 8 * 8


def encode(x: torch.Tensor, rope_dim: int | None) -> torch.Tensor:
    """x [N, head_dim] float -> [N, row_bytes] uint8."""
    if rope_dim is None:
        raise ValueError("the fp8 KV layout needs rope_dim (build KVPools with head_dim and rope_dim)")
    n, hd = x.shape
    nope = hd - rope_dim
    tiles = math.ceil(nope / TILE)
    xn = x[:, :nope].float()
    pad = tiles * TILE - nope
    xt = torch.nn.functional.pad(xn, (0, pad)).view(n, tiles, TILE)
    amax = xt.abs().amax(dim=-1).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / E4M3_MAX)).clamp(-127, 127)
    scale = torch.exp2(exp)
    q = (xt / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(n, tiles * TILE)[:, :nope]
    out = torch.zeros(n, row_bytes(hd, rope_dim), dtype=torch.uint8, device=x.device)
    out[:, :nope] = q.view(torch.uint8)
    rope = x[:, nope:].to(torch.bfloat16).contiguous().view(torch.uint8).view(n, 2 * rope_dim)
    out[:, nope:nope + 2 * rope_dim] = rope
    out[:, nope + 2 * rope_dim:nope + 2 * rope_dim + tiles] = (exp + 127).to(torch.uint8)
    return out


def decode(rows: torch.Tensor, rope_dim: int | None, head_dim: int) -> torch.Tensor:
    """[N, row_bytes] uint8 -> [N, head_dim] fp32."""
    if rope_dim is None:
        raise ValueError("the fp8 KV layout needs rope_dim")
    n = rows.shape[0]
    nope = head_dim - rope_dim
    tiles = math.ceil(nope / TILE)
    q = rows[:, :nope].contiguous().view(torch.float8_e4m3fn).float()
    exp = rows[:, nope + 2 * rope_dim:nope + 2 * rope_dim + tiles].float() - 127
    scale = torch.exp2(exp).repeat_interleave(TILE, dim=-1)[:, :nope]
    rope = rows[:, nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    return torch.cat([q * scale, rope], dim=-1).view(n, head_dim)


# ---- indexer keys ----------------------------------------------------------------------------------
# "fp8": [dim e4m3 | fp32 scale (4 B)], scale = amax / 448 (132 B for dim 128);
# "fp4": [dim/2 packed e2m1 (low nibble = even index) | dim/32 UE8M0 scales] (68 B for dim 128).
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def encode_index(x: torch.Tensor, fmt: str) -> torch.Tensor:
    n, d = x.shape
    x = x.float()
    if fmt == "fp8":
        scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=1e-30)
        q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q, scale.contiguous().view(torch.uint8).view(n, 4)], dim=-1)
    if fmt == "fp4":
        t = x.view(n, d // 32, 32)
        exp = torch.ceil(torch.log2(t.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
        v = (t / torch.exp2(exp)[..., None]).view(n, d)
        codes = (v[..., None] - _E2M1.to(x.device)).abs().argmin(-1).to(torch.uint8)
        return torch.cat([codes[:, 0::2] | (codes[:, 1::2] << 4), (exp + 127).to(torch.uint8)], dim=-1)
    raise ValueError(f"index format must be fp8 or fp4, got {fmt!r}")


def decode_index(rows: torch.Tensor, fmt: str, dim: int) -> torch.Tensor:
    n = rows.shape[0]
    if fmt == "fp8":
        q = rows[:, :dim].contiguous().view(torch.float8_e4m3fn).float()
        return q * rows[:, dim:dim + 4].contiguous().view(torch.float32)
    if fmt == "fp4":
        b = rows[:, : dim // 2]
        codes = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(n, dim).long()
        scale = torch.exp2(rows[:, dim // 2: dim // 2 + dim // 32].float() - 127).repeat_interleave(32, dim=-1)
        return _E2M1.to(rows.device)[codes] * scale
    raise ValueError(f"index format must be fp8 or fp4, got {fmt!r}")
