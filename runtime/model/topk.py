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

The one implementation is `dsv4.kernels.dispatch.select_topk` (torch reference
`kernels/reference.py::topk_from_scores`, Triton radix select on CUDA); the model calls it through this name.
"""

from dsv4.kernels.dispatch import select_topk

__all__ = ["select_topk"]
