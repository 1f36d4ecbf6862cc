"""`CacheStats`: the allocator's counters, per pool and for the prefix cache (metrics, benches, tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolStats:
    blocks_total: int
    blocks_used: int
    bytes_allocated: int
    bytes_used: int
    tokens_held: int  # native token positions whose rows are written in used blocks
    occupancy: float  # blocks_used / blocks_total
    evictions: int  # blocks freed by eviction (tombstones included)


@dataclass
class CacheStats:
    pools: dict[str, PoolStats]
    prefix_queries_tokens: int  # prompt tokens looked up in start()
    prefix_hit_tokens: int  # cached_tokens returned by start()
    prefix_recompute_tokens: int  # tokens re-run after hits (cached_tokens - recompute_from)
    swa_checkpoints_kept: int  # entries holding window/state for their boundary
    cached_blocks: int  # registered logical blocks (entries)
    tombstoned_blocks: int  # entries without a checkpoint
    running_requests: int

    @property
    def bytes_allocated(self) -> int:
        return sum(p.bytes_allocated for p in self.pools.values())

    @property
    def bytes_used(self) -> int:
        return sum(p.bytes_used for p in self.pools.values())
