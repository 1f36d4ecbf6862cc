"""The metrics catalog: well-formed specs, the pool names of the cache spec, and real prometheus_client
collectors that expose exactly the catalogued series."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsv4 import metrics_catalog as mc


def test_names_unique_and_prefixed():
    assert len({m.name for m in mc.METRICS}) == len(mc.METRICS)
    for m in mc.RUNTIME_METRICS:
        assert m.name.startswith(("vllm:", "dsv4_")) and not m.name.startswith("dsv4_operator_"), m.name
    for m in mc.OPERATOR_METRICS:
        assert m.name.startswith("dsv4_operator_"), m.name


def test_issue_5_vllm_names_are_present():
    required = """vllm:num_requests_running vllm:num_requests_waiting vllm:kv_cache_usage_perc
    vllm:prefix_cache_queries_total vllm:prefix_cache_hits_total vllm:num_preemptions_total vllm:prompt_tokens_total
    vllm:generation_tokens_total vllm:time_to_first_token_seconds vllm:inter_token_latency_seconds
    vllm:e2e_request_latency_seconds vllm:request_queue_time_seconds vllm:cache_config_info""".split()
    assert set(required) <= set(mc.BY_NAME)


def test_pools_match_the_cache_spec():
    from dsv4.runtime.cache import pools

    assert mc.POOLS == tuple(pools.POOLS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "x_total", "kind": "gauge"}, "_total"),
        ({"name": "x", "kind": "counter"}, "_total"),
        ({"name": "x", "kind": "histogram"}, "buckets"),
        ({"name": "x", "kind": "histogram", "buckets": (1.0, 0.5)}, "increasing"),
        ({"name": "x", "kind": "gauge", "labels": ("le",)}, "label"),
        ({"name": "x-y", "kind": "gauge"}, "valid Prometheus name"),
        ({"name": "x", "kind": "gauge", "label_values": {"pool": ("a",)}}, "unknown label"),
    ],
)
def test_bad_specs_rejected(kwargs, message):
    base = {"help": "h", "labels": (), "component": mc.RUNTIME}
    with pytest.raises(ValueError, match=message):
        mc.MetricSpec(**{**base, **kwargs})


def test_unknown_metric_named_in_error():
    with pytest.raises(KeyError, match="vllm:gpu_cache_usage_perc"):
        mc.get("vllm:gpu_cache_usage_perc")


@pytest.mark.parametrize("component", mc.COMPONENTS)
def test_collectors_expose_exactly_the_catalog(component):
    const = {"model_name": "tiny", "engine": "0"} if component == mc.RUNTIME else {}
    c = mc.make_collectors(component, constant_labels=const)
    import prometheus_client as pc

    text = pc.generate_latest(c["__registry__"]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for m in mc.of_component(component):
        # the parser strips _total from counter family names
        fam = families[m.client_name]
        assert fam.type == m.kind and fam.documentation == m.help, m.name
    # enumerated labels are pre-created at 0: every pool is visible before the first request
    if component == mc.RUNTIME:
        pools = {s.labels["pool"] for s in families["dsv4_cache_pool_occupancy_ratio"].samples}
        assert pools == set(mc.POOLS)
        buckets = [s for s in families["dsv4_batching_delay_wait_seconds"].samples if s.name.endswith("_bucket")]
        assert len(buckets) == len(mc.BATCHING_DELAY_BUCKETS) + 1  # + the +Inf bucket


def test_collectors_record_values():
    import prometheus_client as pc

    c = mc.make_collectors(mc.RUNTIME, constant_labels={"model_name": "tiny", "engine": "0"})
    c["dsv4_cache_pool_used_bytes"].labels(pool="hca").set(4096)
    c["vllm:prompt_tokens_total"].inc(7)
    c["dsv4_step_duration_seconds"].labels(phase="forward").observe(0.003)
    reg = c["__registry__"]
    labels = {"model_name": "tiny", "engine": "0"}
    assert reg.get_sample_value("dsv4_cache_pool_used_bytes", {**labels, "pool": "hca"}) == 4096
    assert reg.get_sample_value("vllm:prompt_tokens_total", labels) == 7
    assert reg.get_sample_value("dsv4_step_duration_seconds_count", {**labels, "phase": "forward"}) == 1
    with pytest.raises(AttributeError, match="labels"):
        c["dsv4_cache_pool_used_bytes"].set(1)  # pool is not bound
    o = mc.make_collectors(mc.OPERATOR)
    o["dsv4_operator_endpoint_desired_replicas"].labels(dsv4_namespace="ml", dsv4_endpoint="chat").set(3)
    assert o["__registry__"].get_sample_value(
        "dsv4_operator_endpoint_desired_replicas", {"dsv4_namespace": "ml", "dsv4_endpoint": "chat"}) == 3
    assert isinstance(reg, pc.CollectorRegistry)


def test_series_index_and_markdown():
    idx = mc.series_index()
    assert idx["vllm:time_to_first_token_seconds_bucket"].name == "vllm:time_to_first_token_seconds"
    assert "vllm:time_to_first_token_seconds" not in idx  # a histogram's family name is not a series
    assert idx["up"] is None
    table = mc.markdown_table()
    assert all(f"`{m.name}`" in table for m in mc.METRICS)


def test_relabelings_name_the_endpoint_label():
    prom = mc.runtime_scrape_relabelings("prometheus")
    assert {r.get("target_label") for r in prom} >= {"dsv4_endpoint", "namespace", "pod"}
    assert prom[0]["source_labels"] == ["__meta_kubernetes_pod_label_dsv4_io_endpoint"]
    assert mc.runtime_scrape_relabelings("operator")[0]["targetLabel"] == "dsv4_endpoint"


def test_docs_list_every_metric():
    from dsv4.operator.observability.generate import REPO_ROOT

    doc = (REPO_ROOT / "docs" / "observability.md").read_text()
    assert mc.markdown_table() in doc, "paste mc.markdown_table() into docs/observability.md"
