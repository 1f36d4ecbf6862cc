"""Triton top-k over indexer scores: radix select (4 passes of 8 bits) + an ordered emission pass.
Do not import this module directly: `dsv4.kernels.triton_loader.load("triton_topk", interpret)`.

One program per query row t. Scores map to order-preserving unsigned keys (flip all bits of negatives,
set the sign bit of non-negatives); entries with cand < 0 or a non-finite score are not candidates.

1. Radix select of the k-th largest key v_k: 4 passes, 8 bits each, most significant first. Pass i
   histograms the digit of the keys that match the prefix found so far, then picks the largest digit
   b with #(digit >= b) >= remaining, and `remaining -= #(digit > b)`. After 4 passes the prefix is
   v_k and `remaining` is the number of entries equal to v_k that still belong to the top k.
2. Emission in column order: every key > v_k, and the first `remaining` keys == v_k (lowest column =
   lowest position wins ties, the model's rule, `runtime/model/topk.py`); slot = running count.

With fewer than k candidates every candidate is selected (remaining = total; v_k = the smallest key).
Output slots past the selected count keep the -1 the launcher filled in.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keys(s_ptr, c_ptr, t, stride_s, stride_c, offs, C):
    inb = offs < C
    s = tl.load(s_ptr + t * stride_s + offs, mask=inb, other=float("-inf")).to(tl.float32)
    cand = tl.load(c_ptr + t * stride_c + offs, mask=inb, other=-1)
    ok = inb & (cand >= 0) & (s > float("-inf")) & (s < float("inf"))
    u = s.to(tl.uint32, bitcast=True)
    key = tl.where((u >> 31) == 1, ~u, u | 0x80000000)
    return key, ok, cand


@triton.jit
def topk_kernel(s_ptr, stride_s, c_ptr, stride_c, out_ptr, stride_o, C, k, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([1], tl.uint32)
    remaining = tl.zeros([1], tl.int32) + k
    for ps in tl.static_range(4):
        shift = 24 - 8 * ps
        hist = tl.zeros([256], tl.int32)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            key, ok, _ = _keys(s_ptr, c_ptr, t, stride_s, stride_c, offs, C)
            if ps > 0:
                ok = ok & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=ok)
        if ps == 0:
            remaining = tl.minimum(remaining, tl.sum(hist, 0))  # fewer candidates than k: take them all
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # #(digit >= b)
        b = tl.max(tl.where(ge >= remaining, bins, -1), 0)
        above = tl.sum(tl.where(bins > b, hist, 0), 0)
        remaining = remaining - above
        prefix = prefix | (b.to(tl.uint32) << shift)
    count = tl.zeros([1], tl.int32)
    ties = tl.zeros([1], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        key, ok, cand = _keys(s_ptr, c_ptr, t, stride_s, stride_c, offs, C)
        tied = ok & (key == prefix)
        tie_rank = ties + tl.cumsum(tied.to(tl.int32), 0)
        sel = (ok & (key > prefix)) | (tied & (tie_rank <= remaining))
        slot = count + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(out_ptr + t * stride_o + slot, cand, mask=sel)
        count += tl.sum(sel.to(tl.int32), 0)
        ties += tl.sum(tied.to(tl.int32), 0)
