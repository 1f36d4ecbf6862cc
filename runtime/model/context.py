"""Per-step index bookkeeping shared by all layers: block-table lookups turned into physical row ids.

Everything is vectorised over tokens (no Python loop over tokens):

* token-granular pools (swa, csa_state, hca_state): slot(p) = table[s, p // tpb] * tpb + p % tpb;
* compressed pools (csa/idx, hca; `rpb = block_size / ratio` rows per block): entry j of sequence s lives
  at row table[s, (j·ratio) // block_size] * rpb + j % rpb;
* window of query p: positions p-W+1 .. p (W = sliding_window);
* compressed entries visible to query p: j < (p+1) // ratio;
* entries emitted in this step: tokens with (p+1) % ratio == 0 and p >= recompute_until[s] emit j = p // ratio,
  pooling the state rows of positions j·ratio - ratio .. j·ratio + ratio - 1 (CSA, overlapping) or
  j·ratio .. j·ratio + ratio - 1 (HCA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from dsv4.runtime.config import CSA, HCA
from dsv4.runtime.model.batch import ForwardBatch

POOLS = {CSA: ("csa", "csa_state"), HCA: ("hca", "hca_state")}  # a compressed kind's entry pool and state pool


def lookup(table: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, tokens_per_block: int,
           rows_per_block: int | None = None) -> torch.Tensor:
    """Physical rows for (seq, pos) pairs of any shape; -1 where pos < 0, beyond the table, or a freed block.

    Token-granular: row = block * tpb + pos % tpb. Compressed pools pass `pos` = j·ratio (native position of
    entry j) and rows_per_block; row = block * rpb + (pos // ratio) % rpb, computed by the caller via `pos`."""
    rpb = tokens_per_block if rows_per_block is None else rows_per_block
    nb = table.shape[1]
    bidx = torch.div(pos, tokens_per_block, rounding_mode="floor")
    ok = (pos >= 0) & (bidx < nb)
    safe = torch.where(ok, bidx, torch.zeros_like(bidx))
    block = table[seq.expand_as(pos) if seq.shape != pos.shape else seq, safe]
    ok = ok & (block >= 0)
    if rows_per_block is None:
        off = pos % tokens_per_block
    else:
        off = torch.div(pos % tokens_per_block, tokens_per_block // rpb, rounding_mode="floor")
    return torch.where(ok, block * rpb + off, torch.full_like(pos, -1))


@dataclass
class Emission:
    token: torch.Tensor        # [E] rows of T that complete a compression group
    entry: torch.Tensor        # [E] entry index j
    state_rows: torch.Tensor   # [E, coff*ratio] state-pool rows of the pooled positions (-1 = before 0)
    dest: torch.Tensor         # [E] row in the compressed pool


@dataclass
class StepContext:
    batch: ForwardBatch
    spec: Any
    cfg: Any
    seq: torch.Tensor
    pos: torch.Tensor
    swa_slot: torch.Tensor
    swa_idx: torch.Tensor
    state_slot: dict[str, torch.Tensor] = field(default_factory=dict)
    visible: dict[str, torch.Tensor] = field(default_factory=dict)
    _emissions: dict[str, Emission] | None = None

    @property
    def emissions(self) -> dict[str, Emission]:
        """Per compressed kind, the tokens of this step that complete a group and what they emit; computed on
        first use (the compiled decode graph computes its own, `decode_emissions`, and never asks)."""
        if self._emissions is None:
            ru = self.batch.recompute_until.long()[self.seq]
            self._emissions = {}
            for kind in self.state_slot:
                r = self.cfg.compress_rates[kind]
                tok = torch.nonzero(completes_group(self.pos, ru, r)).flatten()
                rows = emission_rows(self.batch.block_tables, self.spec, kind, r, self.seq[tok], self.pos[tok])
                self._emissions[kind] = Emission(tok, *rows)
        return self._emissions

    @classmethod
    def build(cls, batch: ForwardBatch, cfg: Any, spec: Any) -> StepContext:
        T = batch.num_tokens
        dev = batch.input_ids.device
        counts = batch.query_start[1:] - batch.query_start[:-1]
        seq = torch.repeat_interleave(torch.arange(batch.num_seqs, device=dev), counts, output_size=T)
        pos = batch.positions.long()
        sp = spec.pools["swa"]
        tables = batch.block_tables
        swa_slot = lookup(tables["swa"], seq, pos, sp.tokens_per_block)
        W = cfg.sliding_window
        wpos = pos[:, None] - (W - 1) + torch.arange(W, device=dev)[None, :]
        swa_idx = lookup(tables["swa"], seq[:, None].expand(T, W), wpos, sp.tokens_per_block)
        ctx = cls(batch, spec, cfg, seq, pos, swa_slot, swa_idx)
        for kind, (comp_pool, state_pool) in POOLS.items():
            if comp_pool not in spec.pools:
                continue
            r = cfg.compress_rates[kind]
            st = spec.pools[state_pool]
            # rows_per_block < tokens_per_block: several positions share a row (the online HCA state: one
            # row per group of hca_ratio positions, `cache/spec.py`)
            ctx.state_slot[kind] = lookup(tables[state_pool], seq, pos, st.tokens_per_block, st.rows_per_block)
            cp = spec.pools[comp_pool]
            # visible entries per query: entry j's row depends on the sequence only, so it is looked up once
            # per sequence ([S, maxvis]) and gathered per query, then cut at the query's own count (a
            # [T, maxvis] table is O(context) per token: three passes over it, not a lookup's dozen)
            nvis = torch.div(pos + 1, r, rounding_mode="floor")
            maxvis = int(nvis.max().item()) if T else 0
            S = batch.num_seqs
            jr = (torch.arange(maxvis, device=dev) * r)[None, :].expand(S, maxvis)
            seq_rows = lookup(tables[comp_pool], torch.arange(S, device=dev)[:, None].expand(S, maxvis), jr,
                              cp.tokens_per_block, cp.rows_per_block)
            rows = seq_rows[seq]
            ctx.visible[kind] = rows.masked_fill_(torch.arange(maxvis, device=dev)[None, :] >= nvis[:, None], -1)
        return ctx


def completes_group(pos: torch.Tensor, recompute_until: torch.Tensor, ratio: int) -> torch.Tensor:
    """Tokens that complete a compression group and emit its entry: (p + 1) % ratio == 0, p >= recompute_until."""
    return ((pos + 1) % ratio == 0) & (pos >= recompute_until)


def emission_rows(tables: dict[str, torch.Tensor], spec: Any, kind: str, ratio: int, seq: torch.Tensor,
                  pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For tokens (seq, pos) that complete a group of `kind`: the entry j = pos // ratio, the state rows it
    pools [E, coff·ratio] (positions j·ratio - ratio .. j·ratio + ratio - 1 for CSA, j·ratio .. for HCA; -1
    before 0) and its row in the compressed pool."""
    comp_pool, state_pool = POOLS[kind]
    st, cp = spec.pools[state_pool], spec.pools[comp_pool]
    coff = 2 if kind == CSA else 1
    j = torch.div(pos, ratio, rounding_mode="floor")
    start = j * ratio - (ratio if coff == 2 else 0)
    gpos = start[:, None] + torch.arange(coff * ratio, device=pos.device)[None, :]
    srows = lookup(tables[state_pool], seq[:, None].expand_as(gpos), gpos, st.tokens_per_block, st.rows_per_block)
    dest = lookup(tables[comp_pool], seq, j * ratio, cp.tokens_per_block, cp.rows_per_block)
    return j, srows, dest


def decode_emissions(ctx: StepContext, kind: str) -> Emission:
    """`ctx.emissions[kind]` with a static shape, for the compiled decode step: every token listed (E = T),
    `dest` -1 where the token completes no group (the graph sends those writes to a trash row)."""
    r = ctx.cfg.compress_rates[kind]
    tables, seq, pos = ctx.batch.block_tables, ctx.seq, ctx.pos
    emit = completes_group(pos, ctx.batch.recompute_until.long()[seq], r)
    j, srows, dest = emission_rows(tables, ctx.spec, kind, r, seq, pos)
    return Emission(torch.arange(pos.shape[0], device=pos.device), j, srows,
                    torch.where(emit, dest, torch.full_like(dest, -1)))
