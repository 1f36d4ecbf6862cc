"""`CacheManager`: the pure-Python (metadata-only) allocator of the paged multi-pool hybrid cache.

No tensors: the engine gives the block tables it returns to the model, the operator's planner and
`dsv4 bench capacity` run the very same code (`sizing.py`) to size pools and to measure capacity.

This class coordinates one manager per cache kind over a prefix tree:

- `CompressedPoolManager` (csa, whose ids also address idx, and hca): one block per logical block;
- `TokenPoolManager` (swa, csa_state, hca_state): the live window, freed as it moves, kept by checkpoints;
- `PrefixTree`: registered logical blocks, their checkpoints and the two LRU lists (`prefix_tree.py`);
- `SwaPolicy`: which entries keep a checkpoint (`policies.py`);
- `CacheRequest`: one request's tables and progress (`tables.py`).

A hit of `m` blocks (`c = m*B` tokens of compressed history) continues from the deepest checkpoint
`j*B <= c`, or from scratch; the tokens `[r, c)` are re-run with `recompute_until = c`, where
`r = max(j*B, c - L*max(W, 2*csa_ratio))`. The second term is the *exact* rebuild span: a token's
layer-l row depends on the layer-(l-1) rows of the W tokens before it, so rebuilding the last W
rows of the top layer needs about `L*(W-1)` tokens re-run ("window x layers", docs/cache.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsv4.runtime.cache.block_pool import BlockPool
from dsv4.runtime.cache.compressed_pools import CompressedPoolManager
from dsv4.runtime.cache.errors import CacheError
from dsv4.runtime.cache.policies import make_policy
from dsv4.runtime.cache.pools import id_space
from dsv4.runtime.cache.prefix_tree import PrefixHit, PrefixTree
from dsv4.runtime.cache.sizing import CacheSizing
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.cache.stats import CacheStats, PoolStats
from dsv4.runtime.cache.tables import CacheRequest, batch_arrays
from dsv4.runtime.cache.token_pools import TokenPoolManager

if TYPE_CHECKING:
    import numpy as np

class CacheManager:
    def __init__(self, spec: CacheSpec, num_blocks: dict[str, int], policy: str = "full",
                 checkpoint_every: int = 4, enable_prefix_caching: bool = True) -> None:
        self.sizing = CacheSizing(spec, dict(num_blocks), policy, checkpoint_every)
        self.spec = spec
        self.policy = policy
        self.checkpoint_every = checkpoint_every
        self.enable_prefix_caching = enable_prefix_caching
        self.num_blocks = self.sizing.num_blocks
        self.pools = {p: BlockPool(n) for p, n in self.num_blocks.items()}
        self.tree = PrefixTree(spec.block_size, self.pools)
        self._policy = make_policy(policy, checkpoint_every)
        self._compressed = CompressedPoolManager(spec, self.pools, self.tree)
        self._token = TokenPoolManager(spec, self.pools, self.tree, self._policy)
        self._manager_of = {p: m for m in (self._compressed, self._token) for p in m.names}
        self._max_tokens = self.sizing.max_request_tokens()  # fixed by the block counts
        self._reqs: dict[str, CacheRequest] = {}
        self._queries = self._hits = self._recompute = 0
        self.recompute_span = spec.num_layers * max(spec.window, 2 * spec.csa_ratio)

    # ---- sizing (sizing.py) --------------------------------------------------------------------------
    @classmethod
    def from_budget(cls, spec: CacheSpec, budget_bytes: int, *, expected_context: int, policy: str = "full",
                    split_override: dict[str, float] | None = None, checkpoint_every: int = 4,
                    enable_prefix_caching: bool = True, prefill_chunk: int | None = None,
                    max_running: int | None = None) -> CacheManager:
        """A manager with the pools `CacheSizing.from_budget` sizes for this budget."""
        sizing = CacheSizing.from_budget(spec, budget_bytes, expected_context=expected_context, policy=policy,
                                         split_override=split_override, checkpoint_every=checkpoint_every,
                                         prefill_chunk=prefill_chunk, max_running=max_running)
        return cls(spec, sizing.num_blocks, policy, checkpoint_every, enable_prefix_caching)

    def max_request_tokens(self) -> int:
        """Largest context one request can ever hold (0 when a token pool cannot hold even one window)."""
        return self._max_tokens

    def capacity_report(self, context: int | None = None) -> dict:
        return self.sizing.capacity_report(context)

    def format_capacity_report(self, context: int | None = None) -> str:
        return self.sizing.format_capacity_report(context)

    # ---- request lifecycle ---------------------------------------------------------------------------
    def request(self, req_id: str) -> CacheRequest:
        """The allocator's record of a started request (its `num_computed` is the one source of progress)."""
        try:
            return self._reqs[req_id]
        except KeyError:
            raise CacheError(f"unknown request {req_id!r}") from None

    def _match(self, tokens: list[int], use_prefix: bool) -> tuple[list[int], int]:
        if not (self.enable_prefix_caching and use_prefix):
            return [], 0
        return self.tree.match(tokens)

    def _hit_for(self, chain: list[int], j: int) -> PrefixHit:
        c = len(chain) * self.spec.block_size
        if c == 0:
            return PrefixHit(0, 0)
        return PrefixHit(c, max(j * self.spec.block_size, c - self.recompute_span, 0))

    def peek(self, token_ids: list[int]) -> PrefixHit:
        """The hit `start(token_ids)` would return now; touches nothing."""
        return self._hit_for(*self._match(list(token_ids), True))

    def start(self, req_id: str, token_ids: list[int], use_prefix: bool = True) -> PrefixHit:
        """Register a request and look its prefix up (`use_prefix=False`: no lookup, e.g. when the logits of
        every prompt row are needed; its blocks are still registered for others)."""
        if req_id in self._reqs:
            raise CacheError(f"request {req_id!r} already started")
        tokens = list(token_ids)
        chain, j = self._match(tokens, use_prefix)
        hit = self._hit_for(chain, j)
        req = CacheRequest(tokens, {p: [] for p in self.num_blocks}, hit, num_computed=hit.recompute_from,
                           freed_upto=dict.fromkeys(self.spec.token_pools, 0))
        for h in chain:
            e = self.tree.entries[h]
            self.tree.pin(e)
            self._compressed.share(req, e)
        req.chain = list(chain)
        r = hit.recompute_from
        if chain and j * self.spec.block_size == r and r > 0:  # continue from the checkpoint at r: share it
            self._token.continue_from(req, self.tree.entries[chain[j - 1]], r)
        self.tree.touch(chain)
        self._queries += len(tokens)
        self._hits += hit.cached_tokens
        self._recompute += hit.cached_tokens - hit.recompute_from
        self._reqs[req_id] = req
        return hit

    def allocate(self, req_id: str, num_tokens_total: int) -> bool:
        """Blocks for positions up to `num_tokens_total`, all or nothing; evicts unreferenced cache first.
        False = no room even after eviction."""
        req = self.request(req_id)
        n = int(num_tokens_total)
        if n > self._max_tokens:
            return False
        need: dict[str, int] = {}  # pool -> blocks to take (pools that need none are left out)
        self._compressed.count_needed(req, n, need)
        grows = self._token.count_needed(req, n, need)
        if not need and not grows:  # the common decode step: every row already has a block
            return True
        for p, k in need.items():
            if not self._manager_of[p].make_room(p, k):
                return False
        if any(self.pools[p].num_free < k for p, k in need.items()):
            return False
        self._compressed.take(req, need)
        self._token.take(req, n, need)
        return True

    def block_tables(self, req_id: str) -> dict[str, list[int]]:
        return {p: list(t) for p, t in self.request(req_id).tables.items()}

    def batch_block_tables(self, req_ids: list[str], pools: list[str]) -> dict[str, np.ndarray]:
        """Per pool, the requests' block tables as one int64 numpy array [len(req_ids), widest (>= 1)], rows
        padded with -1 (`tables.batch_arrays`)."""
        return batch_arrays([self.request(r) for r in req_ids], pools)

    def commit(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        """Record that the first `num_computed` tokens have rows in the pools. `token_ids` are the request's
        tokens so far: those given to `start` / the last commit, possibly extended (a request's tokens only
        grow). Frees rows that left the window and registers completed blocks for prefix reuse.
        Called once per running request per step: plain loops over the few blocks [prev, n) touches."""
        req = self.request(req_id)
        n = int(num_computed)
        prev = req.num_computed
        if n < prev or n > len(token_ids):
            raise CacheError(f"commit of {req_id!r}: num_computed {n} must be in [{prev}, "
                             f"len(token_ids)={len(token_ids)}]")
        self._compressed.record(req_id, req, prev, n)
        # a sequence's tokens only grow: copy what is new since the last commit (O(new), not O(context))
        if len(req.tokens) < len(token_ids):
            req.tokens.extend(token_ids[len(req.tokens):])
        self._token.record(req_id, req, prev, n)
        if self.enable_prefix_caching:
            self._register(req, prev, n)
        self._token.free_out_of_window(req, n, registering=self.enable_prefix_caching)
        req.num_computed = n

    def _register(self, req: CacheRequest, prev: int, n: int) -> None:
        """Register the blocks [prev, n) completed and keep the checkpoints the policy asks for."""
        B, tree, policy = self.spec.block_size, self.tree, self._policy
        while len(req.chain) < n // B:  # new entries for newly completed blocks (contiguous chain)
            i = len(req.chain)
            e = tree.register(req.tokens, i, req.chain[-1] if req.chain else None, req.tables, self._compressed.names)
            tree.pin(e)
            req.chain.append(e.key)
        last = None
        for i in range(prev // B, n // B):  # checkpoints at boundaries crossed by this commit
            if (i + 1) * B <= prev:
                continue
            e = tree.entries[req.chain[i]]
            if policy.grid_checkpoint(i):
                if e.ckpt is None and (ck := self._token.checkpoint(req, e)) is not None:
                    tree.keep_checkpoint(e, ck)
                if e.ckpt is not None:
                    e.permanent = True
            last = e
        if policy.moves_tail_checkpoint and last is not None:
            if req.tail_ckpt is not None and req.tail_ckpt != last.key:
                old = tree.entries.get(req.tail_ckpt)
                if old is not None and old.ckpt is not None and not old.permanent:
                    tree.tombstone(old, evicting=False)
            if last.ckpt is None and (ck := self._token.checkpoint(req, last)) is not None:
                tree.keep_checkpoint(last, ck)
            req.tail_ckpt = last.key

    def free(self, req_id: str) -> None:
        """Release a finished or preempted request; its registered blocks stay cached (LRU)."""
        req = self._reqs.pop(req_id, None)
        if req is None:
            raise CacheError(f"unknown request {req_id!r}")
        for p, tab in req.tables.items():
            for b in tab:
                if b >= 0:
                    self.pools[p].decref(b)
        self.tree.unpin(req.chain)

    # ---- accounting ----------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        out: dict[str, PoolStats] = {}
        for name, ps in self.spec.pools.items():
            bp = self.pools[id_space(name)]
            used = bp.n - bp.num_free
            per = ps.bytes_per_block
            out[name] = PoolStats(bp.n, used, bp.n * per, used * per, sum(bp.filled),
                                  used / bp.n if bp.n else 0.0, bp.evictions)
        entries, ck = len(self.tree.entries), self.tree.num_checkpoints
        return CacheStats(out, self._queries, self._hits, self._recompute, ck, entries, entries - ck, len(self._reqs))

    def clear_cached(self) -> None:
        """Drop every checkpoint and every unpinned cached block (like vLLM's reset_prefix_cache)."""
        self.tree.clear()

    def check_invariants(self) -> None:
        """Recount every reference from scratch and compare (tests; O(blocks))."""
        want = {p: [0] * bp.n for p, bp in self.pools.items()}
        for req in self._reqs.values():
            for p, tab in req.tables.items():
                for b in tab:
                    if b >= 0:
                        want[p][b] += 1
            req.check_mirror()
        self.tree.count_refs(want, [req.chain for req in self._reqs.values()])
        for p, bp in self.pools.items():
            bp.check(p, want[p])
