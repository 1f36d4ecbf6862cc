"""`CompressedPoolManager`: the block tables of the compressed pools (csa, whose ids also address idx, and hca).

One block per logical block (`block_size` native positions). A block is written once, by the request that
computes it; registered blocks are immutable and shared by every prefix hit (reference counts). Room is made
by evicting the least recently used unpinned prefix-tree entries.
"""

from __future__ import annotations

from dsv4.runtime.cache.block_pool import BlockPool
from dsv4.runtime.cache.errors import CacheError
from dsv4.runtime.cache.prefix_tree import Entry, PrefixTree
from dsv4.runtime.cache.spec import CacheSpec, cdiv
from dsv4.runtime.cache.tables import CacheRequest


class CompressedPoolManager:
    def __init__(self, spec: CacheSpec, pools: dict[str, BlockPool], tree: PrefixTree) -> None:
        self.names = tuple(p for p in spec.block_pools if p not in spec.token_pools)
        self.block_size = spec.block_size
        self.pools = pools
        self.tree = tree

    def count_needed(self, req: CacheRequest, n: int, need: dict[str, int]) -> None:
        """Add the blocks each pool must take so that `req` holds positions [0, n)."""
        for p in self.names:
            k = cdiv(n, self.block_size) - len(req.tables[p])
            if k > 0:
                need[p] = k

    def make_room(self, pool: str, k: int) -> bool:
        bp = self.pools[pool]
        while bp.num_free < k:
            if not self.tree.evict_oldest():
                return False
        return True

    def take(self, req: CacheRequest, need: dict[str, int]) -> None:
        for p in self.names:
            if p in need:
                tab, take = req.tables[p], self.pools[p].take
                req.mirror.changed(p, len(tab))
                for _ in range(need[p]):
                    tab.append(take())

    def share(self, req: CacheRequest, e: Entry) -> None:
        """Append a hit entry's blocks to the request's tables (shared: one more reference each)."""
        for p, b in e.comp.items():
            self.pools[p].incref(b)
            req.tables[p].append(b)

    def record(self, req_id: str, req: CacheRequest, prev: int, n: int) -> None:
        """Rows of positions [prev, n) are written: check they were allocated, count the written tokens."""
        B, tables = self.block_size, req.tables
        for p in self.names:
            if len(tables[p]) * B < n:
                raise CacheError(f"commit of {req_id!r}: {n} tokens but only {len(tables[p]) * B} allocated in {p}")
        for p in self.names:
            tab, filled = tables[p], self.pools[p].filled
            for i in range(prev // B, cdiv(n, B)):
                rows = min(B, n - i * B)
                if filled[tab[i]] < rows:
                    filled[tab[i]] = rows
