"""Quantised indexer-key row formats (the cache's `index_dtype` "fp8" / "fp4"), torch reference codec, and the
Hadamard rotation DeepSeek applies to the indexer's queries and keys before quantising them.

The formats follow DeepSeek's reference inference code (`inference/model.py` + `kernel.py` of the V4 / V3.2
releases; docs/model.md, "Numerics of the published model"):

- "fp4" (V4's indexer, `fp4_act_quant(x, 32)`): `[dim/2 bytes of packed e2m1 codes (low nibble = even channel) |
  dim/32 UE8M0 bytes]` (68 B for dim 128), one power-of-two scale per 32 channels

      e = ceil(log2(max(amax, 6·2^-126) / 6)),   v_i = x_i / 2^e  (|v_i| <= 6),
      code_i = e2m1(v_i), round to nearest, ties to the even code (what a cast to float4_e2m1 does),
      x̂_i = E2M1[code_i] · 2^e

- "fp8" (V3.2's indexer, `act_quant(x, 128, "ue8m0")` with one block per row): `[dim e4m3fn bytes | fp32 scale,
  4 B little-endian]` (132 B for dim 128)

      s = 2^ceil(log2(max(amax, 1e-4) / 448)),   q_i = e4m3(clamp(x_i / s, ±448)),   x̂_i = q_i · s

Byte-identical to the Triton compressor kernel's stores (`triton_compressor.py`); the Triton indexer-scores kernel
decodes them on load. Both queries and keys are rotated first (`hadamard_rotate`), which leaves q·k unchanged but
spreads outlier channels over the whole row, so one outlier no longer flattens the rest of its scale group.
"""

from __future__ import annotations

import torch

INDEX_FORMATS = ("fp8", "fp4")
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = 32
FP8_AMAX_FLOOR = 1e-4  # act_quant's clamp_min: an all-zero row gets scale 2^ceil(log2(1e-4 / 448)) = 2^-22
FP4_AMAX_FLOOR = E2M1_MAX * 2.0**-126  # fp4_act_quant's clamp_min: the smallest exponent is -126
# |v| above each midpoint of the e2m1 magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6) moves one code up; at a midpoint the
# even code wins, so the comparison is ">" below an even code and ">=" below an odd->even step.
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def index_row_bytes(dim: int, fmt: str) -> int:
    """Bytes of one quantised key row: dim + 4 (fp8) or dim/2 + dim/32 (fp4)."""
    _check(dim, fmt)
    return dim + 4 if fmt == "fp8" else dim // 2 + dim // FP4_GROUP


def _check(dim: int, fmt: str) -> None:
    if fmt not in INDEX_FORMATS:
        raise ValueError(f"index format must be one of {INDEX_FORMATS}, got {fmt!r}")
    if dim <= 0 or (fmt == "fp4" and dim % FP4_GROUP):
        raise ValueError(f"index dim must be > 0 (and a multiple of {FP4_GROUP} for fp4), got {dim}")


def _pow2_ceil_exponent(ratio: torch.Tensor) -> torch.Tensor:
    """ceil(log2(r)) for positive normal fp32 r, exactly (from the float's exponent and mantissa bits)."""
    bits = ratio.float().contiguous().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """v (|v| <= 6) -> e2m1 codes (uint8, sign in bit 3), round to nearest, ties to the even code; 0 for ±0."""
    a = v.abs()
    mag = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
    for mid, tie_up in _E2M1_STEPS:
        mag += (a >= mid if tie_up else a > mid).to(torch.int32)
    return torch.where((v < 0) & (mag > 0), mag + 8, mag).to(torch.uint8)


def quantize_index_rows(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [N, dim] float -> uint8 [N, index_row_bytes(dim, fmt)]."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, dim], got shape {tuple(x.shape)}")
    n, d = x.shape
    _check(d, fmt)
    x = x.float()
    if fmt == "fp8":
        exp = _pow2_ceil_exponent(x.abs().amax(dim=-1, keepdim=True).clamp(min=FP8_AMAX_FLOOR) / E4M3_MAX)
        scale = torch.exp2(exp.float())
        q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return torch.cat([q, scale.contiguous().view(torch.uint8).view(n, 4)], dim=-1)
    t = x.view(n, d // FP4_GROUP, FP4_GROUP)
    exp = _pow2_ceil_exponent(t.abs().amax(-1).clamp(min=FP4_AMAX_FLOOR) / E2M1_MAX)
    v = (t / torch.exp2(exp.float())[..., None]).clamp(-E2M1_MAX, E2M1_MAX).view(n, d)
    codes = e2m1_codes(v)
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


def fake_quantize_index(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """dequantize(quantize(x)) over the last dim, any leading shape, in x's dtype: what DeepSeek's reference does to
    the indexer queries in place (`fp4_act_quant(q, 32, inplace=True)`; V3.2: fp8 `act_quant(q, 128)`)."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    return dequantize_index_rows(quantize_index_rows(flat, fmt), d, fmt).to(x.dtype).view(x.shape)


def hadamard_matrix(dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix H_dim / sqrt(dim) (H_1 = [1], H_2n = [[H, H], [H, -H]]): symmetric
    and orthonormal, H·Hᵀ = I. `fast_hadamard_transform.hadamard_transform(x, scale=dim**-0.5)` is x·H."""
    _check_pow2(dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / dim**0.5).to(device=device, dtype=dtype)


def _check_pow2(dim: int) -> None:
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two dim, got {dim}")


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x·H over the last dim (H = `hadamard_matrix`), DeepSeek's `rotate_activation`: fp32 butterflies
    (y[i] = x[i] + x[i+h], y[i+h] = x[i] - x[i+h] for h = 1, 2, 4, ...), then · dim^-1/2, cast back to x's dtype.

    (H q)·(H k) = qᵀ Hᵀ H k = q·k, so scores are unchanged up to rounding."""
    d = x.shape[-1]
    _check_pow2(d)
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return (y.reshape(x.shape) * d**-0.5).to(x.dtype)
