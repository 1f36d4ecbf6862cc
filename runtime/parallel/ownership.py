"""Which checkpoint tensors a TP rank holds a 1/N slice of, and which it holds whole (`shard.py`'s table), and
which TP sizes a config can be split into (`check_tp`). Torch-free, so the planner and `dsv4 model info` use it.

Split over the N ranks: the query heads' `attn.wq_b`, `attn.attn_sink`, `attn.wo_a`, `attn.wo_b` (with their
`.scale`), the routed experts (each rank owns E/N of them), the shared expert (slices of its width), `embed` and
`head` (vocab rows). Everything else — `wq_a`, `q_norm`, the K=V head, compressors, indexer, norms, mHC, the router
and the MTP block (not sharded by `shard_model`) — is replicated on every rank.

Names may be in the published layout (`layers.N.`, `embed.weight`) or the Hugging Face one (`model.layers.N.`,
`model.embed_tokens.weight`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_SPLIT = re.compile(
    r"^(model\.)?(embed\.weight$|embed_tokens\.weight$|head\.weight$"
    r"|layers\.\d+\.attn\.(wq_b|wo_a|wo_b)\.(weight|scale)$|layers\.\d+\.attn\.attn_sink$"
    r"|layers\.\d+\.ffn\.(experts|shared_experts)\.)"
)


def split_over_ranks(name: str) -> bool:
    """True when each of the TP ranks holds 1/N of tensor `name`, False when every rank holds all of it."""
    return _SPLIT.match(name) is not None


def split_and_whole(entries: Iterable[tuple[str, int]]) -> tuple[int, int]:
    """(bytes of the split tensors, bytes of the replicated ones) of the (name, bytes) tensors `entries`."""
    split = whole = 0
    for name, n in entries:
        if split_over_ranks(name):
            split += n
        else:
            whole += n
    return split, whole


def rank_bytes(split: int, whole: int, tp: int) -> int:
    """Bytes one of `tp` ranks holds (split tensors divide evenly when `check_tp` passes)."""
    return split // tp + whole


class TPConfigError(ValueError):
    """A TP size this model cannot be split into; the message names the field and the constraint."""


def check_tp(cfg: Any, tp: int) -> None:
    """Raise TPConfigError unless `cfg` splits evenly over `tp` ranks."""
    if tp < 1:
        raise TPConfigError(f"tp must be >= 1, got {tp}")
    for name in ("num_attention_heads", "n_routed_experts", "moe_intermediate_size", "vocab_size"):
        v = int(getattr(cfg, name))
        if v % tp:
            raise TPConfigError(f"tp={tp} must divide the model's {name} ({v})")
    g = int(cfg.o_groups)
    if g % tp and tp % g:
        raise TPConfigError(f"tp={tp} and the model's o_groups ({g}) must divide one another")
