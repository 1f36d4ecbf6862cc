"""Top-k selection on the torch path: `reference.topk_from_scores`'s exact result with ~4x fewer passes.

The reference makes about fifteen full passes over the [T, C] scores (masks, two prefix sums, a scatter) to
break ties at the k-th value deterministically. With float scores a tie at the k-th place is rare, so:

    v, i = topk(s, k), unsorted                one pass
    clean(t) = every v[t] finite               no +inf / NaN among the k best, at least k finite scores
               and #{c : s[t, c] >= min v[t]} == k     no candidate outside the k ties the k-th value
               and cand[t, i[t]] >= 0          every chosen candidate is visible
    clean rows: the chosen columns in column order -> cand[t, sort(i[t])]   (= the reference's rows)
    other rows: the reference

so the output equals the reference's for every input (`tests/test_kernels_topk.py`).
"""

from __future__ import annotations

import torch
from dsv4.kernels.reference import topk_from_scores


def topk_from_scores_fast(scores: torch.Tensor, cand_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as `reference.topk_from_scores`: [T, k] physical rows in column order, -1 padded."""
    T, C = scores.shape
    if C <= k or T == 0:
        return topk_from_scores(scores, cand_idx, k)
    s = scores.float()
    vals, cols = torch.topk(s, k, dim=-1, sorted=False)  # the set only (put in column order below): cheaper on CPU
    kth = vals.amin(dim=-1, keepdim=True)
    picked = torch.gather(cand_idx, 1, cols)
    clean = (torch.isfinite(vals).all(dim=-1) & ((s >= kth).sum(dim=-1) == k) & (picked >= 0).all(dim=-1))
    out = torch.gather(cand_idx, 1, torch.sort(cols, dim=-1).values)
    dirty = torch.nonzero(~clean).flatten()
    if dirty.numel():
        out[dirty] = topk_from_scores(scores[dirty], cand_idx[dirty], k)
    return out
