"""The step channel of data-parallel attention ranks (`dsv4 serve --dp N --ep`, docs/parallel.md).

Rank 0 runs every rank's scheduler and cache manager (bookkeeping only: block tables, prefix tree) and sends each
rank its own batch; each rank runs the model on its batch with its own KV pools and the MoE layers exchange
tokens (`expert_exchange.py`); rank 0 gathers the logits rows and samples for all.

One message = a [N, HEADER_LEN] int64 header, all-reduced (rank 0 fills row k with rank k's `codec.encode`
header, zeros elsewhere), then, for a STEP, the N payloads concatenated in rank order by one broadcast. An idle
rank's row is a STEP header with T = S = N = 0: it still joins every MoE exchange (`ep.idle_step`). After the
forward, every rank sends its logits rows to rank 0 (`gather`, padded to the longest rank). The header tells every
rank every other rank's token count, which the exchange needs, so no size message is added per layer.

With TP inside each data-parallel rank (`GroupInfo.tp` > 1) the header has one row per data-parallel rank
(`dp_world`), every member of rank d's TP group decodes row d, and rank 0 keeps the logits of each group's first
member (the vocab-parallel head gives every member the full rows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dsv4.runtime.parallel.codec import CMD_STEP, HEADER_LEN, decode, encode, payload_len
from dsv4.runtime.parallel.group import GroupInfo


def _empty_header(cmd: int, seq_no: int) -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.long)
    h[0], h[1] = cmd, seq_no
    return h


class DPChannel:
    """Rank 0 -> all: one command per message; every rank takes part in every message (heartbeats too)."""

    def __init__(self, info: GroupInfo):
        self.info = info
        self.dev = torch.device(info.device)
        self.seq_no = 0

    def send(self, cmd: int, batches: list[Any] | None = None) -> torch.Tensor:
        """Rank 0 only. `batches`: one ForwardBatch (or None = idle) per rank, for a STEP. Returns the header."""
        self.seq_no += 1
        world = self.info.dp_world
        header = torch.zeros(world, HEADER_LEN, dtype=torch.long)
        payloads = []
        for r in range(world):
            b = batches[r] if cmd == CMD_STEP and batches else None
            if b is None:
                header[r] = _empty_header(cmd, self.seq_no)
            else:
                header[r], p = encode(b, cmd, self.seq_no)
                payloads.append(p)
        h = header.to(self.dev)
        dist.all_reduce(h, group=self.info.pg)
        if cmd == CMD_STEP and payloads:
            dist.broadcast(torch.cat(payloads).to(self.dev), src=0, group=self.info.pg)
        return header

    def recv(self) -> tuple[int, Any, torch.Tensor]:
        """Every rank but 0: (cmd, this rank's ForwardBatch or None when idle, the [N, HEADER_LEN] header)."""
        h = torch.zeros(self.info.dp_world, HEADER_LEN, dtype=torch.long, device=self.dev)
        dist.all_reduce(h, group=self.info.pg)
        header = h.cpu()
        cmd = int(header[0, 0])
        if cmd != CMD_STEP:
            return cmd, None, header
        sizes = [payload_len(header[r]) if int(header[r, 2]) else 0 for r in range(self.info.dp_world)]
        batch = None
        if sum(sizes):
            payload = torch.empty(sum(sizes), dtype=torch.long, device=self.dev)
            dist.broadcast(payload, src=0, group=self.info.pg)
            r = self.info.dp_rank
            if sizes[r]:
                start = sum(sizes[:r])
                batch = decode(header[r], payload[start:start + sizes[r]], self.dev)
        return cmd, batch, header


def token_counts(header: torch.Tensor) -> list[int]:
    """Tokens of each rank in a STEP header."""
    return [int(v) for v in header[:, 2].tolist()]


def logits_rows(header: torch.Tensor) -> list[int]:
    """Logits rows of each rank in a STEP header."""
    return [int(v) for v in header[:, 4].tolist()]


def gather_logits(logits: torch.Tensor | None, rows: list[int], vocab: int, info: GroupInfo
                  ) -> list[torch.Tensor] | None:
    """Every rank sends its logits rows (padded to the longest rank's count) to rank 0, which gets one
    [rows_d, vocab] fp32 tensor per data-parallel rank d (`rows` has one entry each); other ranks get None."""
    pad = max(rows)
    if pad == 0:
        return [torch.empty(0, vocab) for _ in rows] if info.rank == 0 else None
    dev = torch.device(info.device)
    mine = torch.zeros(pad, vocab, dtype=torch.float32, device=dev)
    if logits is not None and logits.shape[0]:
        mine[: logits.shape[0]] = logits.float()
    if info.rank == 0:
        parts = [torch.empty_like(mine) for _ in range(info.world)]
        dist.gather(mine, parts, dst=0, group=info.pg)
        firsts = parts[:: info.tp]  # each TP group's first member
        return [p[:n].cpu() for p, n in zip(firsts, rows, strict=True)]
    dist.gather(mine, None, dst=0, group=info.pg)
    return None


def rank_step(model: Any, batch: Any, pools: Any, header: torch.Tensor, info: GroupInfo) -> list[torch.Tensor] | None:
    """What every rank (0 included) does with a STEP: its forward (or the idle exchange), then the logits to
    rank 0. Returns the per-rank logits on rank 0, None elsewhere."""
    from dsv4.runtime.parallel.ep import exchange_counts, idle_step

    exchange = model.expert_exchange
    exchange.begin_step(exchange_counts(token_counts(header), info.tp))
    logits = None
    if batch is None:
        idle_step(model, exchange)
    else:
        logits = model.forward(batch, pools)
    return gather_logits(logits, logits_rows(header), int(model.cfg.vocab_size), info)
