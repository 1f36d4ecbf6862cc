"""`ForwardBatch`: one engine step, flattened over sequences (the contract in docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    """Tokens of all sequences of one step, flattened.

    input_ids [T], positions [T] (absolute), query_start [S+1] (tokens of sequence s are rows
    query_start[s]:query_start[s+1], consecutive positions), block_tables: pool name -> [S, max_blocks]
    (-1 = padding / freed; keys "swa", "csa", "hca", "csa_state", "hca_state"; "idx" uses "csa"),
    recompute_until [S] (positions below only rebuild swa/state rows, compressed entries are not rewritten),
    logits_indices [N] (rows of T whose logits are returned).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    query_start: torch.Tensor
    block_tables: dict[str, torch.Tensor]
    recompute_until: torch.Tensor
    logits_indices: torch.Tensor
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.query_start.shape[0]) - 1

    def to(self, device: torch.device | str) -> ForwardBatch:
        return ForwardBatch(
            self.input_ids.to(device), self.positions.to(device), self.query_start.to(device),
            {k: v.to(device) for k, v in self.block_tables.items()}, self.recompute_until.to(device),
            self.logits_indices.to(device), dict(self.extras),
        )

    @staticmethod
    def build(seqs: list[tuple[list[int], int]], block_tables: dict[str, list[list[int]]],
              recompute_until: list[int] | None = None, logits: str = "last",
              device: torch.device | str = "cpu") -> ForwardBatch:
        """Convenience constructor: `seqs` = [(token ids of this step, position of the first one)], block
        tables as lists per sequence (padded with -1 here); `logits` = "last" (one row per sequence), "all" or
        "none" (no logits, e.g. mid-prompt prefill chunks only: forward returns [0, vocab])."""
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        ids, pos, starts, li = [], [], [0], []
        for toks, p0 in seqs:
            ids += list(toks)
            pos += list(range(p0, p0 + len(toks)))
            starts.append(len(ids))
            if logits == "all":
                li += list(range(starts[-2], starts[-1]))
            elif logits == "last":
                li.append(starts[-1] - 1)
        tables = {}
        for name, rows in block_tables.items():
            width = max(1, max((len(r) for r in rows), default=1))
            tables[name] = torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.long,
                                        device=device)
        ru = recompute_until if recompute_until is not None else [0] * len(seqs)
        return ForwardBatch(
            torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(pos, dtype=torch.long, device=device),
            torch.tensor(starts, dtype=torch.long, device=device), tables,
            torch.tensor(ru, dtype=torch.long, device=device), torch.tensor(li, dtype=torch.long, device=device),
        )
