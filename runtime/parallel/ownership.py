"""Which checkpoint tensors a TP (or EP) rank holds a 1/N slice of, and which it holds whole (`shard.py`'s table), and
which TP sizes a config can be split into (`check_tp`). Torch-free, so the planner and `dsv4 model info` use it.

Split over the N ranks: the query heads' `attn.wq_b`, `attn.attn_sink`, `attn.wo_a`, `attn.wo_b` (with their
`.scale`), the routed experts (each rank owns E/N of them), the shared expert (slices of its width), `embed` and
`head` (vocab rows). Everything else — `wq_a`, `q_norm`, the K=V head, compressors, indexer, norms, mHC, the router
and the MTP block (not sharded by `shard_model`) — is replicated on every rank.

Expert parallelism (`dsv4 serve --dp N --ep`, docs/parallel.md) splits only the routed experts (rank k owns
experts [k·E/N, (k+1)·E/N)); every other tensor, the shared expert included, is whole on every rank
(`split_over_ep_ranks`, `owned_part(..., mode="ep")`, `check_ep`). With TP inside each data-parallel rank
(`--dp D --tp T --ep`, D·T processes, ranks [d·T, (d+1)·T) one TP group) the routed experts are split over all
D·T ranks and every other tensor is cut as TP rank `rank % T` of T (`owned_part(..., mode="ep", tp=T)`,
`check_dp_tp`).

Names may be in the published layout (`layers.N.`, `embed.weight`) or the Hugging Face one (`model.layers.N.`,
`model.embed_tokens.weight`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_SPLIT = re.compile(
    r"^(model\.)?(embed\.weight$|embed_tokens\.weight$|head\.weight$"
    r"|layers\.\d+\.attn\.(wq_b|wo_a|wo_b)\.(weight|scale)$|layers\.\d+\.attn\.attn_sink$"
    r"|layers\.\d+\.ffn\.(experts|shared_experts)\.)"
)


def split_over_ranks(name: str) -> bool:
    """True when each of the TP ranks holds 1/N of tensor `name`, False when every rank holds all of it."""
    return _SPLIT.match(name) is not None


_EP_SPLIT = re.compile(r"^(model\.)?layers\.\d+\.ffn\.experts\.")


def split_over_ep_ranks(name: str) -> bool:
    """True when each of N expert-parallel ranks holds 1/N of tensor `name` (routed experts only)."""
    return _EP_SPLIT.match(name) is not None


def split_and_whole(entries: Iterable[tuple[str, int]], mode: str = "tp") -> tuple[int, int]:
    """(bytes of the split tensors, bytes of the replicated ones) of the (name, bytes) tensors `entries`, for
    tensor parallelism (`mode="tp"`) or expert parallelism (`mode="ep"`)."""
    split_test = split_over_ep_ranks if mode == "ep" else split_over_ranks
    split = whole = 0
    for name, n in entries:
        if split_test(name):
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


def check_ep(cfg: Any, ranks: int) -> None:
    """Raise TPConfigError unless the routed experts split evenly over `ranks` expert-parallel ranks."""
    if ranks < 1:
        raise TPConfigError(f"dp must be >= 1, got {ranks}")
    e = int(cfg.n_routed_experts)
    if e % ranks:
        raise TPConfigError(f"dp={ranks} must divide the model's n_routed_experts ({e}) for expert parallelism")


def check_dp_tp(cfg: Any, dp: int, tp: int) -> None:
    """Raise TPConfigError unless `dp` data-parallel ranks of `tp` TP ranks each fit the model: the TP cut of
    `check_tp` inside a rank, and the routed experts split over all dp·tp ranks."""
    check_tp(cfg, tp)
    if tp == 1:
        return check_ep(cfg, dp)
    e = int(cfg.n_routed_experts)
    if dp < 1 or e % (dp * tp):
        raise TPConfigError(f"dp={dp} x tp={tp} = {dp * tp} expert-parallel ranks must divide the model's "
                            f"n_routed_experts ({e})")


@dataclass(frozen=True)
class OwnedPart:
    """The part of one checkpoint tensor a TP rank holds: a row range and/or a column range of the full tensor
    (None = all of that dim), and for a routed expert its row in the rank's stacked expert tensor."""

    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    expert: int | None = None


_LAYER = re.compile(r"^layers\.\d+\.(.+)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.w[123]\.weight$")


def owned_part(name: str, cfg: Any, rank: int, world: int, mode: str = "tp", tp: int = 1) -> OwnedPart | None:
    """What rank `rank` of `world` holds of the tensor with module name `name` (Hugging Face name without `model.`,
    e.g. `layers.3.attn.wq_b.weight`), the same cut as `shard.shard_model`; None when it holds none of it. The MTP
    block is not sharded. `expert` is set only where the rank's expert row differs from the file's expert id.
    `mode="ep"`: routed experts over all `world` ranks; with `tp` > 1 everything else as TP rank `rank % tp`."""
    m = _LAYER.match(name)
    if world == 1 or not (m or name in ("embed_tokens.weight", "head.weight")):
        return OwnedPart()
    if mode == "ep":
        expert = _EXPERT.match(m.group(1)) if m else None
        if expert:
            return _owned_expert(int(expert.group(1)), cfg, rank, world)
        return owned_part(name, cfg, rank % tp, tp) if tp > 1 else OwnedPart()
    if not m:  # embedding / head: vocab rows
        per = cfg.vocab_size // world
        return OwnedPart(rows=(rank * per, (rank + 1) * per))
    rest = m.group(1)
    nH, D, g, r = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    hl = nH // world
    h0 = rank * hl
    if world <= g:
        gl, g0, cols = g // world, rank * (g // world), None
    else:
        gl, g0 = 1, h0 // (nH // g)
        off = (h0 % (nH // g)) * D
        cols = (off, off + hl * D)
    inter = cfg.moe_intermediate_size // world
    if rest == "attn.wq_b.weight":
        return OwnedPart(rows=(h0 * D, (h0 + hl) * D))
    if rest == "attn.attn_sink":
        return OwnedPart(rows=(h0, h0 + hl))
    if rest == "attn.wo_a.weight":
        return OwnedPart(rows=(g0 * r, (g0 + gl) * r), cols=cols)
    if rest == "attn.wo_b.weight":
        return OwnedPart(cols=(g0 * r, (g0 + gl) * r))
    if rest in ("ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight"):
        return OwnedPart(rows=(rank * inter, (rank + 1) * inter))
    if rest == "ffn.shared_experts.w2.weight":
        return OwnedPart(cols=(rank * inter, (rank + 1) * inter))
    expert = _EXPERT.match(rest)
    return _owned_expert(int(expert.group(1)), cfg, rank, world) if expert else OwnedPart()


def _owned_expert(e_file: int, cfg: Any, rank: int, world: int) -> OwnedPart | None:
    """Rank `rank` of `world` owns experts [rank·E/world, (rank+1)·E/world), stacked from row 0."""
    el = cfg.n_routed_experts // world
    e = e_file - rank * el
    return OwnedPart(expert=e) if 0 <= e < el else None
