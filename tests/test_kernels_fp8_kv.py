"""FP8 KV row format: byte size, layout, round-trip error bounds, power-of-two scales."""

from __future__ import annotations

import math

import pytest
import torch
from dsv4.kernels.fp8_kv import (
    E4M3_MAX,
    FP8_TILE,
    dequantize_kv_rows,
    fp8_layout,
    fp8_row_bytes,
    quantize_kv_rows,
    scales_of,
)


@pytest.mark.parametrize(("hd", "rope", "expected"), [(512, 64, 584), (64, 16, 88), (32, 8, 48), (128, 0, 136),
                                                     (16, 16, 32)])
def test_row_bytes(hd, rope, expected):
    nope = hd - rope
    assert fp8_row_bytes(hd, rope) == expected
    assert expected % 8 == 0 and expected >= nope + 2 * rope + math.ceil(nope / FP8_TILE)


@pytest.mark.parametrize("bad", [(0, 0), (64, 65), (64, -2), (64, 3)])
def test_bad_dims_rejected(bad):
    with pytest.raises(ValueError, match="head_dim|rope_dim"):
        fp8_row_bytes(*bad)


@pytest.mark.parametrize(("hd", "rope"), [(512, 64), (96, 32), (40, 8)])
def test_round_trip_error_bounds(hd, rope):
    g = torch.Generator().manual_seed(hd)
    # rows with very different magnitudes per tile, including a zero row
    x = torch.randn(33, hd, generator=g) * torch.logspace(-3, 3, 33)[:, None]
    x[5] = 0
    rows = quantize_kv_rows(x, rope)
    assert rows.dtype == torch.uint8 and rows.shape == (33, fp8_row_bytes(hd, rope))
    y = dequantize_kv_rows(rows, hd, rope)
    assert y.dtype == torch.float32 and y.shape == x.shape
    nope = hd - rope
    s = scales_of(rows, hd, rope).repeat_interleave(FP8_TILE, dim=-1)[:, :nope]
    err = (y[:, :nope] - x[:, :nope]).abs()
    # e4m3 round-to-nearest: half an ulp (2^-4 relative) for normals, half the subnormal step 2^-9 · s
    assert bool((err <= x[:, :nope].abs() * 2**-4 + s * 2**-10 + 1e-30).all())
    # the rope dims are bf16
    torch.testing.assert_close(y[:, nope:], x[:, nope:].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert bool((y[5] == 0).all())
    # padding bytes are zero
    _, _, scale_off, n_scales = fp8_layout(hd, rope)
    assert bool((rows[:, scale_off + n_scales:] == 0).all())


def test_scales_are_powers_of_two_and_tight():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 512, generator=g) * 10
    rows = quantize_kv_rows(x, 64)
    s = scales_of(rows, 512, 64)
    assert s.shape == (16, 7)
    mant, _ = torch.frexp(s)
    assert bool((mant == 0.5).all())  # exact powers of two
    amax = x[:, :448].reshape(16, 7, 64).abs().amax(-1)
    # the smallest power of two that keeps the tile within e4m3 range
    assert bool((amax / s <= E4M3_MAX).all()) and bool((amax / s > E4M3_MAX / 2).all())


def test_layout_bytes_are_where_the_format_says():
    x = torch.zeros(1, 512)
    x[0, 0] = 448.0  # tile 0: amax 448 -> scale 2^0, byte 127; value 448 = e4m3 0x7E
    x[0, 64] = 1.0  # tile 1: amax 1 -> scale 2^-8, byte 119; 1/2^-8 = 256 = 0x78
    x[0, 448] = 1.0  # first rope dim: bf16 1.0 = 0x3F80 little-endian
    rows = quantize_kv_rows(x, 64)
    assert rows[0, 0].item() == 0x7E and rows[0, 64].item() == 0x78
    assert rows[0, 448].item() == 0x80 and rows[0, 449].item() == 0x3F
    assert rows[0, 576].item() == 127 and rows[0, 577].item() == 119


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="finite"):
        quantize_kv_rows(torch.tensor([[float("inf")] * 64]), 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_kv_rows(torch.zeros(64), 0)
    with pytest.raises(ValueError, match="rows must be uint8"):
        dequantize_kv_rows(torch.zeros(2, 583, dtype=torch.uint8), 512, 64)


def test_matches_model_codec_bytes():
    codec = pytest.importorskip("dsv4.runtime.model.fp8_codec")
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(3))
    assert torch.equal(quantize_kv_rows(x, 64), codec.encode(x, 64))
