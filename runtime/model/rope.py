"""Partial interleaved RoPE (GPT-J pair style) on the trailing `rope_dim` channels.

Pairs (x[2i], x[2i+1]) of the rope slice rotate by angle p·θ_i, θ_i = base^(-2i/rope_dim):
    y[2i]   = x[2i]·cos - x[2i+1]·sin,   y[2i+1] = x[2i+1]·cos + x[2i]·sin.
`inverse=True` rotates by -p·θ_i (applied to the attention output because K = V carries position).
Sliding-only layers use `rope_theta`; CSA/HCA layers use `compress_rope_theta` with optional YaRN
(attention factor forced to 1.0, as in the reference).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def yarn_inv_freq(base: float, dim: int, params: dict[str, Any]) -> torch.Tensor:
    """YaRN frequency interpolation with a linear ramp between the beta_fast / beta_slow corrections."""
    factor = float(params.get("factor", 1.0))
    orig = int(params.get("original_max_position_embeddings", 65536))
    beta_fast, beta_slow = float(params.get("beta_fast", 32)), float(params.get("beta_slow", 1))
    truncate = bool(params.get("truncate", True))

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_factor = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extra_factor) + (1.0 / pos_freqs) * extra_factor


def inv_freq_for(cfg: Any, compressed: bool) -> torch.Tensor:
    dim = cfg.qk_rope_head_dim
    if not compressed:
        return default_inv_freq(cfg.rope_theta, dim)
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type", "default")) == "yarn":
        return yarn_inv_freq(cfg.compress_rope_theta, dim, rs)
    return default_inv_freq(cfg.compress_rope_theta, dim)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, rope_dim/2] fp32."""
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [T, ..., D]; cos/sin [T, r/2]; rotates x[..., D-r:] in fp32 and returns x's dtype."""
    r = cos.shape[-1] * 2
    extra = x.dim() - 2
    c = cos.view(cos.shape[0], *([1] * extra), -1)
    s = sin.view(sin.shape[0], *([1] * extra), -1)
    if inverse:
        s = -s
    nope, rope = x[..., :-r], x[..., -r:].float()
    x0, x1 = rope[..., 0::2], rope[..., 1::2]
    y = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat([nope, y.to(x.dtype)], dim=-1)
