"""SWA storage policies: which registered blocks keep a *checkpoint* (the token-pool blocks holding the live
window and compressor state at the block's end boundary), and what that costs per sequence.

- `full`: every block keeps a checkpoint plus all swa rows of its own positions;
- `checkpoint`: blocks at every K-th boundary keep one (K = `checkpoint_every`, 0 = none), plus a moving *tail
  checkpoint* at the newest boundary each request crossed (the one the next turn of a conversation hits);
- `recompute`: none; a hit re-runs the tokens needed to rebuild the window.

Adding a policy = one class here and one entry in `_POLICIES`; the allocator and the sizing read only this
interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from dsv4.runtime.cache.spec import CacheConfigError


class SwaPolicy(ABC):
    name: ClassVar[str]
    moves_tail_checkpoint: ClassVar[bool] = False  # keep a checkpoint at each request's newest boundary

    @classmethod
    def build(cls, checkpoint_every: int) -> SwaPolicy:
        return cls()

    def keeps_block_rows(self, pool: str) -> bool:
        """Whether an entry keeps every row of its block in `pool` (so a running request keeps its current
        block's rows until the block is registered)."""
        return False

    @abstractmethod
    def grid_checkpoint(self, block_index: int) -> bool:
        """Whether logical block `block_index` keeps a permanent checkpoint at its end boundary."""

    @abstractmethod
    def kept_blocks(self, pool: str, boundary_blocks: int, block_blocks: int, full_blocks: int) -> int:
        """Blocks of token pool `pool` the cache keeps for one sequence with `full_blocks` complete logical blocks,
        when a boundary checkpoint holds `boundary_blocks` of them and one logical block spans `block_blocks`."""


class FullPolicy(SwaPolicy):
    name = "full"

    def keeps_block_rows(self, pool: str) -> bool:
        return pool == "swa"

    def grid_checkpoint(self, block_index: int) -> bool:
        return True

    def kept_blocks(self, pool: str, boundary_blocks: int, block_blocks: int, full_blocks: int) -> int:
        per = max(boundary_blocks, block_blocks) if self.keeps_block_rows(pool) else boundary_blocks
        return per * full_blocks


class CheckpointPolicy(SwaPolicy):
    name = "checkpoint"
    moves_tail_checkpoint = True

    def __init__(self, every: int) -> None:
        self.every = every

    @classmethod
    def build(cls, checkpoint_every: int) -> SwaPolicy:
        return cls(checkpoint_every)

    def grid_checkpoint(self, block_index: int) -> bool:
        return self.every > 0 and (block_index + 1) % self.every == 0

    def kept_blocks(self, pool: str, boundary_blocks: int, block_blocks: int, full_blocks: int) -> int:
        grid = full_blocks // self.every if self.every else 0
        return boundary_blocks * (grid + (1 if full_blocks else 0))


class RecomputePolicy(SwaPolicy):
    name = "recompute"

    def grid_checkpoint(self, block_index: int) -> bool:
        return False

    def kept_blocks(self, pool: str, boundary_blocks: int, block_blocks: int, full_blocks: int) -> int:
        return 0


_POLICIES: dict[str, type[SwaPolicy]] = {c.name: c for c in (FullPolicy, CheckpointPolicy, RecomputePolicy)}
POLICIES = tuple(_POLICIES)


def make_policy(name: str, checkpoint_every: int = 4) -> SwaPolicy:
    """The policy called `name`; `checkpoint_every` is the grid of the `checkpoint` policy."""
    if name not in _POLICIES:
        raise CacheConfigError(f"policy must be one of {POLICIES}, got {name!r}")
    if checkpoint_every < 0:
        raise CacheConfigError(f"checkpoint_every must be >= 0 (0 = tail checkpoints only), got {checkpoint_every}")
    return _POLICIES[name].build(checkpoint_every)
