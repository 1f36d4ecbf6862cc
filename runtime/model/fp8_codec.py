"""The model's codecs for uint8 cache rows: one definition each, in `dsv4.kernels` (the Triton kernels write and read
the same bytes).

- KV rows (`kv_dtype` "fp8", the published `fp8_ds_mla` layout, 584 B for 512 / 64): `kernels/fp8_kv.py`.
- Indexer-key rows (`index_dtype` "fp8" / "fp4"): `kernels/index_quant.py`. The keys are Hadamard-rotated before
  they get here (`attention.py`), as in DeepSeek's reference.
"""

from __future__ import annotations

import torch
from dsv4.kernels.fp8_kv import dequantize_kv_rows, fp8_row_bytes, quantize_kv_rows
from dsv4.kernels.index_quant import dequantize_index_rows, quantize_index_rows


def row_bytes(head_dim: int, rope_dim: int) -> int:
    return fp8_row_bytes(head_dim, rope_dim)


def _need_rope(rope_dim: int | None) -> int:
    if rope_dim is None:
        raise ValueError("the fp8 KV layout needs rope_dim (build KVPools with head_dim and rope_dim)")
    return rope_dim


def encode(x: torch.Tensor, rope_dim: int | None) -> torch.Tensor:
    """x [N, head_dim] float -> [N, row_bytes] uint8."""
    return quantize_kv_rows(x, _need_rope(rope_dim), check_finite=False)


def decode(rows: torch.Tensor, rope_dim: int | None, head_dim: int) -> torch.Tensor:
    """[N, row_bytes] uint8 -> [N, head_dim] fp32."""
    return dequantize_kv_rows(rows, head_dim, _need_rope(rope_dim))


def encode_index(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [N, dim] float -> uint8 rows of the `fmt` ("fp8" / "fp4") indexer-key layout."""
    return quantize_index_rows(x, fmt)


def decode_index(rows: torch.Tensor, fmt: str, dim: int) -> torch.Tensor:
    """uint8 indexer-key rows -> [N, dim] fp32."""
    return dequantize_index_rows(rows, dim, fmt)
