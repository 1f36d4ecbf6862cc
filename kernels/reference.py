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


def _gather_kv(pool: torch.Tensor, idx: torch.Tensor, head_dim: int, rope_dim: int | None):
    """Like `_gather_rows` in fp32, decoding FP8 (uint8) rows on the way."""
    if pool.dtype != torch.uint8:
        return _gather_rows(pool.float(), idx)
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
    rows, valid = _gather_kv(swa_kv, swa_idx, q.shape[-1], rope_dim)
    if comp_kv is not None and comp_idx is not None and comp_idx.shape[-1] > 0:
        crow, cvalid = _gather_kv(comp_kv, comp_idx, q.shape[-1], rope_dim)
        rows = torch.cat([rows, crow], dim=1)
        valid = torch.cat([valid, cvalid], dim=1)
    logits = torch.einsum("thd,tkd->thk", q.float(), rows) * scale  # [T, H, K]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink_logit = sink.float()[None, :, None].expand(logits.shape[0], -1, 1)
    full = torch.cat([logits, sink_logit], dim=-1)
    probs = torch.softmax(full, dim=-1)[..., :-1]
    return torch.einsum("thk,tkd->thd", probs, rows)


def indexer_scores_ref(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, cand_idx: torch.Tensor
) -> torch.Tensor:
    """Lightning-indexer scores I(t, s) = Σ_h w[t,h] · ReLU(q[t,h] · k_s) over candidate rows.

    q [T, Hi, Di]; weights [T, Hi]; keys [N, Di]; cand_idx [T, C] (-1 = not visible).
    Returns [T, C] fp32 with -inf where the candidate is invalid.
    """
    rows, valid = _gather_rows(keys.float(), cand_idx)  # [T, C, Di]
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
    """Physical row ids of the k best finite scores per row (-1 where fewer are finite)."""
    top = torch.topk(scores, k, dim=-1)
    picked = torch.gather(cand_idx, 1, top.indices)
    return torch.where(torch.isfinite(top.values), picked, torch.full_like(picked, -1))
