"""Triton GEMMs over weights kept in their checkpoint format. Do not import this module directly:
`dsv4.kernels.triton_loader.load("triton_quant_gemm", interpret)` builds it (launchers: `quant_gemm.py`).

1. `fp8_block_gemm_kernel`, grid (⌈M / BLOCK_M⌉ · ⌈N / BLOCK_N⌉,), programs grouped GROUP_M tiles of M at a time
   along N (the weight tiles of a group stay in L2):

       y[m, n] = Σ_kb s[n // 128, kb] · Σ_{k ∈ kb} x[m, k] · q[n, k]          s = 2^(e − 127), q e4m3

   One K step covers BLOCK_K ≤ 128 columns inside one 128-column scale block, so its partial dot is scaled by
   one power of two per output column. Multiplying by a power of two is exact in floating point, so this equals
   Σ x · (q · s) — the dequantised weight — bit for bit for the same summation order.
   Split-K (grid axis 1, for decode rows over narrow weights): split p covers columns [p·k_per_split,
   (p+1)·k_per_split), a multiple of 128, and writes its fp32 partial sums to slice p of y (stride_ys); the
   launcher adds the slices in a fixed order (deterministic, no atomics).
2. `mxfp4_grouped_gemm_kernel`, grid (tiles, ⌈N / BLOCK_N⌉): tile t covers rows [start_t, min(start_t + BLOCK_M,
   end_t)) of the expert-sorted activations, all of them routed to expert e_t:

       y[r, n] = Σ_k x[r, k] · e2m1(code[e_t, n, k]) · 2^(s[e_t, n, k // 32] − 127)

   codes are packed two per byte (low nibble = even column). A K step loads its code bytes once, [BLOCK_K/2,
   BLOCK_N] (contiguous along K: vector loads), and its scale bytes once, [BLOCK_K/32, BLOCK_N]; the x tile is
   split into even and odd columns, and two dots take the low and the high nibbles. The scale changes every 32
   columns, so the weight tiles are dequantised before the dots (e2m1 · 2^k is exact in bf16 / fp16 / fp32).

Both accumulate in fp32 and store in the activation dtype. `tl.dot` runs in the activation dtype (bf16 / fp16) or
as an exact fp32 dot (`input_precision="ieee"`) when DOT_F32 (fp32 activations, and bf16 in the interpreter whose
bf16 dot is wrong, triton-lang/triton#11584).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ue8m0(byte):
    """UE8M0 exponent byte (int32) -> 2^(byte − 127) in fp32; byte 0 is the subnormal 2^-127."""
    return tl.where(byte > 0, (byte << 23).to(tl.float32, bitcast=True), 5.877471754111438e-39)


@triton.jit
def _e2m1(code):
    """e2m1 code (int32, 0..15) -> fp32: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign."""
    mag = code & 7
    v = tl.where(mag < 4, mag.to(tl.float32) * 0.5, tl.where(mag == 7, 6.0, (mag - 2).to(tl.float32)))
    return tl.where(code >= 8, -v, v)


@triton.jit
def _dot(a, w, acc, DOT_F32: tl.constexpr):
    """acc + a · w with fp32 accumulation: exact fp32 operands, or w cast to a's dtype (exact for these values)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(a, w.to(a.dtype), acc)


@triton.jit
def fp8_block_gemm_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, stride_sn, y_ptr, stride_ym, stride_ys,
                          M, N, K, k_per_split,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, DOT_F32: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    s_cols = s_ptr + (offs_n // 128).to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_first = split * k_per_split
    k_last = tl.minimum(k_first + k_per_split, K)
    for k0 in range(k_first, k_last, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_last
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # uint8 [BLOCK_K, BLOCK_N]
        wq = q.to(tl.float8e4nv, bitcast=True)  # e4m3 -> the dot dtype: exact (hardware convert on sm_89+)
        part = _dot(a, wq.to(tl.float32) if DOT_F32 else wq.to(a.dtype), tl.zeros([BLOCK_M, BLOCK_N], tl.float32),
                    DOT_F32)
        scale = _ue8m0(tl.load(s_cols + k0 // 128, mask=n_ok, other=127).to(tl.int32))
        acc += part * scale[None, :]
    y = y_ptr + split.to(tl.int64) * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def mxfp4_grouped_gemm_kernel(x_ptr, stride_xm, c_ptr, stride_ce, stride_cn, s_ptr, stride_se, stride_sn,
                              y_ptr, stride_ym, tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, K,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              DOT_F32: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # the tile's expert and row range, loaded as vectors (a scalar mask term trips the interpreter)
    expert = tl.load(tile_expert_ptr + t + offs_n * 0).to(tl.int64)
    rows = tl.load(tile_start_ptr + t + offs_m * 0) + offs_m
    m_ok = rows < tl.load(tile_end_ptr + t + offs_m * 0)
    n_ok = offs_n < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    c_cols = c_ptr + expert[None, :] * stride_ce + offs_n.to(tl.int64)[None, :] * stride_cn
    s_cols = s_ptr + expert[None, :] * stride_se + offs_n.to(tl.int64)[None, :] * stride_sn
    offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of a step holds columns 2j (low nibble) and 2j + 1 (high)
    offs_g = tl.arange(0, BLOCK_K // 32)  # the step's 32-column scale groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        a_even, a_odd = tl.split(tl.reshape(a, [BLOCK_M, BLOCK_K // 2, 2]))
        jj = k0 // 2 + offs_j
        byte = tl.load(c_cols + jj[:, None], mask=(jj < K // 2)[:, None] & n_ok[None, :], other=0).to(tl.int32)
        gg = k0 // 32 + offs_g
        sc = _ue8m0(tl.load(s_cols + gg[:, None], mask=(gg < tl.cdiv(K, 32))[:, None] & n_ok[None, :],
                            other=127).to(tl.int32))  # [BLOCK_K / 32, BLOCK_N]
        sc = tl.reshape(tl.broadcast_to(sc[:, None, :], [BLOCK_K // 32, 16, BLOCK_N]), [BLOCK_K // 2, BLOCK_N])
        acc = _dot(a_even, _e2m1(byte & 15) * sc, acc, DOT_F32)
        acc = _dot(a_odd, _e2m1(byte >> 4) * sc, acc, DOT_F32)
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
