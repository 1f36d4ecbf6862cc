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
"""

from __future__ import annotations

from typing import Any

import torch
from dsv4.runtime.parallel.expert_exchange import ExpertExchange
from dsv4.runtime.parallel.ownership import check_ep
from dsv4.runtime.parallel.shard import _param, routed_partial
from torch import nn


class ExpertParallelMoE(nn.Module):
    """A MoE layer holding experts [e0, e0+el) whose tokens come from every rank through `exchange`."""

    def __init__(self, moe: nn.Module, rank: int, world: int, exchange: ExpertExchange):
        super().__init__()
        self.gate = moe.gate
        ex = moe.experts
        self.el = ex.w1.shape[0] // world
        self.e0 = rank * self.el
        sl = slice(self.e0, self.e0 + self.el)
        ex.w1, ex.w2, ex.w3 = _param(ex.w1[sl]), _param(ex.w2[sl]), _param(ex.w3[sl])
        self.experts = ex
        self.shared_experts = moe.shared_experts
        self.exchange = exchange

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x, input_ids)
        x_all, idx_all, w_all = self.exchange.dispatch(x, idx, w)
        routed = self.exchange.combine(routed_partial(self.experts, x_all, idx_all, w_all, self.e0, self.el))
        return routed.to(x.dtype) + self.shared_experts(x)


@torch.no_grad()
def shard_model_ep(model: nn.Module, cfg: Any, rank: int, world: int, exchange: ExpertExchange) -> nn.Module:
    """Keep rank `rank`'s 1/world of the routed experts in every layer; everything else stays whole."""
    check_ep(cfg, world)
    for block in model.layers:
        block.ffn = ExpertParallelMoE(block.ffn, rank, world, exchange)
    model.ep_rank, model.ep_world = rank, world
    return model


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
