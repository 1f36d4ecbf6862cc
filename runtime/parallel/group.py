"""Process-group setup and the step channel.

Two process groups over the same ranks:
* the default group, created with `startup_timeout_s` (loading a large checkpoint can take minutes), carries
  the rendezvous and the one-time setup message (cache layout and block counts);
* `pg`, created with `timeout_s` (default 60 s), carries every step: the channel header and payload and the
  model's all-reduce / all-gather. A peer that dies or hangs makes the next collective raise within `timeout_s`.

Backend: gloo for CPU devices, NCCL for CUDA (rank k on cuda:k; NCCL's watchdog enforces the same timeout).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from dsv4.runtime.parallel.codec import CMD_STEP, HEADER_LEN, decode, encode, payload_len

ENV_RANK, ENV_WORLD = "DSV4_TP_RANK", "DSV4_TP_WORLD"
ENV_ADDR, ENV_PORT = "MASTER_ADDR", "MASTER_PORT"


@dataclass
class GroupInfo:
    rank: int
    world: int
    backend: str
    device: str
    timeout_s: float
    pg: Any  # the step group (timeout_s)
    tp: int = 1  # data parallel with TP inside: ranks [d·tp, (d+1)·tp) form data-parallel rank d's TP group
    tp_pg: Any = None  # this rank's TP group (None when tp == 1)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_world(self) -> int:
        return self.world // self.tp


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> str:
    """cpu stays cpu; cuda means cuda:rank (one GPU per rank)."""
    return f"cuda:{rank}" if device.startswith("cuda") else "cpu"


def init_group(rank: int, world: int, addr: str, port: int, device: str, timeout_s: float,
               startup_timeout_s: float = 1800.0, tp: int = 1) -> GroupInfo:
    """Join the group (blocks until all `world` ranks joined or `startup_timeout_s` passed). `tp` > 1 (data
    parallel with TP inside each rank) also creates the world/tp TP groups, every rank all of them in the same
    order (as torch requires), and keeps this rank's."""
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=max(startup_timeout_s, timeout_s)))
    step_timeout = datetime.timedelta(seconds=timeout_s)
    pg = dist.new_group(list(range(world)), timeout=step_timeout, backend=backend)
    tp_pg = None
    for d in range(world // tp if tp > 1 else 0):
        members = list(range(d * tp, (d + 1) * tp))
        g = dist.new_group(members, timeout=step_timeout, backend=backend)
        if rank in members:
            tp_pg = g
    return GroupInfo(rank, world, backend, device, timeout_s, pg, tp, tp_pg)


def shard_for(info: GroupInfo, data_parallel: bool) -> Any:
    """What this rank loads of the checkpoint: its TP shard, or (data parallel) its routed experts plus, with TP
    inside the data-parallel ranks, its TP group's cut of everything else."""
    from dsv4.runtime.checkpoint.loader import TPShard

    if not data_parallel:
        return TPShard(info.rank, info.world, info.pg)
    return TPShard(info.rank, info.world, info.pg, mode="ep", tp=info.tp, tp_pg=info.tp_pg)


def broadcast_setup(obj: Any, info: GroupInfo) -> Any:
    """Rank 0 sends `obj` (picklable) to every rank over the startup group; returns it on every rank."""
    box = [obj if info.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=torch.device(info.device) if info.backend == "nccl" else None)
    return box[0]


class Channel:
    """Rank 0 -> all: one command per message. The header is all-reduced (rank 0's values, zeros elsewhere) so
    every rank takes part in every message; a STEP's payload follows by broadcast."""

    def __init__(self, info: GroupInfo):
        self.info = info
        self.dev = torch.device(info.device)
        self.seq_no = 0

    def send(self, cmd: int, batch: Any = None) -> None:
        """Rank 0 only."""
        self.seq_no += 1
        if cmd == CMD_STEP:
            header, payload = encode(batch, cmd, self.seq_no)
        else:
            header, payload = torch.zeros(HEADER_LEN, dtype=torch.long), None
            header[0], header[1] = cmd, self.seq_no
        h = header.to(self.dev)
        dist.all_reduce(h, group=self.info.pg)
        if payload is not None:
            dist.broadcast(payload.to(self.dev), src=0, group=self.info.pg)

    def recv(self) -> tuple[int, Any]:
        """Ranks > 0: (cmd, ForwardBatch | None)."""
        h = torch.zeros(HEADER_LEN, dtype=torch.long, device=self.dev)
        dist.all_reduce(h, group=self.info.pg)
        header = h.cpu()
        cmd = int(header[0])
        if cmd != CMD_STEP:
            return cmd, None
        payload = torch.empty(payload_len(header), dtype=torch.long, device=self.dev)
        dist.broadcast(payload, src=0, group=self.info.pg)
        return cmd, decode(header, payload, self.dev)
