"""One engine step on the wire: a fixed-size int64 header and one flat int64 payload.

Header (HEADER_LEN int64): [cmd, seq_no, T, S, N, w_swa+1, w_csa+1, w_hca+1, w_csa_state+1, w_hca_state+1, 0...]
where T = tokens, S = sequences, N = logits rows and w_p the block-table width of pool p (0 = pool absent).
Payload (cmd STEP only): input_ids [T] | positions [T] | query_start [S+1] | recompute_until [S] |
logits_indices [N] | block tables in TABLE_POOLS order, each [S, w_p] row-major.

The header travels by all-reduce (rank 0 fills it, the others contribute zeros), so every rank must take part:
a hung rank is noticed within the collective timeout even while the server is idle (heartbeats are NOOP
headers). The payload travels by broadcast from rank 0.
"""

from __future__ import annotations

from typing import Any

import torch
from dsv4.runtime.cache.pools import TABLE_POOLS

HEADER_LEN = 16
CMD_NOOP, CMD_STEP, CMD_STOP = 1, 2, 3
CMD_NAMES = {CMD_NOOP: "noop", CMD_STEP: "step", CMD_STOP: "stop"}


class CodecError(ValueError):
    """A header or payload that does not describe a step (names the field)."""


def encode(batch: Any, cmd: int = CMD_STEP, seq_no: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [HEADER_LEN] int64 cpu, payload [P] int64 cpu) for a ForwardBatch."""
    header = torch.zeros(HEADER_LEN, dtype=torch.long)
    header[0], header[1] = cmd, seq_no
    T, S, N = batch.num_tokens, batch.num_seqs, int(batch.logits_indices.shape[0])
    header[2], header[3], header[4] = T, S, N
    parts = [batch.input_ids, batch.positions, batch.query_start, batch.recompute_until, batch.logits_indices]
    for i, p in enumerate(TABLE_POOLS):
        t = batch.block_tables.get(p)
        if t is None:
            continue
        if t.dim() != 2 or t.shape[0] != S:
            raise CodecError(f"block_tables[{p!r}] must be [num_seqs={S}, width], got {list(t.shape)}")
        header[5 + i] = t.shape[1] + 1
        parts.append(t)
    unknown = sorted(set(batch.block_tables) - set(TABLE_POOLS))
    if unknown:
        raise CodecError(f"block_tables has pools {unknown}; the wire format knows {list(TABLE_POOLS)}")
    payload = torch.cat([x.reshape(-1).to(device="cpu", dtype=torch.long) for x in parts])
    return header, payload


def payload_len(header: torch.Tensor) -> int:
    h = [int(v) for v in header.tolist()]
    T, S, N = h[2], h[3], h[4]
    return 2 * T + (S + 1) + S + N + sum(S * (w - 1) for w in h[5:5 + len(TABLE_POOLS)] if w > 0)


def decode(header: torch.Tensor, payload: torch.Tensor, device: torch.device | str = "cpu") -> Any:
    """The ForwardBatch that `encode` packed (tensors on `device`)."""
    from dsv4.runtime.model.batch import ForwardBatch

    h = [int(v) for v in header.tolist()]
    if h[0] != CMD_STEP:
        raise CodecError(f"header cmd must be {CMD_STEP} (step) to carry a batch, got {h[0]}")
    T, S, N = h[2], h[3], h[4]
    if payload.numel() != payload_len(header):
        raise CodecError(f"payload has {payload.numel()} values, header says {payload_len(header)}")
    p = payload.to(device)
    off = 0

    def take(n: int) -> torch.Tensor:
        nonlocal off
        out = p[off:off + n]
        off += n
        return out

    ids, pos, qs, ru, li = take(T), take(T), take(S + 1), take(S), take(N)
    tables = {}
    for i, name in enumerate(TABLE_POOLS):
        w = h[5 + i]
        if w > 0:
            tables[name] = take(S * (w - 1)).view(S, w - 1)
    return ForwardBatch(ids, pos, qs, tables, ru, li)
