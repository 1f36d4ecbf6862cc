"""How many sessions and how long a context one replica's cache budget holds, pool by pool.

No formula of its own: the planner sizes the cache with the runtime's allocator,
`dsv4.runtime.cache.sizing.CacheSizing.from_budget` (metadata only, no tensors), so the plan and the
server that later reads the same budget from its config file agree block for block. `from_budget`
splits the budget over the block pools (swa, csa+idx, hca, csa_state, hca_state) in proportion to what
one sequence of `expected_context` tokens needs under the cache policy; `max_request_tokens()` is the
longest single request and `capacity_report(ctx)["concurrent_sequences"]` the sessions of that length.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.runtime.cache.sizing import CacheSizing
from dsv4.runtime.cache.spec import CacheConfigError, CacheSpec

from dsv4.settings_enums import CACHE_POLICIES


@dataclass(frozen=True)
class Capacity:
    budget_bytes: int
    policy: str
    expected_context: int
    num_blocks: dict[str, int]        # per block pool (idx rides on csa's ids)
    pool_split: dict[str, float]      # fraction of the allocated bytes per block pool
    sessions: int                     # sequences of expected_context held at once
    max_request_tokens: int           # the longest single request that fits
    error: str = ""                   # why nothing fits (budget too small)


def capacity(spec: CacheSpec, budget_bytes: int, *, expected_context: int, policy: str, max_context_limit: int,
             prefill_chunk: int | None = None) -> Capacity:
    """Size the pools of `budget_bytes` for requests of `expected_context` tokens under `policy`."""
    if policy not in CACHE_POLICIES:
        raise ValueError(f"cache policy must be one of {CACHE_POLICIES}, got {policy!r}")
    try:
        mgr = CacheSizing.from_budget(spec, int(budget_bytes), expected_context=int(expected_context),
                                      policy=policy, prefill_chunk=prefill_chunk)
    except CacheConfigError as e:
        return Capacity(int(budget_bytes), policy, expected_context, {}, {}, 0, 0, str(e))
    nb = dict(mgr.num_blocks)
    by_pool = {p: n * spec.block_bytes(p) for p, n in nb.items()}
    total = sum(by_pool.values()) or 1
    report = mgr.capacity_report(expected_context)
    return Capacity(int(budget_bytes), policy, expected_context, nb, {p: b / total for p, b in by_pool.items()},
                    int(report["concurrent_sequences"]), min(int(max_context_limit), mgr.max_request_tokens()))
