"""`CacheManager`: the pure-Python (metadata-only) allocator of the paged multi-pool hybrid cache.

No tensors: the engine gives the block tables it returns to the model, the operator's planner and
`dsv4 bench capacity` run the very same code to size pools and to measure capacity.

Pools with their own block-id space: `swa`, `csa` (its ids also address `idx`), `hca`, `csa_state`,
`hca_state` (see `spec.py`). Compressed pools (csa/idx, hca) are indexed by *logical block*
(`block_size` native tokens); token-granular pools (swa, states) by *small block* (`tokens_per_block`
tokens of the pool).

Reuse. Every full logical block a request computes is registered under a chained hash
`h_i = hash((h_{i-1}, tokens[i*B:(i+1)*B]))`. A registered block (an *entry*) owns its compressed
blocks (immutable, shared by reference count) and optionally a *checkpoint*: references to the
token-pool blocks that hold the live window at its end boundary `c = (i+1)*B` (`spec.live_range`),
which is exactly what the model needs to continue at `c`. SWA storage policies:

- `full`: every entry keeps a checkpoint plus all swa blocks of its own positions;
- `checkpoint`: entries at every K-th boundary keep a checkpoint, plus a moving *tail checkpoint*
  at the newest boundary each request crossed (the one the next turn of a conversation hits);
- `recompute`: no checkpoints; a hit re-runs the tokens needed to rebuild the window.

A hit of `m` blocks (`c = m*B` tokens of compressed history) continues from the deepest checkpoint
`j*B <= c`, or from scratch; the tokens `[r, c)` are re-run with `recompute_until = c`, where
`r = max(j*B, c - L*max(W, 2*csa_ratio))`. The second term is the *exact* rebuild span: a token's
layer-l row depends on the layer-(l-1) rows of the W tokens before it, so rebuilding the last W
rows of the top layer needs about `L*(W-1)` tokens re-run (docs/cache.md, "Reuse, policies, eviction").

Eviction: unpinned entries sit on a compressed LRU (evicting one frees its compressed blocks, its
checkpoint and its whole subtree, which is unreachable afterwards); entries with a checkpoint also
sit on a state LRU, whose eviction *tombstones* the entry: the checkpoint goes, the compressed
history stays. A request pins the whole chain it uses, so pinned entries are never evicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from dsv4.runtime.cache.spec import CacheConfigError, CacheSpec

POLICIES = ("full", "checkpoint", "recompute")
_UNLIMITED = 2**62


class CacheError(RuntimeError):
    """Misuse of the cache manager (unknown request, committing unallocated tokens, ...)."""


@dataclass(frozen=True)
class PrefixHit:
    cached_tokens: int  # tokens [0, cached_tokens) have compressed entries; no compressed writes
    recompute_from: int  # tokens [recompute_from, cached_tokens) must be re-run (recompute_until = cached_tokens)


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


class _BlockPool:
    """Free list + reference counts + written-token counts of one block-id space.

    Lazy: ids never handed out are not materialised (`fresh` = the lowest never-used id), so sizing a pool of
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


@dataclass(slots=True)
class _Entry:
    key: int
    index: int
    parent: int | None
    comp: dict[str, int]  # compressed pool -> block id
    ckpt: dict[str, list[int]] | None = None  # token pool -> block ids held for the boundary state
    permanent: bool = False  # checkpoint belongs to the policy grid (not a moving tail checkpoint)
    pins: int = 0
    children: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Req:
    tokens: list[int]
    tables: dict[str, list[int]]
    chain: list[int] = field(default_factory=list)  # entries pinned, blocks 0..len-1
    num_computed: int = 0
    freed_upto: dict[str, int] = field(default_factory=dict)  # token pool -> first small block not yet freed
    tail_ckpt: int | None = None
    hit: PrefixHit = PrefixHit(0, 0)
    # numpy copies of `tables` for the model runner (`batch_block_tables`): `views[p]` is current unless p is in
    # `dirty`, which holds the first entry written (or appended) since the copy was last read. Every write to
    # a table goes through `_changed`, so a decode step copies O(1) entries per table instead of O(context).
    mirror: dict[str, Any] = field(default_factory=dict)  # pool -> int64 buffer (capacity >= table length)
    views: dict[str, Any] = field(default_factory=dict)  # pool -> mirror[:len(table)]
    dirty: dict[str, int] = field(default_factory=dict)


def _changed(req: _Req, pool: str, first: int) -> None:
    """Entries >= first of req.tables[pool] are about to change (or be appended)."""
    if first < req.dirty.get(pool, first + 1):
        req.dirty[pool] = first


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class CacheManager:
    def __init__(self, spec: CacheSpec, num_blocks: dict[str, int], policy: str = "full",
                 checkpoint_every: int = 4, enable_prefix_caching: bool = True) -> None:
        if policy not in POLICIES:
            raise CacheConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        if checkpoint_every < 0:
            raise CacheConfigError(f"checkpoint_every must be >= 0 (0 = tail checkpoints only), got {checkpoint_every}")
        for p in spec.token_pools:
            if spec.block_size % spec.pools[p].tokens_per_block:
                raise CacheConfigError(f"{p}.tokens_per_block must divide block_size {spec.block_size}")
        if "idx" in num_blocks and "csa" in num_blocks and num_blocks["idx"] != num_blocks["csa"]:
            raise CacheConfigError(f"num_blocks['idx'] ({num_blocks['idx']}) must equal num_blocks['csa'] "
                                   f"({num_blocks['csa']}): idx shares csa's block ids")
        unknown = sorted(set(num_blocks) - set(spec.pools))
        if unknown:
            raise CacheConfigError(f"num_blocks names pools {unknown} that this model has not; "
                                   f"pools: {sorted(spec.pools)}")
        self.spec = spec
        self.policy = policy
        self.checkpoint_every = checkpoint_every
        self.enable_prefix_caching = enable_prefix_caching
        self.num_blocks: dict[str, int] = {}
        for p in spec.block_pools:
            n = int(num_blocks.get(p, 0))
            if n < 0:
                raise CacheConfigError(f"num_blocks[{p!r}] must be >= 0, got {n}")
            self.num_blocks[p] = n
        self._bp = {p: _BlockPool(n) for p, n in self.num_blocks.items()}
        self._comp = tuple(p for p in ("csa", "hca") if p in spec.pools)
        self._tok = spec.token_pools
        self._tpb = {p: spec.pools[p].tokens_per_block for p in self._tok}
        self._max_tokens: int | None = None  # max_request_tokens(), fixed by the block counts
        self._entries: dict[int, _Entry] = {}
        self._comp_lru: OrderedDict[int, None] = OrderedDict()  # unpinned entries, oldest first
        self._state_lru: OrderedDict[int, None] = OrderedDict()  # entries with a checkpoint, oldest first
        self._reqs: dict[str, _Req] = {}
        self._queries = self._hits = self._recompute = 0
        self.recompute_span = spec.num_layers * max(spec.window, 2 * spec.csa_ratio)

    # ---- sizing ----------------------------------------------------------------------------------
    @staticmethod
    def seq_blocks(spec: CacheSpec, context: int, policy: str = "full", checkpoint_every: int = 4,
                   running: bool = True) -> dict[str, float]:
        """Blocks per pool one sequence of `context` tokens needs: compressed history, the live window
        while it runs, and the checkpoints its policy keeps (amortised per logical block)."""
        B = spec.block_size
        full_blocks = context // B
        out: dict[str, float] = {}
        for p in ("csa", "hca"):
            if p in spec.pools:
                out[p] = float(_cdiv(context, B))
        live_len = {"swa": spec.window, "csa_state": 2 * spec.csa_ratio, "hca_state": spec.hca_ratio}
        for p in spec.token_pools:
            t = spec.pools[p].tokens_per_block
            live = (_cdiv(live_len[p] + 1, t) + 1) if running else 0
            if running and p == "swa" and policy == "full":
                live += B // t  # the current logical block's rows stay until its entry keeps them
            lo, hi = spec.live_range(p, B)  # boundary window, the same at every block boundary
            ck = (_cdiv(hi, t) - lo // t) if hi > lo else 0
            if policy == "full":
                per = max(ck, B // t) if p == "swa" else ck
                kept = per * full_blocks
            elif policy == "checkpoint":
                grid = full_blocks // checkpoint_every if checkpoint_every else 0
                kept = ck * (grid + (1 if full_blocks else 0))
            else:
                kept = 0
            out[p] = float(live + kept)
        return out

    @classmethod
    def from_budget(cls, spec: CacheSpec, budget_bytes: int, *, expected_context: int, policy: str = "full",
                    split_override: dict[str, float] | None = None, checkpoint_every: int = 4,
                    enable_prefix_caching: bool = True, prefill_chunk: int | None = None,
                    max_running: int | None = None) -> CacheManager:
        """Size every pool from one byte budget.

        A sequence of `expected_context` tokens keeps `kept_p` blocks per pool (compressed history,
        policy checkpoints) and, while it runs, `live_p` more (window + compressor tail). With
        `R = max_running` (default: unbounded) and one prefill chunk of headroom `h_p` in the token pools:

            n = (budget - sum_p h_p*b_p - R*sum_p live_p*b_p) / sum_p kept_p*b_p     (n >= R, else
            n = budget' / sum_p (kept_p + live_p)*b_p);   blocks_p = n*kept_p + min(n, R)*live_p + h_p

        `split_override` fixes a pool's fraction of the whole budget; the other pools share the rest
        as above.
        """
        if policy not in POLICIES:
            raise CacheConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        if expected_context < 1:
            raise CacheConfigError(f"expected_context must be >= 1, got {expected_context}")
        if max_running is not None and max_running < 1:
            raise CacheConfigError(f"max_running must be >= 1, got {max_running}")
        total = cls.seq_blocks(spec, expected_context, policy, checkpoint_every, running=True)
        kept = cls.seq_blocks(spec, expected_context, policy, checkpoint_every, running=False)
        live = {p: total[p] - kept[p] for p in total}
        chunk = min(prefill_chunk or 2048, expected_context)
        head = {p: (_cdiv(chunk, spec.pools[p].tokens_per_block) if p in spec.token_pools else 0) for p in total}
        over = dict(split_override or {})
        bad = sorted(set(over) - set(total))
        if bad:
            raise CacheConfigError(f"split_override names {bad}; pools are {sorted(total)} (idx rides on csa)")
        if any(v < 0 for v in over.values()) or sum(over.values()) > 1.0 + 1e-9:
            raise CacheConfigError(f"split_override fractions must be >= 0 and sum to <= 1, got {over}")
        nb: dict[str, int] = {}
        for p, frac in over.items():  # an overridden pool gets exactly its fraction of the whole budget
            nb[p] = int(budget_bytes * frac // spec.block_bytes(p))
        rest = [p for p in total if p not in over]
        head_bytes = sum(head[p] * spec.block_bytes(p) for p in rest)
        budget = int(budget_bytes) - sum(nb[p] * spec.block_bytes(p) for p in nb) - head_bytes
        kb = sum(kept[p] * spec.block_bytes(p) for p in rest)
        lb = sum(live[p] * spec.block_bytes(p) for p in rest)
        n = max(budget, 0) / ((kb + lb) or 1.0)
        if max_running is not None and n > max_running:
            n = (budget - max_running * lb) / (kb or 1.0)
        r = n if max_running is None else min(n, max_running)
        for p in rest:
            nb[p] = int(n * kept[p] + r * live[p]) + head[p]
        # rounding leftovers go to the compressed pools, in proportion to their per-sequence bytes
        left = int(budget_bytes) - sum(nb[p] * spec.block_bytes(p) for p in nb)
        comp = [p for p in ("csa", "hca") if p in rest]
        cb = sum(kept[p] * spec.block_bytes(p) for p in comp)
        for p in comp:
            nb[p] += max(0, int(left * kept[p] * spec.block_bytes(p) / (cb or 1.0) // spec.block_bytes(p)))
        mgr = cls(spec, nb, policy, checkpoint_every, enable_prefix_caching)
        if budget < 0 or mgr.max_request_tokens() < 1:
            raise CacheConfigError(f"budget_bytes {budget_bytes} cannot hold one request: pools {nb}, "
                                   f"one prefill chunk of {chunk} tokens alone needs {head_bytes} bytes")
        return mgr

    def max_request_tokens(self) -> int:
        """Largest context one request can ever hold (0 when a token pool cannot hold even one window)."""
        if self._max_tokens is None:
            s = self.spec
            live_len = {"swa": s.window, "csa_state": 2 * s.csa_ratio, "hca_state": s.hca_ratio}
            fits = all(self.num_blocks[p] >= _cdiv(live_len[p] + 1, self._tpb[p]) + 1 for p in self._tok)
            lim = [self.num_blocks[p] * s.block_size for p in self._comp]
            self._max_tokens = 0 if not fits else min(lim) if lim else _UNLIMITED
        return self._max_tokens

    def capacity_report(self, context: int | None = None) -> dict:
        """Capacity for start-up logging: bytes and blocks per pool, tokens of compressed history, the
        largest request and the concurrent sequences at `context` tokens (default: max_request_tokens)."""
        s = self.spec
        ctx = int(context) if context else max(1, min(self.max_request_tokens(), 2**20))
        need = self.seq_blocks(s, ctx, self.policy, self.checkpoint_every)
        conc = min((int(self.num_blocks[p] // need[p]) for p in need if need[p] > 0), default=0)
        pools = {p: {"blocks": self.num_blocks[p], "bytes": self.num_blocks[p] * s.block_bytes(p),
                     "blocks_per_sequence": need.get(p, 0.0)} for p in self.num_blocks}
        return {
            "policy": self.policy, "block_size": s.block_size, "kv_dtype": s.kv_dtype, "index_dtype": s.index_dtype,
            "total_bytes": sum(v["bytes"] for v in pools.values()), "pools": pools,
            "token_capacity": min((self.num_blocks[p] * s.block_size for p in self._comp), default=_UNLIMITED),
            "max_request_tokens": self.max_request_tokens(), "context": ctx, "concurrent_sequences": conc,
            "bytes_per_token_slope": s.slope_bytes_per_token(), "fixed_bytes_per_request": s.fixed_bytes_per_request(),
        }

    def format_capacity_report(self, context: int | None = None) -> str:
        r = self.capacity_report(context)
        pools = ", ".join(f"{p}={v['blocks']} blocks/{v['bytes'] / 2**30:.2f} GiB" for p, v in r["pools"].items())
        return (f"kv cache: {r['total_bytes'] / 2**30:.2f} GiB, policy {r['policy']}, {r['token_capacity']} tokens of "
                f"compressed history, largest request {r['max_request_tokens']} tokens, "
                f"{r['concurrent_sequences']} concurrent sequences at {r['context']} tokens; {pools}")

    # ---- request lifecycle ---------------------------------------------------------------------
    def _req(self, req_id: str) -> _Req:
        try:
            return self._reqs[req_id]
        except KeyError:
            raise CacheError(f"unknown request {req_id!r}") from None

    def has(self, req_id: str) -> bool:
        return req_id in self._reqs

    def num_computed(self, req_id: str) -> int:
        return self._req(req_id).num_computed

    def _chain_hash(self, parent: int | None, tokens: list[int], i: int) -> int:
        B = self.spec.block_size
        return hash((parent, tuple(tokens[i * B:(i + 1) * B])))

    def _match(self, token_ids: list[int]) -> tuple[list[int], int]:
        """Matched entry chain and the deepest checkpointed block count j."""
        chain: list[int] = []
        if not self.enable_prefix_caching:
            return chain, 0
        h: int | None = None
        j = 0
        for i in range((len(token_ids) - 1) // self.spec.block_size):
            h = self._chain_hash(h, token_ids, i)
            e = self._entries.get(h)
            if e is None:
                break
            chain.append(h)
            if e.ckpt is not None:
                j = i + 1
        return chain, j

    def _hit_for(self, chain: list[int], j: int) -> PrefixHit:
        c = len(chain) * self.spec.block_size
        if c == 0:
            return PrefixHit(0, 0)
        return PrefixHit(c, max(j * self.spec.block_size, c - self.recompute_span, 0))

    def peek(self, token_ids: list[int]) -> PrefixHit:
        """The hit `start(token_ids)` would return now; touches nothing."""
        return self._hit_for(*self._match(list(token_ids)))

    def start(self, req_id: str, token_ids: list[int]) -> PrefixHit:
        if req_id in self._reqs:
            raise CacheError(f"request {req_id!r} already started")
        tokens = list(token_ids)
        chain, j = self._match(tokens)
        hit = self._hit_for(chain, j)
        B = self.spec.block_size
        req = _Req(tokens, {p: [] for p in self.num_blocks}, num_computed=hit.recompute_from, hit=hit)
        req.freed_upto = {p: 0 for p in self._tok}
        for h in chain:
            e = self._entries[h]
            self._pin(e)
            for p, b in e.comp.items():
                self._bp[p].incref(b)
                req.tables[p].append(b)
        req.chain = list(chain)
        r = hit.recompute_from
        if chain and j * B == r and r > 0:  # continue from the checkpoint at r: share its blocks
            e = self._entries[chain[j - 1]]
            assert e.ckpt is not None
            for p in self._tok:
                t = self._tpb[p]
                lo, hi = self.spec.live_range(p, r)
                tab = req.tables[p]
                tab.extend([-1] * (_cdiv(r, t) - len(tab)))
                for k in range(lo // t, _cdiv(hi, t)):
                    b = self._ckpt_block(e, p, k)
                    self._bp[p].incref(b)
                    tab[k] = b
        for p in self._tok:
            req.freed_upto[p] = 0
        self._touch(chain)
        self._queries += len(tokens)
        self._hits += hit.cached_tokens
        self._recompute += hit.cached_tokens - hit.recompute_from
        self._reqs[req_id] = req
        return hit

    def _ckpt_block(self, e: _Entry, pool: str, k: int) -> int:
        """Block id of small block k of `pool` in an entry's checkpoint (recorded as (k, id) pairs)."""
        assert e.ckpt is not None
        for kk, b in zip(e.ckpt[pool][0::2], e.ckpt[pool][1::2], strict=True):
            if kk == k:
                return b
        raise CacheError(f"checkpoint of block {e.index} lacks {pool} small block {k}")

    def allocate(self, req_id: str, num_tokens_total: int) -> bool:
        req = self._req(req_id)
        n = int(num_tokens_total)
        if n > self.max_request_tokens():
            return False
        B = self.spec.block_size
        need: dict[str, int] = {}  # pool -> blocks to take (pools that need none are left out)
        for p in self._comp:
            k = _cdiv(n, B) - len(req.tables[p])
            if k > 0:
                need[p] = k
        start = req.num_computed
        short = False  # a token-pool table must grow (with -1 entries at least)
        for p in self._tok:
            t, tab = self._tpb[p], req.tables[p]
            end = _cdiv(n, t)
            short = short or len(tab) < end
            k = 0
            for i in range(start // t, end):
                if i >= len(tab) or tab[i] < 0:
                    k += 1
            if k:
                need[p] = k
        if not need and not short:  # the common decode step: every row already has a block
            return True
        for p, k in need.items():
            if not self._ensure(p, k):
                return False
        if any(self._bp[p].num_free < k for p, k in need.items()):
            return False
        for p in self._comp:
            if p in need:
                _changed(req, p, len(req.tables[p]))
                for _ in range(need[p]):
                    req.tables[p].append(self._bp[p].take())
        for p in self._tok:
            t, tab = self._tpb[p], req.tables[p]
            if p in need or len(tab) < _cdiv(n, t):
                _changed(req, p, min(start // t, len(tab)))
            tab.extend([-1] * (_cdiv(n, t) - len(tab)))
            for k in range(start // t, _cdiv(n, t)):
                if tab[k] < 0:
                    tab[k] = self._bp[p].take()
        return True

    def block_tables(self, req_id: str) -> dict[str, list[int]]:
        req = self._req(req_id)
        return {p: list(t) for p, t in req.tables.items()}

    def batch_block_tables(self, req_ids: list[str], pools: list[str]) -> dict[str, Any]:
        """Per pool, the requests' block tables as one int64 numpy array [len(req_ids), widest (>= 1)], rows
        padded with -1. Built from per-request numpy copies that are refreshed only from the first entry
        written since the last call, so a decode step costs O(batch x widest) memcpy, not a Python list ->
        tensor conversion of every entry (the token-pool tables grow by one entry per 16 tokens of context)."""
        import numpy as np

        reqs = [self._req(r) for r in req_ids]
        out = {}
        for p in pools:
            rows = []
            for req in reqs:
                v = req.views.get(p)
                rows.append(self._mirrored(req, p) if v is None or p in req.dirty else v)
            widths = {len(r) for r in rows}
            if len(widths) == 1 and 0 not in widths:  # the common decode batch: one memcpy of all rows
                out[p] = np.concatenate(rows).reshape(len(rows), -1)
                continue
            table = np.full((len(rows), max(1, *widths)), -1, dtype=np.int64)
            for i, r in enumerate(rows):
                table[i, :len(r)] = r
            out[p] = table
        return out

    @staticmethod
    def _mirrored(req: _Req, pool: str) -> Any:
        """req.tables[pool] as a numpy view, brought up to date from req.dirty[pool]."""
        tab = req.tables.get(pool, ())
        n = len(tab)
        m = req.mirror.get(pool)
        first = req.dirty.pop(pool, 0)
        if m is None:
            first = 0
        if m is None or len(m) < n:
            import numpy as np

            grown = np.empty(max(n, 16, 0 if m is None else 2 * len(m)), dtype=np.int64)
            if m is not None:
                grown[:first] = m[:first]  # entries below `first` are current
            m = req.mirror[pool] = grown
        if first < n:
            m[first:n] = tab[first:]
        v = req.views[pool] = m[:n]
        return v

    def commit(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        """Record that the first `num_computed` tokens have rows in the pools. `token_ids` are the request's
        tokens so far: those given to `start` / the last commit, possibly extended (a request's tokens only
        grow). Frees rows that left the window and registers completed blocks for prefix reuse.
        Called once per running request per step: plain loops over the few blocks [prev, n) touches."""
        req = self._req(req_id)
        n = int(num_computed)
        prev = req.num_computed
        if n < prev or n > len(token_ids):
            raise CacheError(f"commit of {req_id!r}: num_computed {n} must be in [{prev}, "
                             f"len(token_ids)={len(token_ids)}]")
        B = self.spec.block_size
        tables = req.tables
        for p in self._comp:
            if len(tables[p]) * B < n:
                raise CacheError(f"commit of {req_id!r}: {n} tokens but only {len(tables[p]) * B} allocated in {p}")
        # a sequence's tokens only grow: copy what is new since the last commit (O(new), not O(context))
        if len(req.tokens) < len(token_ids):
            req.tokens.extend(token_ids[len(req.tokens):])
        # written-token accounting
        for p in self._comp:
            tab, filled = tables[p], self._bp[p].filled
            for i in range(prev // B, _cdiv(n, B)):
                rows = min(B, n - i * B)
                if filled[tab[i]] < rows:
                    filled[tab[i]] = rows
        for p in self._tok:
            t, tab, filled = self._tpb[p], tables[p], self._bp[p].filled
            for k in range(prev // t, _cdiv(n, t)):
                if k >= len(tab) or tab[k] < 0:
                    raise CacheError(f"commit of {req_id!r}: {p} block for positions {k * t}.. not allocated")
                filled[tab[k]] += min(n, (k + 1) * t) - max(prev, k * t)
        if self.enable_prefix_caching:
            self._register(req, prev, n)
        # out-of-window freeing
        keep_swa_block = self.policy == "full" and self.enable_prefix_caching
        for p in self._tok:
            t, tab = self._tpb[p], tables[p]
            lo = self.spec.live_range(p, n)[0]
            if p == "swa" and keep_swa_block:
                lo = min(lo, (n // B) * B)  # keep the current block's rows: its entry will keep them all
            first, end = req.freed_upto[p], min(lo // t, len(tab))
            if first < end:
                _changed(req, p, first)
                bp = self._bp[p]
                for k in range(first, end):
                    if tab[k] >= 0:
                        bp.decref(tab[k])
                        tab[k] = -1
            if lo // t > first:
                req.freed_upto[p] = lo // t
        req.num_computed = n

    def _wants_ckpt(self, i: int) -> bool:
        return self.policy == "full" or (self.policy == "checkpoint" and self.checkpoint_every > 0
                                         and (i + 1) % self.checkpoint_every == 0)

    def _register(self, req: _Req, prev: int, n: int) -> None:
        B = self.spec.block_size
        # new entries for newly completed blocks (contiguous chain)
        while len(req.chain) < n // B:
            i = len(req.chain)
            parent = req.chain[-1] if req.chain else None
            h = self._chain_hash(parent, req.tokens, i)
            e = self._entries.get(h)
            if e is None:
                e = _Entry(h, i, parent, {p: req.tables[p][i] for p in self._comp})
                for p, b in e.comp.items():
                    self._bp[p].incref(b)
                self._entries[h] = e
                if parent is not None:
                    self._entries[parent].children.add(h)
            self._pin(e)
            req.chain.append(h)
        # checkpoints at boundaries crossed by this commit
        last = None
        for i in range(prev // B, n // B):
            if (i + 1) * B <= prev:
                continue
            e = self._entries[req.chain[i]]
            if self._wants_ckpt(i):
                if e.ckpt is None:
                    self._take_ckpt(req, e, full_swa=self.policy == "full")
                if e.ckpt is not None:
                    e.permanent = True
            last = e
        if self.policy == "checkpoint" and last is not None:
            if req.tail_ckpt is not None and req.tail_ckpt != last.key:
                old = self._entries.get(req.tail_ckpt)
                if old is not None and old.ckpt is not None and not old.permanent:
                    self._tombstone(old, evicting=False)
            if last.ckpt is None:
                self._take_ckpt(req, last, full_swa=False)
            req.tail_ckpt = last.key

    def _take_ckpt(self, req: _Req, e: _Entry, full_swa: bool) -> None:
        c = (e.index + 1) * self.spec.block_size
        ck: dict[str, list[int]] = {}
        for p in self._tok:
            t, tab = self._tpb[p], req.tables[p]
            lo, hi = self.spec.live_range(p, c)
            ks = set(range(lo // t, _cdiv(hi, t))) if hi > lo else set()
            if any(k >= len(tab) or tab[k] < 0 for k in ks):
                return  # the request no longer holds the boundary window (e.g. before its recompute start)
            if full_swa and p == "swa":
                ks |= {k for k in range(e.index * self.spec.block_size // t, c // t) if k < len(tab) and tab[k] >= 0}
            pairs: list[int] = []
            for k in sorted(ks):
                pairs += [k, tab[k]]
            ck[p] = pairs
        for p, pairs in ck.items():
            for b in pairs[1::2]:
                self._bp[p].incref(b)
        e.ckpt = ck
        self._state_lru[e.key] = None
        self._state_lru.move_to_end(e.key)

    def free(self, req_id: str) -> None:
        """Release a finished or preempted request; its registered blocks stay cached (LRU)."""
        req = self._reqs.pop(req_id, None)
        if req is None:
            raise CacheError(f"unknown request {req_id!r}")
        for p, tab in req.tables.items():
            for b in tab:
                if b >= 0:
                    self._bp[p].decref(b)
        for h in reversed(req.chain):
            e = self._entries[h]
            e.pins -= 1
            if e.pins == 0:
                self._comp_lru[h] = None
        self._touch(req.chain)

    def preempt(self, req_id: str) -> list[int]:
        """Free a running request so it can be requeued; returns its tokens for the recompute."""
        tokens = list(self._req(req_id).tokens)
        self.free(req_id)
        return tokens

    # ---- eviction ------------------------------------------------------------------------------
    def _pin(self, e: _Entry) -> None:
        e.pins += 1
        self._comp_lru.pop(e.key, None)

    def _touch(self, chain: list[int]) -> None:
        """Most recent = first block of the chain: tails are evicted before the prefixes they hang on."""
        for h in reversed(chain):
            if h in self._comp_lru:
                self._comp_lru.move_to_end(h)
            if h in self._state_lru:
                self._state_lru.move_to_end(h)

    def _tombstone(self, e: _Entry, evicting: bool = True) -> None:
        if e.ckpt is None:
            return
        for p, pairs in e.ckpt.items():
            for b in pairs[1::2]:
                self._bp[p].decref(b, evicting)
        e.ckpt = None
        e.permanent = False
        self._state_lru.pop(e.key, None)

    def _evict(self, e: _Entry) -> None:
        """Drop an unpinned entry and its subtree (unreachable without it)."""
        stack, order = [e], []
        while stack:
            x = stack.pop()
            order.append(x)
            stack.extend(self._entries[c] for c in x.children)
        for x in reversed(order):
            if x.pins:
                raise CacheError(f"internal: evicting pinned block {x.index}")
            self._tombstone(x)
            for p, b in x.comp.items():
                self._bp[p].decref(b, evicting=True)
            self._comp_lru.pop(x.key, None)
            del self._entries[x.key]
            if x.parent is not None and x.parent in self._entries:
                self._entries[x.parent].children.discard(x.key)

    def _ensure(self, pool: str, need: int) -> bool:
        bp = self._bp[pool]
        while bp.num_free < need:
            if pool in self._tok:  # only checkpoints hold token-pool blocks in the cache
                if not self._state_lru:
                    return False
                self._tombstone(self._entries[next(iter(self._state_lru))])
            elif self._comp_lru:
                self._evict(self._entries[next(iter(self._comp_lru))])
            else:
                return False
        return True

    # ---- accounting ----------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        s = self.spec
        out: dict[str, PoolStats] = {}
        for name in s.pools:
            p = "csa" if name == "idx" else name
            bp = self._bp[p]
            used = bp.n - bp.num_free
            per = s.pools[name].bytes_per_block
            out[name] = PoolStats(bp.n, used, bp.n * per, used * per, sum(bp.filled),
                                  used / bp.n if bp.n else 0.0, bp.evictions)
        ck = sum(1 for e in self._entries.values() if e.ckpt is not None)
        return CacheStats(out, self._queries, self._hits, self._recompute, ck, len(self._entries),
                          len(self._entries) - ck, len(self._reqs))

    def clear_cached(self) -> None:
        """Drop every checkpoint and every unpinned cached block (like vLLM's reset_prefix_cache)."""
        for h in list(self._state_lru):
            self._tombstone(self._entries[h], evicting=False)
        while self._comp_lru:
            self._evict(self._entries[next(iter(self._comp_lru))])

    def num_free_blocks(self, pool: str) -> int:
        return self._bp[pool].num_free

    def cached_prefix_tokens(self) -> int:
        """Tokens of compressed history held by registered blocks."""
        return len(self._entries) * self.spec.block_size

    def check_invariants(self) -> None:
        """Recount every reference from scratch and compare (tests; O(blocks))."""
        want = {p: [0] * bp.n for p, bp in self._bp.items()}
        for req in self._reqs.values():
            for p, tab in req.tables.items():
                for b in tab:
                    if b >= 0:
                        want[p][b] += 1
                if self._mirrored(req, p).tolist() != tab:
                    raise CacheError(f"the numpy copy of a {p} block table missed a write (a `_changed` call)")
            for h in req.chain:
                if h not in self._entries:
                    raise CacheError("request pins an evicted block")
        pins = {h: 0 for h in self._entries}
        for req in self._reqs.values():
            for h in req.chain:
                pins[h] += 1
        for h, e in self._entries.items():
            for p, b in e.comp.items():
                want[p][b] += 1
            if e.ckpt is not None:
                for p, pairs in e.ckpt.items():
                    for b in pairs[1::2]:
                        want[p][b] += 1
            if e.pins != pins[h]:
                raise CacheError(f"entry {e.index}: pins {e.pins} != {pins[h]}")
            if (e.pins == 0) != (h in self._comp_lru):
                raise CacheError(f"entry {e.index}: compressed-LRU membership wrong")
            if (e.ckpt is not None) != (h in self._state_lru):
                raise CacheError(f"entry {e.index}: state-LRU membership wrong")
            if e.parent is not None and (e.parent not in self._entries or h not in self._entries[e.parent].children):
                raise CacheError(f"entry {e.index}: parent link broken")
        for p, bp in self._bp.items():
            ref = bp.ref + [0] * (bp.n - bp.fresh)
            if ref != want[p]:
                bad = [b for b in range(bp.n) if ref[b] != want[p][b]][:5]
                raise CacheError(f"{p}: refcounts differ at blocks {bad}")
            free = bp.free_ids()
            if len(set(free)) != len(free) or set(free) != {b for b in range(bp.n) if ref[b] == 0}:
                raise CacheError(f"{p}: free list does not match zero refcounts")
