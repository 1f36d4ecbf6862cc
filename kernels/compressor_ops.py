"""Host side of the compressor step: argument checks (shared by every backend) and the Triton launcher.

See `reference.compressor_step_ref` for the semantics and `triton_compressor.py` for the kernels.
"""

from __future__ import annotations

import contextlib
import math

import torch
from dsv4.kernels import triton_loader
from dsv4.kernels.fp8_kv import fp8_layout, fp8_row_bytes
from dsv4.kernels.index_quant import FP4_GROUP, index_row_bytes
from dsv4.kernels.reference import OUT_FORMATS

_FMT_CODE = {"plain": 0, "fp8_kv": 1, "fp8_index": 2, "fp4_index": 3}


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def check_out_pool(out_pool: torch.Tensor, d: int, out_format: str, rope_dim: int | None) -> None:
    """The destination pool matches the store format: float [N, d] ("plain") or uint8 rows of the layout."""
    if out_format not in OUT_FORMATS:
        raise ValueError(f"out_format must be one of {OUT_FORMATS}, got {out_format!r}")
    if out_pool.dim() != 2:
        raise ValueError(f"out_pool must be [N, row], got shape {tuple(out_pool.shape)}")
    if out_format == "plain":
        want, ok_dtype = d, out_pool.is_floating_point()
    elif out_format == "fp8_kv":
        if rope_dim is None:
            raise ValueError("rope_dim is required for out_format 'fp8_kv'")
        want, ok_dtype = fp8_row_bytes(d, rope_dim), out_pool.dtype == torch.uint8
    else:
        if out_format == "fp4_index" and d % FP4_GROUP:
            raise ValueError(f"fp4_index needs dim to be a multiple of {FP4_GROUP}, got {d}")
        want, ok_dtype = index_row_bytes(d, out_format[:3]), out_pool.dtype == torch.uint8
    if not ok_dtype or out_pool.shape[1] != want:
        raise ValueError(f"out_pool for out_format {out_format!r} must be "
                         f"{'float' if out_format == 'plain' else 'uint8'} [N, {want}], got {out_pool.dtype} "
                         f"{tuple(out_pool.shape)}")


def check_compressor_args(kv, score, state, state_slot, emit_rows, entry, dest, out_pool, norm_weight, inv_freq, *,
                          ratio: int, coff: int, col_offset: int, out_format: str, rope_dim: int | None) -> int:
    """Validate shapes / formats; returns dim. Errors name the argument and the limit."""
    if coff not in (1, 2):
        raise ValueError(f"coff must be 1 (HCA) or 2 (CSA, overlapping), got {coff}")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if norm_weight.dim() != 1:
        raise ValueError(f"norm_weight must be [dim], got shape {tuple(norm_weight.shape)}")
    d = norm_weight.shape[0]
    if d % 2:
        raise ValueError(f"dim (norm_weight length) must be even (rotary pairs), got {d}")
    if kv.dim() != 2 or kv.shape[1] != coff * d or score.shape != kv.shape:
        raise ValueError(f"kv and score must both be [T, coff*dim={coff * d}], got {tuple(kv.shape)}, "
                         f"{tuple(score.shape)}")
    T = kv.shape[0]
    if state_slot.shape != (T,):
        raise ValueError(f"state_slot must be [T={T}], got shape {tuple(state_slot.shape)}")
    need = col_offset + 2 * coff * d
    if state.dim() != 2 or not state.is_floating_point() or col_offset < 0 or state.shape[1] < need:
        raise ValueError(f"state must be a float [N, >= col_offset + 2*coff*dim = {col_offset + 2 * coff * d}] "
                         f"tensor, got {state.dtype} {tuple(state.shape)} (col_offset={col_offset})")
    E = entry.shape[0] if entry.dim() == 1 else -1
    if entry.dim() != 1 or dest.shape != (E,) or emit_rows.shape != (E, coff * ratio):
        raise ValueError(f"entry and dest must be [E], emit_rows [E, coff*ratio={coff * ratio}]; got "
                         f"{tuple(entry.shape)}, {tuple(dest.shape)}, {tuple(emit_rows.shape)}")
    if inv_freq.dim() != 1 or 2 * inv_freq.shape[0] > d:
        raise ValueError(f"inv_freq must be [rope_dim/2] with rope_dim <= dim={d}, got shape {tuple(inv_freq.shape)}")
    check_out_pool(out_pool, d, out_format, rope_dim)
    return d


def _format_consts(d: int, out_format: str, rope_dim: int | None) -> dict:
    nope = rope_off = scale_off = ntiles = 0
    if out_format == "fp8_kv":
        nope, rope_off, scale_off, ntiles = fp8_layout(d, rope_dim)
    elif out_format == "fp4_index":
        ntiles = d // FP4_GROUP
    return dict(FMT=_FMT_CODE[out_format], NOPE=nope, ROPE_OFF=rope_off, SCALE_OFF=scale_off, NTILES=ntiles)


def store_rows_triton(values: torch.Tensor, dest: torch.Tensor, out_pool: torch.Tensor, *, out_format: str,
                      rope_dim: int | None, interpret: bool) -> None:
    """out_pool[dest[n]] = quantise(values[n]) with the kernels' encoder (`store_rows_kernel`)."""
    mod = triton_loader.load("triton_compressor", interpret)
    n, d = values.shape
    if n == 0:
        return
    values, dest = values.contiguous(), dest.contiguous()
    ctx = triton_loader.interpret_mode(True) if interpret else contextlib.nullcontext()
    with ctx:
        mod.store_rows_kernel[(n,)](values, values.stride(0), dest, out_pool, out_pool.stride(0), d // 2,
                                    BLOCK_P=_pow2(d // 2, 2), **_format_consts(d, out_format, rope_dim))


def compressor_step_triton(kv, score, state, state_slot, emit_rows, entry, dest, out_pool, norm_weight, inv_freq, *,
                           ratio: int, coff: int, eps: float, col_offset: int, out_format: str,
                           rope_dim: int | None, interpret: bool, block_r: int | None = None) -> None:
    """Triton compressor step (append launch, then pool launch), in place; contract of `compressor_step_ref`."""
    mod = triton_loader.load("triton_compressor", interpret)
    d = norm_weight.shape[0]
    T, cw = kv.shape
    E = entry.shape[0]
    if state.stride(1) != 1 or out_pool.stride(1) != 1:
        raise ValueError("state and out_pool must have unit stride along the row")
    kv, score, state_slot = kv.contiguous(), score.contiguous(), state_slot.contiguous()
    ctx = triton_loader.interpret_mode(True) if interpret else contextlib.nullcontext()
    with ctx:
        if T:
            blk = min(_pow2(cw, 16), 1024)
            mod.compressor_append_kernel[(T, math.ceil(cw / blk))](
                kv, kv.stride(0), score, score.stride(0), state_slot, state, state.stride(0), col_offset, cw,
                BLOCK=blk)
        if E == 0:
            return
        emit_rows, dest = emit_rows.contiguous(), dest.contiguous()
        pos = entry.long() * ratio
        freqs = pos[:, None].float() * inv_freq.float().to(pos.device)[None, :]
        cos, sin = freqs.cos().contiguous(), freqs.sin().contiguous()
        half, pairs = d // 2, inv_freq.shape[0]
        nrows = coff * ratio
        br = block_r or (8 if interpret or half < 128 else 4)  # d = 512: 4 rows x 256 pairs x 4 tiles in registers
        mod.compressor_pool_kernel[(E,)](
            state, state.stride(0), col_offset, emit_rows, emit_rows.stride(0), nrows, ratio,
            dest, norm_weight.contiguous(), cos, sin, cos.stride(0), out_pool, out_pool.stride(0),
            half, half - pairs, float(eps),
            COFF=coff, BLOCK_R=min(br, _pow2(nrows)), BLOCK_P=_pow2(half, 2), **_format_consts(d, out_format, rope_dim),
            num_warps=8 if half >= 128 else 4)
