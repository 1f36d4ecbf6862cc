"""Deterministic indexer top-k: the k best scores per query, ties broken by the lower entry index.

`torch.topk` leaves the order of equal values to the implementation, and it changes with the tensor's
width, i.e. with the batch composition (a full prefill sees more candidate columns than a chunk). The
indexer's ReLU makes exact ties common: Σ_h w_h · ReLU(q_h · k_s) is exactly 0 for every entry s whose
dot products are all negative. Different picks among tied entries change the attention output, so the
rule must be fixed:

    selected(t) = { s : I(t,s) > v_k } ∪ { the (k - #{I > v_k}) lowest-index s with I(t,s) = v_k }

where v_k is the k-th largest finite score of row t. Candidates are columns ordered by entry index j,
so "lower column" = "lower position". Cost is O(C) per row (one `topk` for v_k, cumulative sums), no
full sort. The result lists the selected rows in column order (the attention softmax is order-free).
"""

from __future__ import annotations

import torch


def select_topk(scores: torch.Tensor, cand_idx: torch.Tensor, k: int) -> torch.Tensor:
    """scores [T, C] (-inf = not visible), cand_idx [T, C] physical rows -> [T, k] rows, -1 padded.

    Deterministic: equal scores at the k-th place go to the lower column (lower entry index)."""
    if scores.shape != cand_idx.shape or scores.dim() != 2:
        raise ValueError(f"scores and cand_idx must both be [T, C]; got {tuple(scores.shape)}, "
                         f"{tuple(cand_idx.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    T, C = scores.shape
    out = torch.full((T, k + 1), -1, dtype=cand_idx.dtype, device=cand_idx.device)
    if C == 0 or T == 0:
        return out[:, :k]
    finite = torch.isfinite(scores)
    kk = min(k, C)
    kth = torch.topk(scores, kk, dim=-1).values[:, -1:]
    above = (scores > kth) & finite
    tied = (scores == kth) & finite
    need = kk - above.sum(dim=-1, keepdim=True)
    sel = above | (tied & (torch.cumsum(tied.to(torch.int32), dim=-1) <= need))
    slot = torch.cumsum(sel.to(torch.int32), dim=-1) - 1
    # unselected columns all land in the spare column k, which is dropped
    out.scatter_(1, torch.where(sel, slot, torch.full_like(slot, k)).long(), cand_idx)
    out[:, k] = -1
    return out[:, :k]
