"""Reading a runtime pod's /metrics: the real exporter fed by the real allocator, parsed into a Sample."""

from __future__ import annotations

import pytest
from dsv4.operator.autoscaler import ScalerConfig, load_of
from dsv4.operator.scrape import ScrapeError, parse_metrics
from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import tiny
from dsv4.runtime.server.metrics import EngineMetrics, cache_info_labels


def _exporter_text(tokens: int, waiting: int) -> tuple[str, CacheManager]:
    spec = CacheSpec.from_model(tiny())
    mgr = CacheManager(spec, dict.fromkeys(spec.block_pools, 40))
    ids = list(range(tokens))
    mgr.start("a", ids)
    assert mgr.allocate("a", tokens)
    mgr.commit("a", ids, tokens)
    em = EngineMetrics("tiny", cache_info_labels(spec, mgr.num_blocks, "full", True))
    em.on_idle(1, waiting, mgr.stats())
    return em.render()[0].decode(), mgr


def test_runtime_exporter_output_parses_to_per_pool_occupancy_and_queue() -> None:
    text, mgr = _exporter_text(300, 3)
    s = parse_metrics(text, "pod-a", 12.5)
    assert (s.pod, s.time, s.queue) == ("pod-a", 12.5, 3.0)
    stats = mgr.stats().pools
    assert s.pools == {p: pytest.approx(ps.occupancy) for p, ps in stats.items()}
    # the fullest pool binds the load, not a blended number
    fullest = max(stats, key=lambda p: stats[p].occupancy)
    load, sig = load_of(s, ScalerConfig(target_queue_depth=100))
    assert sig == f"pool_{fullest}" and load == pytest.approx(stats[fullest].occupancy / 0.8)


def test_missing_series_and_garbage_are_errors() -> None:
    with pytest.raises(ScrapeError, match="vllm:num_requests_waiting"):
        parse_metrics('dsv4_cache_pool_occupancy_ratio{pool="csa"} 0.5\n', "p", 0)
    with pytest.raises(ScrapeError, match="dsv4_cache_pool_occupancy_ratio"):
        parse_metrics("vllm:num_requests_waiting 2\n", "p", 0)
    with pytest.raises(ScrapeError):
        parse_metrics("this is { not prometheus", "p", 0)


def test_children_of_several_models_combine_max_occupancy_and_summed_queue() -> None:
    text = ('vllm:num_requests_waiting{model_name="a",engine="0"} 2\n'
            'vllm:num_requests_waiting{model_name="b",engine="0"} 5\n'
            'dsv4_cache_pool_occupancy_ratio{model_name="a",engine="0",pool="csa"} 0.2\n'
            'dsv4_cache_pool_occupancy_ratio{model_name="b",engine="0",pool="csa"} 0.7\n')
    s = parse_metrics(text, "p", 0)
    assert s.queue == 7 and s.pools == {"csa": 0.7}
