"""How expert-parallel ranks hand each other tokens for a MoE layer (`dsv4 serve --dp N --ep`).

Rank k holds T_k tokens of its own requests and the routed experts [k·E/N, (k+1)·E/N). One MoE layer is

    dispatch:  every rank gets every rank's (x, expert ids, weights), padded to T_max = max_k T_k rows each
    compute:   y_k = Σ_{(t, e): e owned by k} w_te · expert_e(x_t)   over all N·T_max rows (zeros elsewhere)
    combine:   rank k keeps rows [k·T_max, k·T_max + T_k) of Σ_j y_j   (a reduce-scatter)

`AllGatherExchange` does this with all-gather + reduce-scatter (gloo on CPU, NCCL on GPU): every rank moves
N·T_max rows each way, which is simple and exact; an all-to-all backend that ships each token only to the ranks
owning its experts (DeepEP-style) would implement the same two methods. Every rank must call the exchange once per
MoE layer and step, also with no tokens of its own (a dummy batch, as vLLM does), because the collectives need all.
Padding rows carry expert id -1 (owned by no rank) and weight 0.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class ExpertExchange(Protocol):
    rank: int
    world: int
    act_dtype: torch.dtype

    def begin_step(self, token_counts: list[int]) -> None: ...

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def combine(self, y_all: torch.Tensor) -> torch.Tensor: ...


class AllGatherExchange:
    """All-gather the tokens, reduce-scatter the partial outputs. `begin_step` gives every rank's token count
    (every rank knows them from the step header), so no size exchange is needed per layer. On the wire the
    activations are `act_dtype` and the routing weights fp32 on every rank, whatever a rank computed them in."""

    def __init__(self, rank: int, world: int, pg: Any = None, act_dtype: torch.dtype = torch.float32):
        self.rank, self.world, self.pg = rank, world, pg
        self.act_dtype = act_dtype
        self.counts = [0] * world

    def begin_step(self, token_counts: list[int]) -> None:
        if len(token_counts) != self.world:
            raise ValueError(f"token_counts must have one entry per rank ({self.world}), got {len(token_counts)}")
        self.counts = [int(c) for c in token_counts]

    @property
    def padded(self) -> int:
        return max(self.counts)

    def _gather(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        pad = self.padded
        if t.shape[0] != self.counts[self.rank]:
            raise ValueError(f"rank {self.rank} has {t.shape[0]} tokens, the step header says "
                             f"{self.counts[self.rank]}")
        mine = t.new_full((pad, *t.shape[1:]), fill)
        mine[: t.shape[0]] = t
        out = t.new_empty((self.world * pad, *t.shape[1:]))
        dist.all_gather_into_tensor(out, mine.contiguous(), group=self.pg)
        return out

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._gather(x.to(self.act_dtype), 0.0), self._gather(idx.long(), -1),
                self._gather(w.float(), 0.0))

    def combine(self, y_all: torch.Tensor) -> torch.Tensor:
        pad = self.padded
        y_all = y_all.to(self.act_dtype).contiguous()
        out = y_all.new_empty((pad, *y_all.shape[1:]))
        dist.reduce_scatter_tensor(out, y_all, group=self.pg)
        return out[: self.counts[self.rank]]
