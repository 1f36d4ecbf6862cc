"""Every runtime metric of the catalog is exported by a live server and moves under a workload that exercises
prefix hits, cache pressure (preemption, eviction), queueing, the batching delay and errors."""

from __future__ import annotations

import subprocess
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from dsv4.e2e import tools
from dsv4.runtime.server.launch import start_server
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from dsv4 import metrics_catalog as catalog


@pytest.fixture(scope="module")
def server():
    # 5 blocks per pool: the compressed pools hold 320 tokens, so two 140-token requests cannot both finish
    sp = start_server(["--num-blocks", "5", "--max-num-seqs", "2", "--max-num-batched-tokens", "64",
                       "--cache-policy", "checkpoint", "--checkpoint-every", "1", "--batching-delay-ms", "5"])
    yield sp
    assert sp.stop() == 0, sp.log()[-3000:]


def scrape(server) -> dict[str, dict]:
    """family name -> {(sample name, sorted labels): value}"""
    out: dict[str, dict] = defaultdict(dict)
    for fam in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        for s in fam.samples:
            out[name][(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict, family: str, suffix: str = "", **labels: str) -> float:
    want = family + suffix
    return sum(v for (n, lb), v in m.get(family, {}).items()
               if n == want and all(dict(lb).get(k) == x for k, x in labels.items()))


def test_every_catalog_metric_is_present_and_moves(server):
    before = scrape(server)
    for spec in catalog.RUNTIME_METRICS:
        assert spec.name in before, f"{spec.name} missing from /metrics"
    info = [dict(lb) for (_n, lb) in before["vllm:cache_config_info"]]
    assert info and info[0]["block_size"] == "64" and info[0]["cache_policy"] == "checkpoint"
    assert info[0]["num_gpu_blocks"] == "5"
    for pool in ("swa", "csa", "idx", "hca", "csa_state", "hca_state"):
        assert total(before, "dsv4_cache_pool_allocated_bytes", pool=pool) > 0

    client = OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    long_prompt = list(range(20, 170))  # 150 tokens: two full blocks -> prefix entries + checkpoints
    for _ in range(2):
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2, temperature=0)
    mid = scrape(server)
    assert total(mid, "dsv4_swa_checkpoints_kept") > 0

    peaks: dict[str, float] = defaultdict(float)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            m = scrape(server)
            for fam in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                peaks[fam] = max(peaks[fam], total(m, fam))
            for fam in ("dsv4_cache_pool_occupancy_ratio", "dsv4_cache_pool_used_bytes", "dsv4_cache_pool_tokens_held"):
                for pool in ("swa", "csa", "hca"):
                    peaks[f"{fam}/{pool}"] = max(peaks[f"{fam}/{pool}"], total(m, fam, pool=pool))

    w = threading.Thread(target=watch, daemon=True)
    w.start()

    def one(i: int) -> str:
        r = client.completions.create(model="tiny", prompt=[(i * 97 + j * 13) % 900 + 30 for j in range(100)],
                                      max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(6) as ex:
        reasons = list(ex.map(one, range(6)))
    stop.set()
    w.join()
    assert reasons == ["length"] * 6
    assert httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    after = scrape(server)

    grew = lambda fam, suffix="", **lb: total(after, fam, suffix, **lb) > total(before, fam, suffix, **lb)  # noqa: E731
    for fam in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total"):
        assert grew(fam), fam
    assert grew("vllm:request_success_total", finished_reason="length")
    assert grew("dsv4_rank_prefix_cache_hit_tokens_total", rank="0")  # dp = 1: the replica is rank 0
    assert grew("dsv4_request_errors_total", code="400")
    assert any(grew("dsv4_cache_pool_evictions_total", pool=p) for p in catalog.POOLS)
    for fam in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                "dsv4_batching_delay_wait_seconds"):
        assert grew(fam, "_count"), fam
    for phase in catalog.STEP_PHASES:
        assert grew("dsv4_step_duration_seconds", "_count", phase=phase), phase
    # the batching delay made fresh requests wait (up to 5 ms) before their first step
    assert total(after, "dsv4_batching_delay_wait_seconds", "_sum") > 0
    for fam in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert peaks[fam] > 0, fam
    for key in ("dsv4_cache_pool_occupancy_ratio/csa", "dsv4_cache_pool_used_bytes/swa",
                "dsv4_cache_pool_tokens_held/hca"):
        assert peaks[key] > 0, key
    assert peaks["vllm:kv_cache_usage_perc"] <= 1.0
    # idle again: nothing running or waiting
    assert total(after, "vllm:num_requests_running") == 0 and total(after, "vllm:num_requests_waiting") == 0


def promtool_findings(exposition: str) -> list[str]:
    """`promtool check metrics` (the real linter, Debian's prometheus package) on an exposition: one line per
    finding, "<family> <problem>"."""
    proc = subprocess.run([str(tools.ensure_promtool()), "check", "metrics"], input=exposition, capture_output=True,
                          text=True, timeout=60)
    findings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert (proc.returncode == 0) == (not findings), (proc.returncode, findings)
    return findings


def test_promtool_finds_nothing_but_the_vllm_names(server):
    """A live server's /metrics passes `promtool check metrics` except for vLLM's `vllm:` names (kept for routers
    and dashboards that expect them): every `dsv4_` family is clean."""
    text = httpx.get(server.base_url + "/metrics").text
    ours = [m.name for m in catalog.RUNTIME_METRICS if not m.name.startswith("vllm:")]
    assert ours and all(name.startswith("dsv4_") and name in text for name in ours)
    findings = promtool_findings(text)
    assert [f for f in findings if not f.startswith("vllm:")] == []
    assert findings, "promtool flags vLLM's colon names: no finding at all means the linter did not run"


def test_promtool_finds_nothing_in_the_operator_metrics():
    import prometheus_client as pc
    from dsv4.operator import telemetry

    registry = pc.CollectorRegistry()
    telemetry.collectors(registry)
    assert promtool_findings(pc.generate_latest(registry).decode()) == []
