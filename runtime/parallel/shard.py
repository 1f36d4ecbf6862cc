"""Shard a loaded `DeepseekV4Model` over `world` ranks IN PLACE (module surgery; no model file changes).

Per layer, with nH query heads of dim D, g output groups of rank r_o, E routed experts, I shared-expert width:

| part | split | collective |
|---|---|---|
| `wq_b`, `attn_sink` | heads: rank k keeps heads [k·nH/N, (k+1)·nH/N) (per-head RMS and RoPE are local) | — |
| `wo_a` (grouped) | N ≤ g: the g/N whole groups of those heads; N > g: its column slice of one group | — |
| `wo_b` | row-parallel: input columns of the rank's groups, out = Σ_k wo_b_k · y_k | all-reduce |
| `wq_a`, `q_norm`, `wkv` (one K=V head), compressors, indexer, mHC, norms, gate | replicated | — |
| routed experts | rank k owns experts [k·E/N, (k+1)·E/N), computes only its (token, expert) pairs | all-reduce |
| shared expert | `w1`, `w3` column-parallel, `w2` row-parallel (slices of I) | (same all-reduce) |
| `embed_tokens` | vocab-parallel rows; other ranks' tokens give zeros | all-reduce |
| `head` | vocab-parallel rows; logits [N, V/N] per rank | all-gather |

The K=V head, the compressors and the indexer are replicated, so every rank writes the same rows into its own
full copy of every cache pool: cache bytes per rank = the whole replica's cache (the planner's assumption).
Every replicated computation sees bit-identical inputs (all-reduce results are identical on all ranks), so the
copies stay identical.

Requirements (checked by `check_tp`, errors name the field): nH, E, I and vocab_size divisible by N; N divides
o_groups or o_groups divides N.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dsv4.runtime.parallel.ownership import TPConfigError, check_tp
from torch import nn

__all__ = ["TPConfigError", "check_tp", "shard_model", "shard_summary"]


def _param(t: torch.Tensor) -> nn.Parameter:
    if t.is_meta:  # the loader cuts the meta model; a meta clone would run through torch._refs (imports sympy)
        return nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, dtype=weight.dtype, device=weight.device)
    lin.weight = _param(weight)
    return lin


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_k · W_kᵀ): this rank's input-column slice of a linear layer."""

    def __init__(self, weight: torch.Tensor, pg: Any):
        super().__init__()
        self.weight = _param(weight)
        self.pg = pg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.pg)
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows [v0, v1) of the embedding; tokens outside give zero rows; the sum over ranks is the lookup."""

    def __init__(self, weight: torch.Tensor, rank: int, world: int, pg: Any):
        super().__init__()
        per = weight.shape[0] // world
        self.v0, self.v1 = rank * per, (rank + 1) * per
        self.weight = _param(weight[self.v0:self.v1])
        self.pg = pg

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.v0) & (ids < self.v1)
        out = F.embedding(torch.where(mine, ids - self.v0, torch.zeros_like(ids)), self.weight)
        out = out.masked_fill(~mine.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.pg)
        return out


class VocabParallelHead(nn.Module):
    """Rows [v0, v1) of the LM head; the full logits are the all-gather of every rank's slice."""

    def __init__(self, weight: torch.Tensor, rank: int, world: int, pg: Any):
        super().__init__()
        per = weight.shape[0] // world
        self.weight = _param(weight[rank * per:(rank + 1) * per])
        self.world = world
        self.pg = pg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight).contiguous()
        if y.shape[0] == 0:  # no logits rows this step (same on every rank): nothing to gather
            return y.new_empty(0, y.shape[-1] * self.world)
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.pg)
        return torch.cat(parts, dim=-1)


def routed_partial(ex: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, e0: int, el: int
                   ) -> torch.Tensor:
    """Σ over the (token t, expert e) pairs with e in [e0, e0+el) of w_te · expert_e(x_t); other rows zero.
    `ex` holds exactly those el experts (row j = expert e0 + j). Ids outside the range (other ranks' experts,
    padding's -1) contribute nothing."""
    out = torch.zeros_like(x)
    k = idx.shape[1]
    flat_e = idx.reshape(-1) - e0
    keep = (flat_e >= 0) & (flat_e < el)
    if not bool(keep.any()):
        return out
    tok_all = torch.arange(idx.shape[0], device=x.device).repeat_interleave(k)
    e, tok, wts = flat_e[keep], tok_all[keep], w.reshape(-1)[keep]
    order = torch.argsort(e, stable=True)
    e, tok, wts = e[order], tok[order], wts[order]
    counts = torch.bincount(e, minlength=el).tolist()
    y = ex.forward_sorted(x[tok], counts)  # grouped GEMMs on the Triton backend, the per-expert loop on torch
    out.index_add_(0, tok, (y * wts[:, None].to(y.dtype)).to(out.dtype))  # expert by expert, as the rows are sorted
    return out


def shard_shared_expert(sh: nn.Module, rank: int, world: int) -> nn.Module:
    """Rank `rank`'s slice of the shared expert's width I: w1, w3 column-parallel, w2 row-parallel, so its output
    is this rank's partial sum (the caller all-reduces)."""
    inter = sh.w1.weight.shape[0] // world
    cols = slice(rank * inter, (rank + 1) * inter)
    sh.w1, sh.w3 = _linear(sh.w1.weight[cols]), _linear(sh.w3.weight[cols])
    sh.w2 = _linear(sh.w2.weight[:, cols])
    return sh


def shard_tp_parts(model: nn.Module, cfg: Any, rank: int, world: int, pg: Any) -> None:
    """The TP cut of everything but the MoE layers: vocab-parallel embedding and head, attention heads."""
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight, rank, world, pg)
    for block in model.layers:
        _shard_attention(block.attn, cfg, rank, world, pg)
    model.head = VocabParallelHead(model.head.weight, rank, world, pg)
    model.tp_rank, model.tp_world = rank, world


class ParallelMoE(nn.Module):
    """The rank's routed experts [e0, e0+el) plus its slice of the shared expert; one all-reduce.

    out = all_reduce( Σ_{(t,e): e owned} w_te · expert_e(x_t)  +  w2_k · swiglu(w1_k x, w3_k x) )."""

    def __init__(self, moe: nn.Module, rank: int, world: int, pg: Any):
        super().__init__()
        self.gate = moe.gate  # replicated: the same routing on every rank
        ex = moe.experts
        E = ex.w1.shape[0]
        self.el = E // world
        self.e0 = rank * self.el
        sl = slice(self.e0, self.e0 + self.el)
        ex.w1, ex.w2, ex.w3 = _param(ex.w1[sl]), _param(ex.w2[sl]), _param(ex.w3[sl])
        self.experts = ex
        self.shared_experts = shard_shared_expert(moe.shared_experts, rank, world)
        self.pg = pg

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x, input_ids)
        out = routed_partial(self.experts, x, idx, w, self.e0, self.el) + self.shared_experts(x)
        dist.all_reduce(out, group=self.pg)
        return out


def _shard_attention(attn: nn.Module, cfg: Any, rank: int, world: int, pg: Any) -> None:
    nH, D, g, r = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    hl, hpg = nH // world, nH // g
    h0 = rank * hl
    attn.wq_b = _linear(attn.wq_b.weight[h0 * D:(h0 + hl) * D])
    attn.attn_sink = _param(attn.attn_sink[h0:h0 + hl])
    attn.n_heads = hl
    if world <= g:  # whole groups per rank
        gl, g0, cols = g // world, rank * (g // world), slice(None)
    else:  # several ranks share one group: each takes its heads' columns of that group's wo_a
        gl, g0 = 1, h0 // hpg
        off = (h0 % hpg) * D
        cols = slice(off, off + hl * D)
    wa = attn.wo_a.weight.view(g, r, hpg * D)[g0:g0 + gl, :, cols].reshape(gl * r, -1)
    attn.wo_a = _linear(wa)
    attn.wo_b = RowParallelLinear(attn.wo_b.weight[:, g0 * r:(g0 + gl) * r], pg)
    local = copy.copy(attn.cfg)  # the forward reads o_groups from its cfg: give it the local count
    local.o_groups, local.num_attention_heads = gl, hl
    attn.cfg = local


@torch.no_grad()
def shard_model(model: nn.Module, cfg: Any, rank: int, world: int, pg: Any = None) -> nn.Module:
    """Replace the full weights of `model` by rank `rank`'s shard (see the module docstring). Returns `model`.
    With world == 1 nothing changes. The MTP block is not run and stays unsharded."""
    check_tp(cfg, world)
    if world == 1:
        return model
    shard_tp_parts(model, cfg, rank, world, pg)
    for block in model.layers:
        block.ffn = ParallelMoE(block.ffn, rank, world, pg)
    return model


def shard_summary(cfg: Any, world: int) -> str:
    """One line: what each rank holds."""
    return (f"per rank: {cfg.num_attention_heads // world} of {cfg.num_attention_heads} query heads, "
            f"{cfg.n_routed_experts // world} of {cfg.n_routed_experts} routed experts, "
            f"{cfg.moe_intermediate_size // world} of {cfg.moe_intermediate_size} shared-expert columns, "
            f"{cfg.vocab_size // world} of {cfg.vocab_size} vocab rows; K=V head, compressors, indexer and KV "
            f"cache replicated")
