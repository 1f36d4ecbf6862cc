"""Torch references for the attention kernels: the CPU path and the test oracle for Triton.

Rows are addressed by *physical* row ids into a pool viewed as a 2-D `[rows, dim]` tensor
(FlashMLA-style: `page_block * rows_per_block + offset`); -1 marks an unused slot.
"""

from __future__ import annotations

import torch
from dsv4.kernels.fp8_kv import dequantize_kv_rows


def _gather_rows(pool: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pool [N, D], idx [T, K] (-1 = none) -> rows [T, K, D] (zeros where invalid), valid [T, K]."""
    valid = idx >= 0
    safe = torch.where(valid, idx, torch.zeros_like(idx)).long()
    rows = pool.index_select(0, safe.reshape(-1)).reshape(*idx.shape, pool.shape[-1])
    return rows, valid


def gather_kv(pool: torch.Tensor, idx: torch.Tensor, head_dim: int, rope_dim: int | None):
    """Like `_gather_rows` in fp32 (only the gathered rows are converted), decoding FP8 (uint8) rows."""
    if pool.dtype != torch.uint8:
        rows, valid = _gather_rows(pool, idx)
        return rows.float(), valid
    if rope_dim is None:
        raise ValueError("rope_dim is required for fp8 (uint8) KV rows")
    raw, valid = _gather_rows(pool, idx)
    flat = dequantize_kv_rows(raw.reshape(-1, pool.shape[-1]), head_dim, rope_dim)
    return flat.reshape(*idx.shape, head_dim), valid


def sparse_attention_ref(
    q: torch.Tensor,
    swa_kv: torch.Tensor,
    swa_idx: torch.Tensor,
    comp_kv: torch.Tensor | None,
    comp_idx: torch.Tensor | None,
    sink: torch.Tensor,
    scale: float,
    *,
    rope_dim: int | None = None,
) -> torch.Tensor:
    """One softmax over (window rows ∪ compressed rows) with an attention sink; K = V (MQA).

    q [T, H, D]; swa_kv [Ns, D]; swa_idx [T, W]; comp_kv [Nc, D] or None; comp_idx [T, K] or None;
    sink [H] (a logit in the denominator only). Returns [T, H, D] in fp32:

        o_t = Σ_s softmax_s(q_t·k_s·scale ; sink) · k_s,   s ∈ window(t) ∪ selected(t)

    A pool given as uint8 holds FP8 rows (`fp8_kv.py` layout, head_dim = q.shape[-1]; `rope_dim`
    required); only the referenced rows are decoded.
    """
    rows, valid = gather_kv(swa_kv, swa_idx, q.shape[-1], rope_dim)
    if comp_kv is not None and comp_idx is not None and comp_idx.shape[-1] > 0:
        crow, cvalid = gather_kv(comp_kv, comp_idx, q.shape[-1], rope_dim)
        rows = torch.cat([rows, crow], dim=1)
        valid = torch.cat([valid, cvalid], dim=1)
    logits = torch.einsum("thd,tkd->thk", q.float(), rows) * scale  # [T, H, K]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink_logit = sink.float()[None, :, None].expand(logits.shape[0], -1, 1)
    full = torch.cat([logits, sink_logit], dim=-1)
    probs = torch.softmax(full, dim=-1)[..., :-1]
    return torch.einsum("thk,tkd->thd", probs, rows)


def gather_index(keys: torch.Tensor, idx: torch.Tensor, dim: int, index_format: str | None):
    """Like `gather_kv` for indexer keys: fp32 [*idx.shape, dim], decoding fp8 / fp4 `index_quant` rows."""
    raw, valid = _gather_rows(keys, idx)
    if index_format is None:
        return raw.float(), valid
    from dsv4.kernels.index_quant import dequantize_index_rows

    flat = dequantize_index_rows(raw.reshape(-1, keys.shape[1]), dim, index_format)
    return flat.reshape(*idx.shape, dim), valid


def indexer_scores_ref(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, cand_idx: torch.Tensor, *,
    index_format: str | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores I(t, s) = Σ_h w[t,h] · ReLU(q[t,h] · k_s) over candidate rows.

    q [T, Hi, Di]; weights [T, Hi]; keys [N, Di] float, or uint8 `index_quant` rows when
    `index_format` is "fp8" / "fp4" (only the referenced rows are decoded); cand_idx [T, C] (-1 = not
    visible). Returns [T, C] fp32 with -inf where the candidate is invalid.
    """
    rows, valid = gather_index(keys, cand_idx, q.shape[-1], index_format)  # [T, C, Di]
    s = torch.relu(torch.einsum("thd,tcd->thc", q.float(), rows))
    scores = torch.einsum("thc,th->tc", s, weights.float())
    return scores.masked_fill(~valid, float("-inf"))


def indexer_topk_ref(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, cand_idx: torch.Tensor, k: int
) -> torch.Tensor:
    """Top-k candidates by indexer score; returns physical row ids [T, k] (-1 where fewer visible).

    Fast path: when every row has at most k candidates, all visible candidates are returned
    without scoring (the order of selected rows does not matter to the attention softmax).
    """
    if cand_idx.shape[1] <= k:
        return topk_fast_path(cand_idx, k)
    return topk_from_scores(indexer_scores_ref(q, weights, keys, cand_idx), cand_idx, k)


def topk_fast_path(cand_idx: torch.Tensor, k: int) -> torch.Tensor:
    """At most k candidates: all of them (padded with -1 to width k), no scoring."""
    T, C = cand_idx.shape
    out = torch.full((T, k), -1, dtype=cand_idx.dtype, device=cand_idx.device)
    out[:, :C] = cand_idx
    return out


def topk_from_scores(scores: torch.Tensor, cand_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Physical row ids of the k best finite scores per row (-1 where fewer are finite), deterministic:

        selected(t) = { c : I(t,c) > v_k } ∪ { the (k − #{I > v_k}) lowest columns c with I(t,c) = v_k }

    v_k = the k-th largest finite score of row t; candidates with cand_idx < 0 never count. Lower
    column = lower position wins ties (the model's rule, `runtime/model/topk.py`); the selected rows
    are listed in column order, then -1 padding. O(C) per row: one `topk` for v_k plus prefix sums.
    """
    if scores.shape != cand_idx.shape or scores.dim() != 2:
        raise ValueError(f"scores and cand_idx must both be [T, C]; got {tuple(scores.shape)}, "
                         f"{tuple(cand_idx.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    T, C = scores.shape
    out = torch.full((T, k + 1), -1, dtype=cand_idx.dtype, device=cand_idx.device)
    if C == 0 or T == 0:
        return out[:, :k]
    ok = torch.isfinite(scores) & (cand_idx >= 0)
    s = scores.float().masked_fill(~ok, float("-inf"))
    kk = min(k, C)
    kth = torch.topk(s, kk, dim=-1).values[:, -1:]
    above = (s > kth) & ok
    tied = (s == kth) & ok
    need = kk - above.sum(dim=-1, keepdim=True)
    sel = above | (tied & (torch.cumsum(tied.to(torch.int32), dim=-1) <= need))
    slot = torch.cumsum(sel.to(torch.int32), dim=-1) - 1
    out.scatter_(1, torch.where(sel, slot, torch.full_like(slot, k)).long(), cand_idx)  # unselected -> spare col
    out[:, k] = -1
    return out[:, :k]


# ---- compressor step ---------------------------------------------------------------------------------
OUT_FORMATS = ("plain", "fp8_kv", "fp8_index", "fp4_index")


def compressor_append_ref(state: torch.Tensor, state_slot: torch.Tensor, kv: torch.Tensor, score: torch.Tensor,
                          col_offset: int = 0) -> None:
    """Append this step's tokens to the tail state: state[slot_t, off : off + 2w] = [kv_t | score_t] (slot -1 skipped).

    kv, score [T, w] with w = coff·dim (score already includes the positional bias `ape[p mod ratio]`)."""
    keep = state_slot >= 0
    w = kv.shape[1]
    rows = state_slot[keep].long()
    if rows.numel():
        vals = torch.cat([kv[keep], score[keep]], dim=-1).float()
        state[rows, col_offset:col_offset + 2 * w] = vals.to(state.dtype)


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """GPT-J pair RoPE on the last 2·len(inv_freq) channels, in fp32, returned in x's dtype:
    y[2i] = x[2i]·cos − x[2i+1]·sin, y[2i+1] = x[2i+1]·cos + x[2i]·sin, angle = pos·inv_freq[i]."""
    freqs = pos[:, None].float() * inv_freq.to(pos.device)[None, :]
    c, s = freqs.cos(), freqs.sin()
    r = 2 * inv_freq.shape[0]
    nope, rope = x[..., :-r], x[..., -r:].float()
    x0, x1 = rope[..., 0::2], rope[..., 1::2]
    y = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat([nope, y.to(x.dtype)], dim=-1)


def compressor_pool_ref(state: torch.Tensor, emit_rows: torch.Tensor, entry: torch.Tensor, norm_weight: torch.Tensor,
                        inv_freq: torch.Tensor, *, ratio: int, coff: int, eps: float, col_offset: int = 0,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Entries [E, dim] (compute_dtype) of the completed blocks, gated per-channel softmax pooling:

        e_j = RoPE_{j·ratio}( RMSNorm( Σ_i softmax_i(Z_i) ⊙ C_i ) ),   i over the state rows emit_rows[e]

    State row = [C (coff·dim) | Z (coff·dim)] at `col_offset`. CSA (coff = 2): emit_rows holds 2·ratio
    rows (previous block, then own block); channels [:dim] come from the previous block's rows and
    [dim:] from the own block's rows. HCA (coff = 1): ratio rows. Rows -1 (before position 0) are
    left out of the softmax. Casts follow the model (`Compressor.pool`): C and Z in compute_dtype,
    softmax in fp32 cast back, RMSNorm in fp32, RoPE in fp32.
    """
    d, r = norm_weight.shape[0], ratio
    cw = coff * d
    valid = emit_rows >= 0
    rows = state[emit_rows.clamp(min=0).long()][..., col_offset:col_offset + 2 * cw].float()
    kv, score = rows[..., :cw].to(compute_dtype), rows[..., cw:].to(compute_dtype)
    if coff == 2:
        kv = torch.cat([kv[:, :r, :d], kv[:, r:, d:]], dim=1)
        score = torch.cat([score[:, :r, :d], score[:, r:, d:]], dim=1)
    kv = torch.where(valid[..., None], kv, torch.zeros_like(kv))
    score = torch.where(valid[..., None], score, torch.full_like(score, float("-inf")))
    w = score.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
    pooled = (kv * w).sum(dim=1)
    xf = pooled.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = (norm_weight.float() * xf).to(pooled.dtype)
    return _rope_interleaved(normed, entry.long() * r, inv_freq)


def store_entries_ref(out_pool: torch.Tensor, dest: torch.Tensor, entries: torch.Tensor, out_format: str,
                      rope_dim: int | None = None) -> None:
    """out_pool[dest] = quantise(entries) (dest -1 skipped). Formats: "plain" (cast to the pool dtype),
    "fp8_kv" (`fp8_kv.py` row layout, needs rope_dim), "fp8_index" / "fp4_index" (`index_quant.py`)."""
    from dsv4.kernels.fp8_kv import quantize_kv_rows
    from dsv4.kernels.index_quant import quantize_index_rows

    keep = dest >= 0
    rows, vals = dest[keep].long(), entries[keep]
    if rows.numel() == 0:
        return
    if out_format == "plain":
        out_pool[rows] = vals.to(out_pool.dtype)
    elif out_format == "fp8_kv":
        if rope_dim is None:
            raise ValueError("rope_dim is required for out_format 'fp8_kv'")
        out_pool[rows] = quantize_kv_rows(vals.float(), rope_dim)
    elif out_format in ("fp8_index", "fp4_index"):
        out_pool[rows] = quantize_index_rows(vals, out_format[:3])
    else:
        raise ValueError(f"out_format must be one of {OUT_FORMATS}, got {out_format!r}")


def compressor_step_ref(kv: torch.Tensor, score: torch.Tensor, state: torch.Tensor, state_slot: torch.Tensor,
                        emit_rows: torch.Tensor, entry: torch.Tensor, dest: torch.Tensor, out_pool: torch.Tensor,
                        norm_weight: torch.Tensor, inv_freq: torch.Tensor, *, ratio: int, coff: int, eps: float,
                        col_offset: int = 0, out_format: str = "plain", rope_dim: int | None = None,
                        compute_dtype: torch.dtype = torch.float32) -> None:
    """One compressor step, in place: append every token to the tail state, then pool, normalise,
    rotate, quantise and store every completed block (see `compressor_pool_ref`)."""
    compressor_append_ref(state, state_slot, kv, score, col_offset)
    if entry.numel() == 0:
        return
    entries = compressor_pool_ref(state, emit_rows, entry, norm_weight, inv_freq, ratio=ratio, coff=coff, eps=eps,
                                  col_offset=col_offset, compute_dtype=compute_dtype)
    store_entries_ref(out_pool, dest, entries, out_format, rope_dim)
