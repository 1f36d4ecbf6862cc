"""Triton kernels of the compressor step (CSA / HCA main compressor and the indexer's compressor).
Do not import this module directly: `dsv4.kernels.triton_loader.load("triton_compressor", interpret)`.

Two launches per step (the second reads state rows the first wrote, so their order is the stream's):

1. `compressor_append_kernel`, grid (T, ⌈coff·d / BLOCK⌉): state[slot_t, off : off + 2·coff·d] = [C_t | Z_t].
2. `compressor_pool_kernel`, grid (E,), one program per completed block e (entry j, destination row):

       P_c = Σ_i exp(Z_ic − m_c) C_ic / Σ_i exp(Z_ic − m_c)      per channel c, online over the state rows i
       y   = RoPE_{j·ratio}( w ⊙ P / sqrt(mean(P²) + eps) )
       out_pool[dest] = quantise(y)                               (plain cast | FP8 KV row | FP8 / FP4 index row)

   CSA (COFF = 2): rows 0..ratio−1 (previous block) give channels [:d] (state columns [0, d)), rows
   ratio..2·ratio−1 (own block) give channels [d:] of the state (columns [d, 2d)).

Channels are held as two vectors, even (2p) and odd (2p+1), so the interleaved RoPE pairs and the FP4
nibble pairs are element-wise operations. All math is fp32. Quantisation uses integer bit arithmetic
(exact powers of two, round-to-nearest-even e4m3fn / bf16 / e2m1), so the interpreter and a GPU
produce the same bytes as the torch codecs (`fp8_kv.py`, `index_quant.py`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def compressor_append_kernel(kv_ptr, stride_kv, score_ptr, stride_score, slot_ptr, state_ptr, stride_state, col_off,
                             CW, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cb = tl.program_id(1)
    offs = cb * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + t + offs * 0).to(tl.int64)  # broadcast: a scalar mask term trips the interpreter
    m = (offs < CW) & (slot >= 0)
    slot = tl.where(slot >= 0, slot, 0)
    kv = tl.load(kv_ptr + t * stride_kv + offs, mask=m, other=0.0).to(tl.float32)
    sc = tl.load(score_ptr + t * stride_score + offs, mask=m, other=0.0).to(tl.float32)
    base = state_ptr + slot * stride_state + col_off
    tl.store(base + offs, kv.to(state_ptr.dtype.element_ty), mask=m)
    tl.store(base + CW + offs, sc.to(state_ptr.dtype.element_ty), mask=m)


@triton.jit
def _e4m3_code(v):
    """fp32 v, |v| <= 448 -> e4m3fn byte (int32), round to nearest even, sign kept (as torch's cast)."""
    a = tl.abs(v)
    u = a.to(tl.int32, bitcast=True)
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - (120 << 3)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # subnormal m · 2^-9, rint via 2^23
    code = tl.minimum(tl.where(a < 0.015625, sub, normal), 126)
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return code | (sign << 7)


@triton.jit
def _bf16_bits(x):
    """fp32 -> bf16 bit pattern (int32 in [0, 65535]), round to nearest even."""
    u = x.to(tl.int32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def _e2m1_code(v):
    """v -> e2m1 code, round to nearest with ties to the even code (`index_quant.e2m1_codes`; 0 for ±0)."""
    a = tl.abs(v)
    m = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a >= 1.75).to(tl.int32)
         + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    return tl.where((v < 0) & (m > 0), m + 8, m)


@triton.jit
def _pow2_exponent(amax, MANT_LIMIT: tl.constexpr, SHIFT: tl.constexpr):
    """ceil(log2(amax / (1.M · 2^SHIFT))) exactly, for normal amax (callers floor it) and 1.M given by its 23-bit
    mantissa MANT_LIMIT (448 = 1.75·2^8: 0x600000, 8; 6 = 1.5·2^2: 0x400000, 2); clamped to [-127, 127]."""
    u = amax.to(tl.int32, bitcast=True)
    e = ((u >> 23) & 255) - 127 - SHIFT + ((u & 0x7FFFFF) > MANT_LIMIT).to(tl.int32)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def _online(m, l, a, sc, kv):
    """Per-channel online softmax update over the rows (axis 0) of one tile."""
    m_new = tl.maximum(m, tl.max(sc, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(sc - m_safe[None, :])
    return m_new, l * alpha + tl.sum(p, 0), a * alpha + tl.sum(p * kv, 0)


@triton.jit
def _store_entry(y_e, y_o, p, pm, out_ptr, obase, has, HALF, FMT: tl.constexpr, NOPE: tl.constexpr,
                 ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr, NTILES: tl.constexpr):
    """Quantise one row (even / odd channel vectors, fp32) and store it at `obase` (a vector of the row's base
    pointer; lanes masked by `has`)."""
    DIM = 2 * HALF
    ce = 2 * p
    co = ce + 1
    sm = pm & has
    one = has & (p == 0)  # single-byte stores (scales) go through lane 0
    if FMT == 0:
        tl.store(obase + ce, y_e.to(out_ptr.dtype.element_ty), mask=sm)
        tl.store(obase + co, y_o.to(out_ptr.dtype.element_ty), mask=sm)
    elif FMT == 1:
        inv_e = tl.zeros_like(y_e)
        inv_o = tl.zeros_like(y_e)
        for tile in tl.static_range(NTILES):
            in_t = pm & (ce >= tile * 64) & (ce < tile * 64 + 64) & (ce < NOPE)
            amax = tl.maximum(tl.max(tl.where(in_t, tl.abs(y_e), 0.0), 0), tl.max(tl.where(in_t, tl.abs(y_o), 0.0), 0))
            ex = _pow2_exponent(tl.maximum(amax, 1e-4), 0x600000, 8)  # fp8_kv.AMAX_FLOOR
            inv = ((127 - ex) << 23).to(tl.float32, bitcast=True)
            inv_e = tl.where(in_t, inv, inv_e)
            inv_o = tl.where(in_t, inv, inv_o)
            tl.store(obase + SCALE_OFF + tile, (ex + 127 + p * 0).to(tl.uint8), mask=one)
        nope = sm & (ce < NOPE)
        q_e = _e4m3_code(tl.minimum(tl.maximum(y_e * inv_e, -448.0), 448.0))
        q_o = _e4m3_code(tl.minimum(tl.maximum(y_o * inv_o, -448.0), 448.0))
        tl.store(obase + ce, q_e.to(tl.uint8), mask=nope)
        tl.store(obase + co, q_o.to(tl.uint8), mask=nope)
        rope = sm & (ce >= NOPE)
        rb = ROPE_OFF + 2 * (tl.where(rope, ce, NOPE) - NOPE)
        b_e = _bf16_bits(y_e)
        b_o = _bf16_bits(y_o)
        tl.store(obase + rb, (b_e & 255).to(tl.uint8), mask=rope)
        tl.store(obase + rb + 1, (b_e >> 8).to(tl.uint8), mask=rope)
        tl.store(obase + rb + 2, (b_o & 255).to(tl.uint8), mask=rope)
        tl.store(obase + rb + 3, (b_o >> 8).to(tl.uint8), mask=rope)
    elif FMT == 2:
        amax = tl.maximum(tl.max(tl.where(pm, tl.abs(y_e), 0.0), 0), tl.max(tl.where(pm, tl.abs(y_o), 0.0), 0))
        ex = _pow2_exponent(tl.maximum(amax, 1e-4), 0x600000, 8)  # index_quant.FP8_AMAX_FLOOR
        scale = ((ex + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - ex) << 23).to(tl.float32, bitcast=True)
        q_e = _e4m3_code(tl.minimum(tl.maximum(y_e * inv, -448.0), 448.0))
        q_o = _e4m3_code(tl.minimum(tl.maximum(y_o * inv, -448.0), 448.0))
        tl.store(obase + ce, q_e.to(tl.uint8), mask=sm)
        tl.store(obase + co, q_o.to(tl.uint8), mask=sm)
        bits = scale.to(tl.int32, bitcast=True)
        for k in tl.static_range(4):
            tl.store(obase + DIM + k, (((bits >> (8 * k)) & 255) + p * 0).to(tl.uint8), mask=one)
    else:
        v_e = tl.zeros_like(y_e)
        v_o = tl.zeros_like(y_e)
        for g in tl.static_range(NTILES):
            in_g = pm & (p // 16 == g)
            amax = tl.maximum(tl.max(tl.where(in_g, tl.abs(y_e), 0.0), 0), tl.max(tl.where(in_g, tl.abs(y_o), 0.0), 0))
            ex = _pow2_exponent(tl.maximum(amax, 7.052966104933725e-38), 0x400000, 2)  # 6 * 2^-126
            inv = ((127 - ex) << 23).to(tl.float32, bitcast=True)
            v_e = tl.where(in_g, tl.where(in_g, y_e, 0.0) * inv, v_e)  # other groups' lanes could overflow
            v_o = tl.where(in_g, tl.where(in_g, y_o, 0.0) * inv, v_o)
            tl.store(obase + HALF + g, (ex + 127 + p * 0).to(tl.uint8), mask=one)
        packed = _e2m1_code(v_e) | (_e2m1_code(v_o) << 4)
        tl.store(obase + p, packed.to(tl.uint8), mask=sm)


@triton.jit
def compressor_pool_kernel(state_ptr, stride_state, col_off, rows_ptr, stride_rows, nrows, ratio,
                           dest_ptr, w_ptr, cos_ptr, sin_ptr, stride_cs, out_ptr, stride_out,
                           HALF, ROPE_START, eps,
                           COFF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, FMT: tl.constexpr,
                           NOPE: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr,
                           NTILES: tl.constexpr):
    """FMT: 0 plain, 1 FP8 KV row (NOPE, ROPE_OFF, SCALE_OFF, NTILES = scales), 2 FP8 index row,
    3 FP4 index row (NTILES = groups of 32)."""
    e = tl.program_id(0)
    DIM = 2 * HALF
    CW = COFF * DIM
    p = tl.arange(0, BLOCK_P)
    pm = p < HALF
    ce = 2 * p
    co = ce + 1
    m_e = tl.full([BLOCK_P], float("-inf"), tl.float32)
    m_o = tl.full([BLOCK_P], float("-inf"), tl.float32)
    l_e = tl.zeros([BLOCK_P], tl.float32)
    l_o = tl.zeros([BLOCK_P], tl.float32)
    a_e = tl.zeros([BLOCK_P], tl.float32)
    a_o = tl.zeros([BLOCK_P], tl.float32)
    for r0 in range(0, nrows, BLOCK_R):
        ri = r0 + tl.arange(0, BLOCK_R)
        row = tl.load(rows_ptr + e * stride_rows + ri, mask=ri < nrows, other=-1).to(tl.int64)
        ok = row >= 0
        row = tl.where(ok, row, 0)
        shift = (ri >= ratio).to(tl.int32) * (DIM * (COFF - 1))  # CSA: own block -> channels [d:]
        base = state_ptr + row[:, None] * stride_state + col_off + shift[:, None]
        m2 = ok[:, None] & pm[None, :]
        kv_e = tl.load(base + ce[None, :], mask=m2, other=0.0).to(tl.float32)
        kv_o = tl.load(base + co[None, :], mask=m2, other=0.0).to(tl.float32)
        sc_e = tl.load(base + CW + ce[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        sc_o = tl.load(base + CW + co[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        m_e, l_e, a_e = _online(m_e, l_e, a_e, sc_e, kv_e)
        m_o, l_o, a_o = _online(m_o, l_o, a_o, sc_o, kv_o)
    x_e = a_e / tl.where(l_e > 0, l_e, 1.0)
    x_o = a_o / tl.where(l_o > 0, l_o, 1.0)
    # RMSNorm (weighted), fp32
    inv_rms = 1.0 / tl.sqrt((tl.sum(x_e * x_e, 0) + tl.sum(x_o * x_o, 0)) / DIM + eps)
    y_e = x_e * inv_rms * tl.load(w_ptr + ce, mask=pm, other=0.0).to(tl.float32)
    y_o = x_o * inv_rms * tl.load(w_ptr + co, mask=pm, other=0.0).to(tl.float32)
    # RoPE at the block position: pairs p >= ROPE_START rotate by (cos, sin)[e, p - ROPE_START]
    is_rope = pm & (p >= ROPE_START)
    ri_ = tl.where(is_rope, p - ROPE_START, 0)
    c = tl.load(cos_ptr + e * stride_cs + ri_, mask=is_rope, other=1.0)
    s = tl.load(sin_ptr + e * stride_cs + ri_, mask=is_rope, other=0.0)
    y_e, y_o = y_e * c - y_o * s, y_o * c + y_e * s
    # store
    dest = tl.load(dest_ptr + e + p * 0).to(tl.int64)  # as a vector: scalar mask terms trip the interpreter
    has = dest >= 0
    obase = out_ptr + tl.where(has, dest, 0) * stride_out
    _store_entry(y_e, y_o, p, pm, out_ptr, obase, has, HALF, FMT, NOPE, ROPE_OFF, SCALE_OFF, NTILES)


@triton.jit
def store_rows_kernel(x_ptr, stride_x, dest_ptr, out_ptr, stride_out, HALF, BLOCK_P: tl.constexpr, FMT: tl.constexpr,
                      NOPE: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr, NTILES: tl.constexpr):
    """out[dest[n]] = quantise(x[n]) for float rows x [N, 2·HALF] (dest -1 skipped); the compressor's store."""
    n = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)
    pm = p < HALF
    y_e = tl.load(x_ptr + n * stride_x + 2 * p, mask=pm, other=0.0).to(tl.float32)
    y_o = tl.load(x_ptr + n * stride_x + 2 * p + 1, mask=pm, other=0.0).to(tl.float32)
    dest = tl.load(dest_ptr + n + p * 0).to(tl.int64)
    has = dest >= 0
    obase = out_ptr + tl.where(has, dest, 0) * stride_out
    _store_entry(y_e, y_o, p, pm, out_ptr, obase, has, HALF, FMT, NOPE, ROPE_OFF, SCALE_OFF, NTILES)
