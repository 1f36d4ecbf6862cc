"""The model runner: turns the scheduler's choice into one `ForwardBatch` and calls the model.

For scheduled sequence s computing positions [a_s, a_s + n_s):
    input_ids    = concat_s tokens_s[a_s : a_s + n_s]        positions = concat_s range(a_s, a_s + n_s)
    query_start  = [0, n_0, n_0 + n_1, ...]
    block_tables = per pool, the CacheManager's table of each sequence, padded with -1 to the widest
    recompute_until[s] = the sequence's prefix-hit length (positions below it only rebuild swa/state rows)
    logits_indices = the last row of each sequence that samples, and every row of a chunk whose prompt
                     logprobs were asked for
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from dsv4.runtime.engine.scheduler import ScheduledSeq


@dataclass
class StepLogits:
    logits: torch.Tensor  # [N, vocab] fp32
    rows: list[tuple[int, int]]  # per scheduled sequence: [first, last) rows of `logits` (empty when none)


class ModelRunner:
    def __init__(self, model: Any, pools: Any, cache: Any, device: torch.device | str = "cpu"):
        self.model = model
        self.pools = pools
        self.cache = cache
        self.device = torch.device(device)
        self.table_pools = list(cache.spec.block_pools)

    def build_batch(self, scheduled: list[ScheduledSeq]) -> tuple[Any, list[tuple[int, int]]]:
        from dsv4.runtime.model.batch import ForwardBatch

        ids: list[int] = []
        pos: list[int] = []
        starts = [0]
        li: list[int] = []
        rows: list[tuple[int, int]] = []
        ru: list[int] = []
        for sch in scheduled:
            seq, a, n = sch.seq, sch.start, sch.num_tokens
            ids += seq.tokens[a:a + n]
            pos += range(a, a + n)
            starts.append(len(ids))
            first = len(li)
            if sch.prompt_logprobs:
                li += range(starts[-2], starts[-1])
            elif sch.sample:
                li.append(starts[-1] - 1)
            rows.append((first, len(li)))
            ru.append(seq.recompute_until)
        dev = self.device
        tables = self.cache.batch_block_tables([sch.seq.seq_id for sch in scheduled], self.table_pools)
        padded = {p: torch.from_numpy(t).to(dev) for p, t in tables.items()}
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            query_start=torch.tensor(starts, dtype=torch.long, device=dev),
            block_tables=padded,
            recompute_until=torch.tensor(ru, dtype=torch.long, device=dev),
            logits_indices=torch.tensor(li, dtype=torch.long, device=dev),
        )
        return batch, rows

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> StepLogits:
        batch, rows = self.build_batch(scheduled)
        logits = self.model.forward(batch, self.pools)
        return StepLogits(logits.float().cpu(), rows)
