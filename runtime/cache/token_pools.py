"""`TokenPoolManager`: the block tables of the token-granular pools (swa, csa_state, hca_state).

Blocks of `tokens_per_block` positions of the pool. A running request holds only its live window
(`spec.live_range`); rows that leave it are freed at commit, except those a prefix-tree entry keeps as its
*checkpoint* (the window at the entry's end boundary, which lets a later hit continue there without recomputing).
Room is made by dropping the least recently used checkpoints (tombstoning their entries).
"""

from __future__ import annotations

from dsv4.runtime.cache.block_pool import BlockPool
from dsv4.runtime.cache.errors import CacheError
from dsv4.runtime.cache.policies import SwaPolicy
from dsv4.runtime.cache.prefix_tree import Entry, PrefixTree
from dsv4.runtime.cache.spec import CacheSpec, cdiv
from dsv4.runtime.cache.tables import CacheRequest


class TokenPoolManager:
    def __init__(self, spec: CacheSpec, pools: dict[str, BlockPool], tree: PrefixTree, policy: SwaPolicy) -> None:
        self.spec = spec
        self.names = spec.token_pools
        self.tpb = {p: spec.pools[p].tokens_per_block for p in self.names}
        self.pools = pools
        self.tree = tree
        self.policy = policy

    def count_needed(self, req: CacheRequest, n: int, need: dict[str, int]) -> bool:
        """Add the blocks each pool must take so that `req` holds positions [num_computed, n); True when a table
        must grow (with -1 entries at least)."""
        start = req.num_computed
        short = False
        for p in self.names:
            t, tab = self.tpb[p], req.tables[p]
            end = cdiv(n, t)
            short = short or len(tab) < end
            k = 0
            for i in range(start // t, end):
                if i >= len(tab) or tab[i] < 0:
                    k += 1
            if k:
                need[p] = k
        return short

    def make_room(self, pool: str, k: int) -> bool:
        bp = self.pools[pool]
        while bp.num_free < k:  # only checkpoints hold token-pool blocks in the cache
            if not self.tree.tombstone_oldest():
                return False
        return True

    def take(self, req: CacheRequest, n: int, need: dict[str, int]) -> None:
        start = req.num_computed
        for p in self.names:
            t, tab = self.tpb[p], req.tables[p]
            if p in need or len(tab) < cdiv(n, t):
                req.mirror.changed(p, min(start // t, len(tab)))
            tab.extend([-1] * (cdiv(n, t) - len(tab)))
            for k in range(start // t, cdiv(n, t)):
                if tab[k] < 0:
                    tab[k] = self.pools[p].take()

    def continue_from(self, req: CacheRequest, e: Entry, r: int) -> None:
        """Start `req` at position r from entry e's checkpoint: share the blocks of its boundary window."""
        for p in self.names:
            t = self.tpb[p]
            lo, hi = self.spec.live_range(p, r)
            tab = req.tables[p]
            tab.extend([-1] * (cdiv(r, t) - len(tab)))
            for k in range(lo // t, cdiv(hi, t)):
                b = e.ckpt_block(p, k)
                self.pools[p].incref(b)
                tab[k] = b

    def record(self, req_id: str, req: CacheRequest, prev: int, n: int) -> None:
        """Rows of positions [prev, n) are written: count them per block (each must be allocated)."""
        for p in self.names:
            t, tab, filled = self.tpb[p], req.tables[p], self.pools[p].filled
            for k in range(prev // t, cdiv(n, t)):
                if k >= len(tab) or tab[k] < 0:
                    raise CacheError(f"commit of {req_id!r}: {p} block for positions {k * t}.. not allocated")
                filled[tab[k]] += min(n, (k + 1) * t) - max(prev, k * t)

    def free_out_of_window(self, req: CacheRequest, n: int, registering: bool) -> None:
        """Release the blocks below each pool's live window after n computed tokens (while `registering`, the
        current logical block's rows stay where the policy's entries keep all of them)."""
        B = self.spec.block_size
        for p in self.names:
            t, tab = self.tpb[p], req.tables[p]
            lo = self.spec.live_range(p, n)[0]
            if registering and self.policy.keeps_block_rows(p):
                lo = min(lo, (n // B) * B)
            first, end = req.freed_upto[p], min(lo // t, len(tab))
            if first < end:
                req.mirror.changed(p, first)
                bp = self.pools[p]
                for k in range(first, end):
                    if tab[k] >= 0:
                        bp.decref(tab[k])
                        tab[k] = -1
            if lo // t > first:
                req.freed_upto[p] = lo // t

    def checkpoint(self, req: CacheRequest, e: Entry) -> dict[str, list[int]] | None:
        """The blocks (as [k, id, ...] per pool) that hold the window at e's end boundary in `req`'s tables, plus
        the block's own rows where the policy keeps them; None when the request no longer holds that window
        (e.g. it started after it, at its recompute start)."""
        B = self.spec.block_size
        c = (e.index + 1) * B
        ck: dict[str, list[int]] = {}
        for p in self.names:
            t, tab = self.tpb[p], req.tables[p]
            lo, hi = self.spec.live_range(p, c)
            ks = set(range(lo // t, cdiv(hi, t))) if hi > lo else set()
            if any(k >= len(tab) or tab[k] < 0 for k in ks):
                return None
            if self.policy.keeps_block_rows(p):
                ks |= {k for k in range(e.index * B // t, c // t) if k < len(tab) and tab[k] >= 0}
            pairs: list[int] = []
            for k in sorted(ks):
                pairs += [k, tab[k]]
            ck[p] = pairs
        return ck
