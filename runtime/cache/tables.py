"""Per-request state of the allocator: `CacheRequest` (tokens, block tables, pinned prefix chain, progress) and
`TableMirror`, the numpy copy of its block tables that the model runner reads (`batch_arrays`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsv4.runtime.cache.errors import CacheError
from dsv4.runtime.cache.prefix_tree import PrefixHit

if TYPE_CHECKING:
    import numpy as np


@dataclass(slots=True)
class TableMirror:
    """int64 numpy copies of a request's block tables: `views[p]` is current unless p is in `dirty`, which holds
    the first entry written (or appended) since the copy was last read. Every write to a table goes through
    `changed`, so a decode step copies O(1) entries per table instead of O(context)."""

    buffers: dict[str, np.ndarray] = field(default_factory=dict)  # pool -> buffer (capacity >= table length)
    views: dict[str, np.ndarray] = field(default_factory=dict)  # pool -> buffers[pool][:len(table)]
    dirty: dict[str, int] = field(default_factory=dict)

    def changed(self, pool: str, first: int) -> None:
        """Entries >= first of the pool's table are about to change (or be appended)."""
        if first < self.dirty.get(pool, first + 1):
            self.dirty[pool] = first

    def current(self, pool: str, table: list[int]) -> np.ndarray:
        """`table` as a numpy view, brought up to date from the first dirty entry."""
        v = self.views.get(pool)
        if v is not None and pool not in self.dirty:
            return v
        n = len(table)
        m = self.buffers.get(pool)
        first = self.dirty.pop(pool, 0)
        if m is None:
            first = 0
        if m is None or len(m) < n:
            import numpy as np

            grown = np.empty(max(n, 16, 0 if m is None else 2 * len(m)), dtype=np.int64)
            if m is not None:
                grown[:first] = m[:first]  # entries below `first` are current
            m = self.buffers[pool] = grown
        if first < n:
            m[first:n] = table[first:]
        v = self.views[pool] = m[:n]
        return v


@dataclass(slots=True)
class CacheRequest:
    """What the allocator holds for one running request. `num_computed` (tokens whose rows are in the pools)
    is owned here: the engine's `Sequence` reads it through this record."""

    tokens: list[int]
    tables: dict[str, list[int]]  # block-table pool -> block ids, -1 = freed / not yet needed
    hit: PrefixHit = PrefixHit(0, 0)
    num_computed: int = 0
    chain: list[int] = field(default_factory=list)  # prefix-tree entries pinned, logical blocks 0..len-1
    freed_upto: dict[str, int] = field(default_factory=dict)  # token pool -> first small block not yet freed
    tail_ckpt: int | None = None  # entry holding this request's moving tail checkpoint
    mirror: TableMirror = field(default_factory=TableMirror)

    def check_mirror(self) -> None:
        for p, tab in self.tables.items():
            if self.mirror.current(p, tab).tolist() != tab:
                raise CacheError(f"the numpy copy of a {p} block table missed a write (a `changed` call)")


def batch_arrays(reqs: list[CacheRequest], pools: list[str]) -> dict[str, np.ndarray]:
    """Per pool, the requests' block tables as one int64 array [len(reqs), widest (>= 1)], rows padded with -1.
    Built from the mirrors, so a decode step costs O(batch x widest) memcpy, not a Python list -> tensor
    conversion of every entry (the token-pool tables grow by one entry per 16 tokens of context)."""
    import numpy as np

    out = {}
    for p in pools:
        rows = [req.mirror.current(p, req.tables.get(p, [])) for req in reqs]
        widths = {len(r) for r in rows}
        if len(widths) == 1 and 0 not in widths:  # the common decode batch: one memcpy of all rows
            out[p] = np.concatenate(rows).reshape(len(rows), -1)
            continue
        table = np.full((len(rows), max(1, *widths)), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, :len(r)] = r
        out[p] = table
    return out
