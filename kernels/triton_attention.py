"""Triton kernels: hybrid sparse attention (window ∪ compressed rows, one softmax with a sink) and the
lightning-indexer scores. Do not import this module directly: `dsv4.kernels.triton_loader.load` builds
it lazily, compiled for CUDA or under the Triton interpreter (see docs/kernels.md, "Dispatch").

Sparse attention, per query token t and head h (MQA: one KV head, K = V):

    s_j = scale · q_{t,h} · k_j        for j in window(t) ∪ selected(t)   (physical row ids, -1 = skip)
    o_{t,h} = Σ_j exp(s_j - m) k_j / (Σ_j exp(s_j - m) + exp(sink_h - m))

computed as an online softmax over BLOCK_N rows at a time. All query heads of a program form the M
dimension of `tl.dot` (BLOCK_H >= 16 rows), so each KV row is loaded once per head block. Split-K:
program (t, hb, sp) covers list positions [sp·R, (sp+1)·R) of the concatenation window ++ compressed
and writes its normalised partial output and log-sum-exp; `_combine_kernel` merges the splits with
the sink: o = Σ_sp exp(lse_sp - M) o_sp / (Σ_sp exp(lse_sp - M) + exp(sink - M)).

FP8 rows (uint8, `fp8_kv.py` layout) are decoded on load with integer arithmetic (e4m3fn bits and
UE8M0 scale bytes to fp32 bits), so the same code runs in the interpreter and on any GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _e4m3_decode(b):
    """e4m3fn byte (int32) -> fp32, integer arithmetic only."""
    sgn = (b >> 7) & 1
    e = (b >> 3) & 15
    mt = b & 7
    normal = ((sgn << 31) | ((e + 120) << 23) | (mt << 20)).to(tl.float32, bitcast=True)
    sub = mt.to(tl.float32) * 0.001953125  # e4m3fn subnormal: m · 2^-9
    sub = tl.where(sgn == 1, -sub, sub)
    return tl.where(e > 0, normal, sub)


@triton.jit
def _load_index_keys(keys_ptr, rows, ok, offs_d, DI, stride_key, KEY_FMT: tl.constexpr):
    """Indexer keys [BLOCK_C, BLOCK_DI]: float rows (KEY_FMT 0) or decoded `index_quant` rows: 1 = fp8
    ([DI e4m3 | fp32 scale]), 2 = fp4 ([DI/2 packed e2m1, low nibble = even channel | DI/32 UE8M0])."""
    base = keys_ptr + rows[:, None] * stride_key
    m = ok[:, None] & (offs_d < DI)[None, :]
    if KEY_FMT == 0:
        return tl.load(base + offs_d[None, :], mask=m, other=0.0)
    elif KEY_FMT == 1:
        val = _e4m3_decode(tl.load(base + offs_d[None, :], mask=m, other=0).to(tl.int32))
        sb = tl.load(base + DI, mask=ok[:, None], other=0).to(tl.int32)
        sb = sb | (tl.load(base + DI + 1, mask=ok[:, None], other=0).to(tl.int32) << 8)
        sb = sb | (tl.load(base + DI + 2, mask=ok[:, None], other=0).to(tl.int32) << 16)
        sb = sb | (tl.load(base + DI + 3, mask=ok[:, None], other=0).to(tl.int32) << 24)
        return val * sb.to(tl.float32, bitcast=True)
    else:
        byte = tl.load(base + offs_d[None, :] // 2, mask=m, other=0).to(tl.int32)
        code = (byte >> (4 * (offs_d[None, :] & 1))) & 15
        mag = code & 7
        v = tl.where(mag < 4, mag.to(tl.float32) * 0.5, tl.where(mag == 7, 6.0, (mag - 2).to(tl.float32)))
        v = tl.where(code >= 8, -v, v)
        sc = tl.load(base + DI // 2 + offs_d[None, :] // 32, mask=m, other=127).to(tl.int32)
        return v * (sc << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_kv(kv_ptr, rows, row_ok, offs_d, D, stride_row,
             IS_FP8: tl.constexpr, NOPE: tl.constexpr, ROPE_OFF: tl.constexpr, SCALE_OFF: tl.constexpr):
    """rows [BLOCK_N] int64 physical ids (masked where not row_ok) -> fp32 [BLOCK_N, BLOCK_D]."""
    base = kv_ptr + rows[:, None] * stride_row
    m = row_ok[:, None] & (offs_d < D)[None, :]
    if IS_FP8:
        is_nope = (offs_d < NOPE)[None, :]
        b = tl.load(base + offs_d[None, :], mask=m & is_nope, other=0).to(tl.int32)
        val = _e4m3_decode(b)
        sc = tl.load(base + SCALE_OFF + offs_d[None, :] // 64, mask=m & is_nope, other=127).to(tl.int32)
        scale = tl.where(sc > 0, (sc << 23).to(tl.float32, bitcast=True), 5.877471754111438e-39)
        ro = ROPE_OFF + 2 * (offs_d[None, :] - NOPE)
        rmask = m & (offs_d >= NOPE)[None, :]
        lo = tl.load(base + ro, mask=rmask, other=0).to(tl.int32)
        hi = tl.load(base + ro + 1, mask=rmask, other=0).to(tl.int32)
        rope = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)
        return tl.where(is_nope, val * scale, rope)
    else:
        return tl.load(base + offs_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _attend(acc, m_i, l_i, q, t, lo, hi, idx_ptr, stride_idx_t, kv_ptr, stride_row, offs_d, D, scale,
            BLOCK_N: tl.constexpr, IS_FP8: tl.constexpr, NOPE: tl.constexpr, ROPE_OFF: tl.constexpr,
            SCALE_OFF: tl.constexpr, DOT_F32: tl.constexpr):
    """Online-softmax update over list positions [lo, hi) of one index list."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_list = offs_n < hi
        rows = tl.load(idx_ptr + t * stride_idx_t + offs_n, mask=in_list, other=-1).to(tl.int64)
        ok = rows >= 0
        rows = tl.where(ok, rows, 0)
        k = _load_kv(kv_ptr, rows, ok, offs_d, D, stride_row, IS_FP8, NOPE, ROPE_OFF, SCALE_OFF)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, k, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), k.to(q.dtype))
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def sparse_attention_kernel(
    q_ptr, stride_qt, stride_qh,
    swa_ptr, stride_swa, swa_idx_ptr, stride_swa_idx, W,
    comp_ptr, stride_comp, comp_idx_ptr, stride_comp_idx, K,
    sink_ptr, out_ptr, stride_ot, stride_oh, lse_ptr, stride_ls, stride_lt,
    stride_os, H, D, scale, rows_per_split,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    SWA_FP8: tl.constexpr, COMP_FP8: tl.constexpr, NOPE: tl.constexpr, ROPE_OFF: tl.constexpr,
    SCALE_OFF: tl.constexpr, DOT_F32: tl.constexpr,
):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & (offs_d < D)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    lo = sp * rows_per_split
    hi = tl.minimum(lo + rows_per_split, W + K)
    # window rows: list positions [lo, min(hi, W))
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, t, lo, tl.minimum(hi, W), swa_idx_ptr, stride_swa_idx, swa_ptr,
                            stride_swa, offs_d, D, scale, BLOCK_N, SWA_FP8, NOPE, ROPE_OFF, SCALE_OFF, DOT_F32)
    # compressed rows: positions [max(lo, W), hi) of the concatenation = [max(lo - W, 0), hi - W) of comp_idx
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, t, tl.maximum(lo - W, 0), hi - W, comp_idx_ptr, stride_comp_idx,
                            comp_ptr, stride_comp, offs_d, D, scale, BLOCK_N, COMP_FP8, NOPE, ROPE_OFF, SCALE_OFF,
                            DOT_F32)
    omask = hmask[:, None] & (offs_d < D)[None, :]
    if SPLIT:
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(out_ptr + sp * stride_os + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], o,
                 mask=omask)
        tl.store(lse_ptr + sp * stride_ls + t * stride_lt + offs_h, lse, mask=hmask)
    else:
        sink = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
        m_f = tl.maximum(m_i, sink)
        a = tl.exp(m_i - m_f)
        den = l_i * a + tl.exp(sink - m_f)
        o = acc * (a / den)[:, None]
        tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], o, mask=omask)


@triton.jit
def combine_kernel(part_ptr, stride_ps, stride_pt, stride_ph, lse_ptr, stride_ls, stride_lt, sink_ptr,
                   out_ptr, stride_ot, stride_oh, S, H, D,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = Σ_s exp(lse_s - M) o_s / (Σ_s exp(lse_s - M) + exp(sink - M)), M = max(max_s lse_s, sink)."""
    t = tl.program_id(0)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    omask = hmask[:, None] & (offs_d < D)[None, :]
    m = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    for s in range(0, S):
        m = tl.maximum(m, tl.load(lse_ptr + s * stride_ls + t * stride_lt + offs_h, mask=hmask, other=float("-inf")))
    den = tl.exp(tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32) - m)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s in range(0, S):
        w = tl.exp(tl.load(lse_ptr + s * stride_ls + t * stride_lt + offs_h, mask=hmask, other=float("-inf")) - m)
        o = tl.load(part_ptr + s * stride_ps + t * stride_pt + offs_h[:, None] * stride_ph + offs_d[None, :],
                    mask=omask, other=0.0)
        acc += o * w[:, None]
        den += w
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], acc / den[:, None], mask=omask)


@triton.jit
def indexer_scores_kernel(q_ptr, stride_qt, stride_qh, w_ptr, stride_wt, keys_ptr, stride_key,
                          cand_ptr, stride_ct, out_ptr, stride_out_t, HI, DI, C,
                          BLOCK_HI: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DI: tl.constexpr,
                          DOT_F32: tl.constexpr, KEY_FMT: tl.constexpr = 0):
    """I(t, c) = Σ_h w[t,h] · ReLU(q[t,h] · keys[cand[t,c]]); -inf where cand < 0. Keys decoded on load."""
    t = tl.program_id(0)
    cb = tl.program_id(1)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_DI)
    cmask = offs_c < C
    rows = tl.load(cand_ptr + t * stride_ct + offs_c, mask=cmask, other=-1).to(tl.int64)
    ok = rows >= 0
    rows = tl.where(ok, rows, 0)
    dmask = offs_d < DI
    k = _load_index_keys(keys_ptr, rows, ok, offs_d, DI, stride_key, KEY_FMT)
    if KEY_FMT != 0:  # decoded fp32 keys meet the query dtype (fp32 for fp32 queries)
        k = k.to(tl.float32) if DOT_F32 else k.to(q_ptr.dtype.element_ty)
    if DOT_F32:
        k = k.to(tl.float32)
    score = tl.zeros([BLOCK_C], tl.float32)
    for h0 in range(0, HI, BLOCK_HI):
        offs_h = h0 + tl.arange(0, BLOCK_HI)
        hmask = offs_h < HI
        q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(w_ptr + t * stride_wt + offs_h, mask=hmask, other=0.0).to(tl.float32)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        score += tl.sum(tl.maximum(s, 0.0) * w[:, None], 0)
    tl.store(out_ptr + t * stride_out_t + offs_c, tl.where(ok, score, float("-inf")), mask=cmask)
