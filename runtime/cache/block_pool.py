"""`BlockPool`: the free list, reference counts and written-token counts of one block-id space."""

from __future__ import annotations

from collections import deque

from dsv4.runtime.cache.errors import CacheError


class BlockPool:
    """Lazy: ids never handed out are not materialised (`fresh` = the lowest never-used id), so sizing a pool of
    millions of blocks costs nothing (the planner builds many candidate managers). The take order equals an
    eager FIFO free list that starts as `0..n-1`: never-used ids first, in order, then released ids in the
    order they were released. `ref` / `filled` hold entries for ids `< fresh` only (all others are 0).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.fresh = 0
        self.released: deque[int] = deque()
        self.ref: list[int] = []
        self.filled: list[int] = []
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.released) + self.n - self.fresh

    def free_ids(self) -> list[int]:
        """Every free id, in take order (tests; O(n))."""
        return list(range(self.fresh, self.n)) + list(self.released)

    def take(self) -> int:
        if self.fresh < self.n:
            b = self.fresh
            self.fresh += 1
            self.ref.append(1)
            self.filled.append(0)
            return b
        b = self.released.popleft()  # IndexError on an empty pool, like an empty deque
        self.ref[b] = 1
        self.filled[b] = 0
        return b

    def incref(self, b: int) -> None:
        self.ref[b] += 1

    def decref(self, b: int, evicting: bool = False) -> None:
        self.ref[b] -= 1
        if self.ref[b] < 0:
            raise CacheError(f"block {b} released more often than taken")
        if self.ref[b] == 0:
            self.filled[b] = 0
            self.released.append(b)
            if evicting:
                self.evictions += 1

    def check(self, name: str, want: list[int]) -> None:
        """Compare the reference counts with `want` (recounted from scratch) and the free list with the zeros."""
        ref = self.ref + [0] * (self.n - self.fresh)
        if ref != want:
            bad = [b for b in range(self.n) if ref[b] != want[b]][:5]
            raise CacheError(f"{name}: refcounts differ at blocks {bad}")
        free = self.free_ids()
        if len(set(free)) != len(free) or set(free) != {b for b in range(self.n) if ref[b] == 0}:
            raise CacheError(f"{name}: free list does not match zero refcounts")
