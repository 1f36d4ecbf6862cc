"""Which data-parallel attention rank a new request goes to (`dsv4 serve --dp N --ep`).

A pure decision over each rank's load and the prefix this prompt would hit in each rank's cache:

* **prefix affinity**: the rank whose cache holds the longest prefix of the prompt wins when the hit saves at
  least one cache block and that rank is not overloaded — its load at most `slack` above the least-loaded rank,
  slack = max(MIN_SLACK, SLACK_FRACTION x the least load) (SGLang's cache-aware router balances the same way:
  cache hits first until the imbalance passes a threshold). Prefix reuse thus survives DP: a conversation's next
  turn lands where its history is cached.
* **load**: otherwise the rank with the fewest requests (running + waiting), then the emptiest cache, then the
  rank that was sent a request least recently (so sequential traffic alternates instead of piling on rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SLACK = 4  # requests a prefix-holding rank may be above the least-loaded one
SLACK_FRACTION = 0.5

PREFIX, LOAD = "prefix", "load"
REASONS = (PREFIX, LOAD)


@dataclass(frozen=True)
class RankLoad:
    requests: int  # running + waiting on the rank
    occupancy: float  # fullest pool's fraction of blocks in use
    prefix_hit_tokens: int  # tokens of this prompt the rank's cache holds (`CacheManager.peek`)
    last_dispatch: int = -1  # sequence number of the last request sent to the rank (-1: none yet)


def choose_rank(loads: list[RankLoad], block_size: int) -> tuple[int, str]:
    """(rank, reason) for a new request; reason is PREFIX or LOAD."""
    if not loads:
        raise ValueError("no ranks to choose from")
    least = min(r.requests for r in loads)
    slack = max(MIN_SLACK, int(SLACK_FRACTION * least))
    by_hit = max(range(len(loads)), key=lambda k: (loads[k].prefix_hit_tokens, -loads[k].requests, -k))
    best = loads[by_hit]
    if best.prefix_hit_tokens >= block_size and best.requests - least <= slack:
        return by_hit, PREFIX
    return min(range(len(loads)), key=lambda k: (loads[k].requests, loads[k].occupancy, loads[k].last_dispatch,
                                                 k)), LOAD
