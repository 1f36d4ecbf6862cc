"""Expert parallelism for data-parallel attention ranks (`dsv4 serve --dp N --ep`, docs/parallel.md).

Each of the N ranks runs the whole model on its own requests' tokens, except the routed experts: rank k holds
experts [k·E/N, (k+1)·E/N) and the MoE layer exchanges tokens (`expert_exchange.py`):

    idx, w = gate(x, input_ids)                                  (local: routing needs only the token)
    x*, idx*, w* = dispatch(x, idx, w)                           (every rank's tokens)
    out = combine(routed_partial(x*, idx*, w*)) + shared(x)      (own rows of the sum over ranks)

The shared expert is replicated, not split: it runs on every token of every layer, so splitting it would add a
second exchange per layer for 1/E of the expert bytes (Flash: 6 MiB of 1.6 GiB per layer); attention, the
compressors, the indexer, norms, mHC, embedding and head are replicated too — each rank's attention reads only its
own KV cache. `shard_model_ep` cuts a (meta or real) model in place; the loader reads only the rank's experts
(`ownership.owned_part(..., mode="ep")`).

**TP inside each data-parallel rank** (`--dp D --tp T --ep`, for models whose replicated parts do not fit one
GPU beside 1/N of the experts): D·T processes; ranks [d·T, (d+1)·T) are data-parallel rank d's TP group, cut like
`shard.py` (heads, vocab rows, shared-expert width; the K=V head, compressors, indexer and KV cache replicated in
the group), and the routed experts are split over all N = D·T ranks. The T members hold the same T_d tokens after
attention, so each sends only its run of them to the exchange (`chunk_bounds`: no token is computed twice):

    [lo, hi) = chunk_bounds(T_d, T, j)                           (TP rank j's run of the tokens)
    y_j = combine(routed_partial(dispatch(x[lo:hi], ...)))       (rows [lo, hi) of the routed output)
    out = all_reduce_TP( shared_j(x) + y_j placed at rows [lo, hi) )   (one all-reduce: the runs are disjoint)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dsv4.runtime.parallel.expert_exchange import ExpertExchange
from dsv4.runtime.parallel.ownership import check_dp_tp
from dsv4.runtime.parallel.shard import _param, routed_partial, shard_shared_expert, shard_tp_parts
from torch import nn


def chunk_bounds(n: int, parts: int, k: int) -> tuple[int, int]:
    """Rows [lo, hi) of run k when n rows are cut into `parts` runs in order (the first n % parts one row longer)."""
    base, extra = divmod(n, parts)
    lo = k * base + min(k, extra)
    return lo, lo + base + (1 if k < extra else 0)


class ExpertParallelMoE(nn.Module):
    """A MoE layer holding experts [e0, e0+el) whose tokens come from every rank through `exchange`; with
    `tp` > 1 also TP rank `rank % tp`'s slice of the shared expert (module docstring)."""

    def __init__(self, moe: nn.Module, rank: int, world: int, exchange: ExpertExchange, tp: int = 1,
                 tp_pg: Any = None):
        super().__init__()
        self.gate = moe.gate
        ex = moe.experts
        self.el = ex.w1.shape[0] // world
        self.e0 = rank * self.el
        sl = slice(self.e0, self.e0 + self.el)
        ex.w1, ex.w2, ex.w3 = _param(ex.w1[sl]), _param(ex.w2[sl]), _param(ex.w3[sl])
        self.experts = ex
        self.tp, self.tp_rank, self.tp_pg = tp, rank % tp, tp_pg
        self.shared_experts = shard_shared_expert(moe.shared_experts, rank % tp, tp) if tp > 1 else moe.shared_experts
        self.exchange = exchange

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x, input_ids)
        lo, hi = chunk_bounds(x.shape[0], self.tp, self.tp_rank)
        x_all, idx_all, w_all = self.exchange.dispatch(x[lo:hi], idx[lo:hi], w[lo:hi])
        routed = self.exchange.combine(routed_partial(self.experts, x_all, idx_all, w_all, self.e0, self.el))
        if self.tp == 1:
            return routed.to(x.dtype) + self.shared_experts(x)
        out = self.shared_experts(x)
        out[lo:hi] += routed.to(out.dtype)
        dist.all_reduce(out, group=self.tp_pg)
        return out


@torch.no_grad()
def shard_model_ep(model: nn.Module, cfg: Any, rank: int, world: int, exchange: ExpertExchange, tp: int = 1,
                   tp_pg: Any = None) -> nn.Module:
    """Keep rank `rank`'s 1/world of the routed experts in every layer; everything else whole (tp == 1) or cut
    as TP rank `rank % tp` of `tp` (module docstring)."""
    check_dp_tp(cfg, world // tp, tp)
    if tp > 1:
        shard_tp_parts(model, cfg, rank % tp, tp, tp_pg)
    for block in model.layers:
        block.ffn = ExpertParallelMoE(block.ffn, rank, world, exchange, tp, tp_pg)
    model.ep_rank, model.ep_world = rank, world
    return model


def exchange_counts(dp_tokens: list[int], tp: int) -> list[int]:
    """Tokens each of the len(dp_tokens)·tp ranks sends to the exchange: data-parallel rank d's T_d tokens cut
    into runs over its tp members (`chunk_bounds`)."""
    return [hi - lo for n in dp_tokens for lo, hi in (chunk_bounds(n, tp, j) for j in range(tp))]


@torch.inference_mode()
def idle_step(model: nn.Module, exchange: ExpertExchange) -> None:
    """A rank with no tokens this step still takes part in every MoE layer's exchange (the dummy batch)."""
    cfg = model.cfg
    dev = model.inv_freq_main.device
    x = torch.empty(0, cfg.hidden_size, dtype=exchange.act_dtype, device=dev)
    idx = torch.empty(0, cfg.num_experts_per_tok, dtype=torch.long, device=dev)
    w = torch.empty(0, cfg.num_experts_per_tok, dtype=torch.float32, device=dev)
    for block in model.layers:
        moe = block.ffn
        x_all, idx_all, w_all = exchange.dispatch(x, idx, w)
        exchange.combine(routed_partial(moe.experts, x_all, idx_all, w_all, moe.e0, moe.el))
