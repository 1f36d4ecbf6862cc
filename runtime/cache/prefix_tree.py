"""`PrefixTree`: the registered logical blocks (entries) of the prefix cache and their two LRU lists.

Every full logical block a request computes is registered under a chained hash
`h_i = hash((h_{i-1}, tokens[i*B:(i+1)*B]))`. An entry owns its compressed blocks (immutable, shared by
reference count) and optionally a *checkpoint*: references to the token-pool blocks that hold the live window
at its end boundary `c = (i+1)*B` (`spec.live_range`), which is exactly what the model needs to continue at `c`.

Eviction: unpinned entries sit on a compressed LRU (evicting one frees its compressed blocks, its checkpoint
and its whole subtree, which is unreachable afterwards); entries with a checkpoint also sit on a state LRU,
whose eviction *tombstones* the entry: the checkpoint goes, the compressed history stays. A request pins the
whole chain it uses, so pinned entries are never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from dsv4.runtime.cache.block_pool import BlockPool
from dsv4.runtime.cache.errors import CacheError


@dataclass(frozen=True)
class PrefixHit:
    cached_tokens: int  # tokens [0, cached_tokens) have compressed entries; no compressed writes
    recompute_from: int  # tokens [recompute_from, cached_tokens) must be re-run (recompute_until = cached_tokens)


@dataclass(slots=True)
class Entry:
    key: int
    index: int  # logical block index
    parent: int | None
    comp: dict[str, int]  # compressed pool -> block id
    ckpt: dict[str, list[int]] | None = None  # token pool -> [small block k, block id, ...] held for the boundary
    permanent: bool = False  # checkpoint belongs to the policy grid (not a moving tail checkpoint)
    pins: int = 0
    children: set[int] = field(default_factory=set)

    def ckpt_block(self, pool: str, k: int) -> int:
        """Block id of small block k of `pool` in this entry's checkpoint."""
        assert self.ckpt is not None
        for kk, b in zip(self.ckpt[pool][0::2], self.ckpt[pool][1::2], strict=True):
            if kk == k:
                return b
        raise CacheError(f"checkpoint of block {self.index} lacks {pool} small block {k}")


def chain_hash(parent: int | None, tokens: list[int], i: int, block_size: int) -> int:
    return hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))


class PrefixTree:
    def __init__(self, block_size: int, pools: dict[str, BlockPool]) -> None:
        self.block_size = block_size
        self.pools = pools
        self.entries: dict[int, Entry] = {}
        self.comp_lru: OrderedDict[int, None] = OrderedDict()  # unpinned entries, oldest first
        self.state_lru: OrderedDict[int, None] = OrderedDict()  # entries with a checkpoint, oldest first

    # ---- lookup ------------------------------------------------------------------------------------
    def match(self, tokens: list[int]) -> tuple[list[int], int]:
        """The registered chain of `tokens` (never its last token) and the deepest checkpointed block count j."""
        chain: list[int] = []
        h: int | None = None
        j = 0
        for i in range((len(tokens) - 1) // self.block_size):
            h = chain_hash(h, tokens, i, self.block_size)
            e = self.entries.get(h)
            if e is None:
                break
            chain.append(h)
            if e.ckpt is not None:
                j = i + 1
        return chain, j

    # ---- registration and pins ---------------------------------------------------------------------
    def register(self, tokens: list[int], i: int, parent: int | None, tables: dict[str, list[int]],
                 comp_pools: tuple[str, ...]) -> Entry:
        """The entry of logical block i after `parent`; a new one takes a reference to the request's compressed
        blocks of block i."""
        h = chain_hash(parent, tokens, i, self.block_size)
        e = self.entries.get(h)
        if e is None:
            e = Entry(h, i, parent, {p: tables[p][i] for p in comp_pools})
            for p, b in e.comp.items():
                self.pools[p].incref(b)
            self.entries[h] = e
            if parent is not None:
                self.entries[parent].children.add(h)
        return e

    def pin(self, e: Entry) -> None:
        e.pins += 1
        self.comp_lru.pop(e.key, None)

    def unpin(self, chain: list[int]) -> None:
        for h in reversed(chain):
            e = self.entries[h]
            e.pins -= 1
            if e.pins == 0:
                self.comp_lru[h] = None
        self.touch(chain)

    def touch(self, chain: list[int]) -> None:
        """Most recent = first block of the chain: tails are evicted before the prefixes they hang on."""
        for h in reversed(chain):
            if h in self.comp_lru:
                self.comp_lru.move_to_end(h)
            if h in self.state_lru:
                self.state_lru.move_to_end(h)

    def keep_checkpoint(self, e: Entry, ck: dict[str, list[int]]) -> None:
        """Give `e` the checkpoint `ck` (a reference to each of its blocks)."""
        for p, pairs in ck.items():
            for b in pairs[1::2]:
                self.pools[p].incref(b)
        e.ckpt = ck
        self.state_lru[e.key] = None
        self.state_lru.move_to_end(e.key)

    # ---- eviction ------------------------------------------------------------------------------------
    def tombstone(self, e: Entry, evicting: bool = True) -> None:
        """Drop the entry's checkpoint; its compressed history stays."""
        if e.ckpt is None:
            return
        for p, pairs in e.ckpt.items():
            for b in pairs[1::2]:
                self.pools[p].decref(b, evicting)
        e.ckpt = None
        e.permanent = False
        self.state_lru.pop(e.key, None)

    def evict(self, e: Entry) -> None:
        """Drop an unpinned entry and its subtree (unreachable without it)."""
        stack, order = [e], []
        while stack:
            x = stack.pop()
            order.append(x)
            stack.extend(self.entries[c] for c in x.children)
        for x in reversed(order):
            if x.pins:
                raise CacheError(f"internal: evicting pinned block {x.index}")
            self.tombstone(x)
            for p, b in x.comp.items():
                self.pools[p].decref(b, evicting=True)
            self.comp_lru.pop(x.key, None)
            del self.entries[x.key]
            if x.parent is not None and x.parent in self.entries:
                self.entries[x.parent].children.discard(x.key)

    def tombstone_oldest(self) -> bool:
        """Free the least recently used checkpoint; False when none is left."""
        if not self.state_lru:
            return False
        self.tombstone(self.entries[next(iter(self.state_lru))])
        return True

    def evict_oldest(self) -> bool:
        """Evict the least recently used unpinned entry (and its subtree); False when none is left."""
        if not self.comp_lru:
            return False
        self.evict(self.entries[next(iter(self.comp_lru))])
        return True

    def clear(self) -> None:
        """Drop every checkpoint and every unpinned entry (like vLLM's reset_prefix_cache)."""
        for h in list(self.state_lru):
            self.tombstone(self.entries[h], evicting=False)
        while self.evict_oldest():
            pass

    # ---- accounting ----------------------------------------------------------------------------------
    @property
    def num_checkpoints(self) -> int:
        return sum(1 for e in self.entries.values() if e.ckpt is not None)

    def count_refs(self, want: dict[str, list[int]], chains: list[list[int]]) -> None:
        """Add the tree's block references to `want` and check pins, LRU membership and links against the
        chains the running requests pin (tests; O(entries))."""
        pins = dict.fromkeys(self.entries, 0)
        for chain in chains:
            for h in chain:
                if h not in self.entries:
                    raise CacheError("request pins an evicted block")
                pins[h] += 1
        for h, e in self.entries.items():
            for p, b in e.comp.items():
                want[p][b] += 1
            for p, pairs in (e.ckpt or {}).items():
                for b in pairs[1::2]:
                    want[p][b] += 1
            if e.pins != pins[h]:
                raise CacheError(f"entry {e.index}: pins {e.pins} != {pins[h]}")
            if (e.pins == 0) != (h in self.comp_lru):
                raise CacheError(f"entry {e.index}: compressed-LRU membership wrong")
            if (e.ckpt is not None) != (h in self.state_lru):
                raise CacheError(f"entry {e.index}: state-LRU membership wrong")
            if e.parent is not None and (e.parent not in self.entries or h not in self.entries[e.parent].children):
                raise CacheError(f"entry {e.index}: parent link broken")
