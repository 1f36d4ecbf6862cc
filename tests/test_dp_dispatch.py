"""The data-parallel front end's pure parts: which rank a request goes to, and the replica's cache as one."""

from __future__ import annotations

import pytest
from dsv4.runtime.cache.stats import CacheStats, PoolStats
from dsv4.runtime.engine.data_parallel import aggregate_stats
from dsv4.runtime.engine.dispatch import LOAD, MIN_SLACK, PREFIX, RankLoad, choose_rank

BLOCK = 64


def test_the_longest_cached_prefix_wins_over_a_load_tie_and_a_small_imbalance():
    loads = [RankLoad(3, 0.1, 0), RankLoad(3, 0.5, 192), RankLoad(3, 0.2, 64)]
    assert choose_rank(loads, BLOCK) == (1, PREFIX)
    loads[1] = RankLoad(3 + MIN_SLACK, 0.5, 192)  # busier by the slack: still the prefix holder
    assert choose_rank(loads, BLOCK) == (1, PREFIX)


def test_load_wins_when_the_prefix_holder_is_overloaded_or_the_hit_is_below_a_block():
    assert choose_rank([RankLoad(0, 0.0, 0), RankLoad(1 + MIN_SLACK, 0.0, 512)], BLOCK) == (0, LOAD)
    assert choose_rank([RankLoad(2, 0.0, 0), RankLoad(1, 0.0, BLOCK - 1)], BLOCK) == (1, LOAD)
    # slack grows with the load: half the least-loaded rank's requests
    assert choose_rank([RankLoad(40, 0.0, 0), RankLoad(60, 0.0, 512)], BLOCK) == (1, PREFIX)
    assert choose_rank([RankLoad(40, 0.0, 0), RankLoad(61, 0.0, 512)], BLOCK) == (0, LOAD)


def test_least_loaded_then_emptiest_cache_then_least_recently_used_rank():
    assert choose_rank([RankLoad(2, 0.0, 0), RankLoad(1, 0.9, 0), RankLoad(1, 0.3, 0)], BLOCK) == (2, LOAD)
    assert choose_rank([RankLoad(1, 0.3, 0), RankLoad(1, 0.3, 0)], BLOCK) == (0, LOAD)
    # sequential requests on an idle replica alternate: the rank used last waits its turn
    assert choose_rank([RankLoad(0, 0.0, 0, last_dispatch=5), RankLoad(0, 0.0, 0, last_dispatch=4)], BLOCK) == (1, LOAD)
    assert choose_rank([RankLoad(0, 0.0, 0, last_dispatch=5), RankLoad(0, 0.0, 0)], BLOCK) == (1, LOAD)
    with pytest.raises(ValueError, match="no ranks"):
        choose_rank([], BLOCK)


def test_replica_stats_sum_sizes_and_take_the_fullest_rank_occupancy():
    def stats(used: int, total: int, hits: int) -> CacheStats:
        return CacheStats({"csa": PoolStats(total, used, total * 10, used * 10, used * 4, used / total, 1)},
                          100, hits, 0, 1, 2, 0, used)

    agg = aggregate_stats([stats(10, 100, 5), stats(80, 100, 7)])
    p = agg.pools["csa"]
    assert (p.blocks_total, p.blocks_used, p.bytes_allocated, p.evictions) == (200, 90, 2000, 2)
    assert p.occupancy == 0.8  # not 90 / 200: the fullest rank refuses work first
    assert (agg.prefix_queries_tokens, agg.prefix_hit_tokens, agg.running_requests) == (200, 12, 90)
