"""Pool sizing: how many blocks each pool gets from a byte budget, what one sequence needs, the longest request
and the concurrent sequences a set of block counts holds. Pure arithmetic over a `CacheSpec`: the operator's
planner (`operator/capacity.py`), `dsv4 bench capacity` and the server (`server/build.py`, through
`CacheManager.from_budget`) all size with this one module, so a pod's pools match its plan block for block.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.runtime.cache.policies import make_policy
from dsv4.runtime.cache.pools import id_space
from dsv4.runtime.cache.spec import CacheConfigError, CacheSpec, cdiv

UNLIMITED = 2**62
DEFAULT_PREFILL_CHUNK = 2048  # prefill headroom when the caller does not say (the scheduler's default budget)


def largest_prefill_chunk(max_num_batched_tokens: int, chunked_prefill_size: int | None) -> int:
    """The most tokens one sequence prefills in one step: the headroom the token pools are sized for."""
    return min(chunked_prefill_size or max_num_batched_tokens, max_num_batched_tokens)


def live_len(spec: CacheSpec, pool: str) -> int:
    """Positions of token pool `pool` a running request keeps at most (`spec.live_range`)."""
    return {"swa": spec.window, "csa_state": 2 * spec.csa_ratio, "hca_state": spec.hca_ratio}[pool]


def live_blocks(spec: CacheSpec, pool: str) -> int:
    """Blocks of token pool `pool` a running request's live window can span (plus one being filled)."""
    return cdiv(live_len(spec, pool) + 1, spec.pools[pool].tokens_per_block) + 1


def seq_blocks(spec: CacheSpec, context: int, policy: str = "full", checkpoint_every: int = 4,
               running: bool = True) -> dict[str, float]:
    """Blocks per pool one sequence of `context` tokens needs: compressed history, the live window while it
    runs, and the checkpoints its policy keeps (amortised per logical block)."""
    pol = make_policy(policy, checkpoint_every)
    B = spec.block_size
    full_blocks = context // B
    out: dict[str, float] = {p: float(cdiv(context, B)) for p in spec.block_pools if p not in spec.token_pools}
    for p in spec.token_pools:
        t = spec.pools[p].tokens_per_block
        live = live_blocks(spec, p) if running else 0
        if running and pol.keeps_block_rows(p):
            live += B // t  # the current logical block's rows stay until its entry keeps them
        lo, hi = spec.live_range(p, B)  # boundary window, the same at every block boundary
        ck = (cdiv(hi, t) - lo // t) if hi > lo else 0
        out[p] = float(live + pol.kept_blocks(p, ck, B // t, full_blocks))
    return out


@dataclass
class CacheSizing:
    """Block counts per block pool (idx rides on csa's ids) under a policy; validated on construction."""

    spec: CacheSpec
    num_blocks: dict[str, int]
    policy: str = "full"
    checkpoint_every: int = 4

    def __post_init__(self) -> None:
        spec, given = self.spec, self.num_blocks
        make_policy(self.policy, self.checkpoint_every)  # validates both
        for p in spec.token_pools:
            if spec.block_size % spec.pools[p].tokens_per_block:
                raise CacheConfigError(f"{p}.tokens_per_block must divide block_size {spec.block_size}")
        for p in given:
            owner = id_space(p)
            if owner != p and owner in given and given[p] != given[owner]:
                raise CacheConfigError(f"num_blocks[{p!r}] ({given[p]}) must equal num_blocks[{owner!r}] "
                                       f"({given[owner]}): {p} shares {owner}'s block ids")
        unknown = sorted(set(given) - set(spec.pools))
        if unknown:
            raise CacheConfigError(f"num_blocks names pools {unknown} that this model has not; "
                                   f"pools: {sorted(spec.pools)}")
        counts: dict[str, int] = {}
        for p in spec.block_pools:
            n = int(given.get(p, 0))
            if n < 0:
                raise CacheConfigError(f"num_blocks[{p!r}] must be >= 0, got {n}")
            counts[p] = n
        self.num_blocks = counts

    @classmethod
    def from_budget(cls, spec: CacheSpec, budget_bytes: int, *, expected_context: int, policy: str = "full",
                    split_override: dict[str, float] | None = None, checkpoint_every: int = 4,
                    prefill_chunk: int | None = None, max_running: int | None = None) -> CacheSizing:
        """Size every pool from one byte budget.

        A sequence of `expected_context` tokens keeps `kept_p` blocks per pool (compressed history,
        policy checkpoints) and, while it runs, `live_p` more (window + compressor tail). With
        `R = max_running` (default: unbounded) and one prefill chunk of headroom `h_p` in the token pools:

            n = (budget - sum_p h_p*b_p - R*sum_p live_p*b_p) / sum_p kept_p*b_p     (n >= R, else
            n = budget' / sum_p (kept_p + live_p)*b_p);   blocks_p = n*kept_p + min(n, R)*live_p + h_p

        `split_override` fixes a pool's fraction of the whole budget; the other pools share the rest
        as above.
        """
        make_policy(policy, checkpoint_every)
        if expected_context < 1:
            raise CacheConfigError(f"expected_context must be >= 1, got {expected_context}")
        if max_running is not None and max_running < 1:
            raise CacheConfigError(f"max_running must be >= 1, got {max_running}")
        total = seq_blocks(spec, expected_context, policy, checkpoint_every, running=True)
        kept = seq_blocks(spec, expected_context, policy, checkpoint_every, running=False)
        live = {p: total[p] - kept[p] for p in total}
        chunk = min(prefill_chunk or DEFAULT_PREFILL_CHUNK, expected_context)
        head = {p: (cdiv(chunk, spec.pools[p].tokens_per_block) if p in spec.token_pools else 0) for p in total}
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
        comp = [p for p in rest if p not in spec.token_pools]
        cb = sum(kept[p] * spec.block_bytes(p) for p in comp)
        for p in comp:
            nb[p] += max(0, int(left * kept[p] * spec.block_bytes(p) / (cb or 1.0) // spec.block_bytes(p)))
        sizing = cls(spec, nb, policy, checkpoint_every)
        if budget < 0 or sizing.max_request_tokens() < 1:
            raise CacheConfigError(f"budget_bytes {budget_bytes} cannot hold one request: pools {nb}, "
                                   f"one prefill chunk of {chunk} tokens alone needs {head_bytes} bytes")
        return sizing

    def max_request_tokens(self) -> int:
        """Largest context one request can ever hold (0 when a token pool cannot hold even one window)."""
        s = self.spec
        if any(self.num_blocks[p] < live_blocks(s, p) for p in s.token_pools):
            return 0
        return min((self.num_blocks[p] * s.block_size for p in s.block_pools if p not in s.token_pools),
                   default=UNLIMITED)

    def capacity_report(self, context: int | None = None) -> dict:
        """Capacity for start-up logging: bytes and blocks per pool, tokens of compressed history, the
        largest request and the concurrent sequences at `context` tokens (default: max_request_tokens)."""
        s = self.spec
        ctx = int(context) if context else max(1, min(self.max_request_tokens(), 2**20))
        need = seq_blocks(s, ctx, self.policy, self.checkpoint_every)
        conc = min((int(self.num_blocks[p] // need[p]) for p in need if need[p] > 0), default=0)
        pools = {p: {"blocks": self.num_blocks[p], "bytes": self.num_blocks[p] * s.block_bytes(p),
                     "blocks_per_sequence": need.get(p, 0.0)} for p in self.num_blocks}
        comp = [p for p in s.block_pools if p not in s.token_pools]
        return {
            "policy": self.policy, "block_size": s.block_size, "kv_dtype": s.kv_dtype, "index_dtype": s.index_dtype,
            "total_bytes": sum(v["bytes"] for v in pools.values()), "pools": pools,
            "token_capacity": min((self.num_blocks[p] * s.block_size for p in comp), default=UNLIMITED),
            "max_request_tokens": self.max_request_tokens(), "context": ctx, "concurrent_sequences": conc,
            "bytes_per_token_slope": s.slope_bytes_per_token(), "fixed_bytes_per_request": s.fixed_bytes_per_request(),
        }

    def format_capacity_report(self, context: int | None = None) -> str:
        r = self.capacity_report(context)
        pools = ", ".join(f"{p}={v['blocks']} blocks/{v['bytes'] / 2**30:.2f} GiB" for p, v in r["pools"].items())
        return (f"kv cache: {r['total_bytes'] / 2**30:.2f} GiB, policy {r['policy']}, {r['token_capacity']} tokens of "
                f"compressed history, largest request {r['max_request_tokens']} tokens, "
                f"{r['concurrent_sequences']} concurrent sequences at {r['context']} tokens; {pools}")
