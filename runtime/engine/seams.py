"""The engine's typed seams to the layers below it that come in more than one shape: the model (the
in-process `DeepseekV4Model`, or the TP group's `GroupModel`) and the tokenizer (anything that decodes).
The cache (`CacheManager`) and the pools (`KVPools`) are concrete types."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from dsv4.runtime.model.batch import ForwardBatch
    from dsv4.runtime.model.kv_pools import KVPools


class ForwardModel(Protocol):
    def forward(self, batch: ForwardBatch, pools: KVPools) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] of one step; writes the step's rows into `pools`."""
        ...


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...
