"""`dsv4 serve --dp 2 --ep` (two real processes, gloo: data-parallel attention, expert-parallel MoE) against
`--dp 1` through the HTTP API with the `openai` client: 64 concurrent seeded requests give the same greedy tokens
and logprobs (<= 1e-4) while the per-rank metrics show both ranks served some; a shared prefix is served from the
cache of the rank that holds it (prefix affinity), and the replica-level gauges aggregate the ranks.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from dsv4.runtime.server.launch import start_server, start_servers
from openai import AsyncOpenAI, OpenAI

pytestmark = pytest.mark.slow

COMMON = ["--device", "cpu", "--cache-budget-gib", "0.03125", "--expected-context", "512",
          "--chunked-prefill-size", "256", "--max-num-batched-tokens", "512", "--cache-policy", "full"]
TOL = 1e-4


@pytest.fixture(scope="module")
def servers():
    dp1, dp2 = start_servers(COMMON, [*COMMON, "--dp", "2", "--ep", "--tp-timeout-s", "30"])
    yield dp1, dp2
    for s in (dp1, dp2):
        assert s.stop() == 0, s.log()[-3000:]


def ids(n: int, salt: int) -> list[int]:
    return [(37 * i + 11 * salt + 5) % 1000 + 2 for i in range(n)]


def rank_series(server, name: str) -> dict[tuple[str, str], float]:
    """(rank, reason or pool or '') -> value of one dsv4_rank_* family."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                out[(s.labels["rank"], s.labels.get("reason", s.labels.get("pool", "")))] = s.value
    return out


def completions(server, prompts: list[list[int]]) -> list:
    """Greedy seeded completions of every prompt at once (concurrent), with the top-2 logprobs."""

    async def run() -> list:
        c = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0,
                                                               seed=i, logprobs=2) for i, p in enumerate(prompts)))
        finally:
            await c.close()

    return asyncio.run(run())


def assert_same_completions(ref: list, got: list) -> float:
    """Same tokens and text, every logprob within TOL; returns the largest logprob difference."""
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        ca, cb = a.choices[0], b.choices[0]
        assert ca.logprobs.tokens == cb.logprobs.tokens and ca.text == cb.text
        for x, y in zip(ca.logprobs.token_logprobs, cb.logprobs.token_logprobs, strict=True):
            worst = max(worst, abs(x - y))
        for ta, tb in zip(ca.logprobs.top_logprobs, cb.logprobs.top_logprobs, strict=True):
            assert set(ta) == set(tb)
            assert all(abs(ta[k] - tb[k]) <= TOL for k in ta), (ta, tb)
    assert worst <= TOL, worst
    return worst


def dispatched_per_rank(server, before: dict) -> dict[str, float]:
    after = rank_series(server, "dsv4_rank_dispatched_requests_total")
    return {r: sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == r) for r in ("0", "1")}


def test_64_concurrent_seeded_requests_match_dp1_and_use_both_ranks(servers):
    prompts = [ids(10 + (7 * i) % 90, 100 + i) for i in range(64)]
    before = rank_series(servers[1], "dsv4_rank_dispatched_requests_total")
    worst = assert_same_completions(completions(servers[0], prompts), completions(servers[1], prompts))
    print(f"max logprob difference dp2 vs dp1 over 64 requests: {worst:.3g}")
    per_rank = dispatched_per_rank(servers[1], before)
    assert sum(per_rank.values()) == 64 and min(per_rank.values()) >= 16, per_rank  # really spread
    # single-rank servers report their one rank as rank 0
    assert set(k[0] for k in rank_series(servers[0], "dsv4_rank_requests_running")) == {"0"}


def test_tp_inside_each_data_parallel_rank_matches_dp1(servers):
    """`--dp 2 --tp 2 --ep`: four processes, two attention ranks each a TP group of two, the routed experts over
    all four; concurrent seeded requests give dp 1's tokens and logprobs, on both attention ranks."""
    s = start_server([*COMMON, "--dp", "2", "--tp", "2", "--ep", "--tp-timeout-s", "60"], timeout=300)
    try:
        prompts = [ids(10 + (13 * i) % 90, 300 + i) for i in range(24)]
        before = rank_series(s, "dsv4_rank_dispatched_requests_total")
        worst = assert_same_completions(completions(servers[0], prompts), completions(s, prompts))
        print(f"max logprob difference dp2 x tp2 vs dp1 over 24 requests: {worst:.3g}")
        per_rank = dispatched_per_rank(s, before)
        assert sum(per_rank.values()) == 24 and min(per_rank.values()) >= 6, per_rank
        log = s.log()
        assert "dp capacity: ranks=2 tp=2" in log and "per process: 2 of 8 routed experts" in log, log[-3000:]
    finally:
        assert s.stop() == 0, s.log()[-3000:]


def dispatched_to(before: dict, after: dict) -> list[tuple[str, str]]:
    """The (rank, reason) series that grew, once per request."""
    return [k for k, v in after.items() for _ in range(int(v - before.get(k, 0.0)))]


def test_a_shared_prefix_is_served_from_the_rank_that_holds_it(servers):
    dp2 = servers[1]
    client = OpenAI(base_url=dp2.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    stop = threading.Event()

    def busy(salt: int) -> threading.Thread:
        """A long streamed request, running when this returns; closed (aborted) once `stop` is set."""
        started = threading.Event()

        def run() -> None:
            stream = client.completions.create(model="tiny", prompt=ids(30, salt), max_tokens=1500, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            for _ in stream:
                started.set()
                if stop.is_set():
                    stream.close()
                    return

        t = threading.Thread(target=run)
        t.start()
        assert started.wait(120)
        return t

    series = "dsv4_rank_dispatched_requests_total"
    d0 = rank_series(dp2, series)
    threads = [busy(7)]
    d1 = rank_series(dp2, series)
    [(busy_rank, _)] = dispatched_to(d0, d1)
    base = ids(200, 42)
    first = client.completions.create(model="tiny", prompt=base + [7, 8, 9], max_tokens=4, temperature=0)
    d2 = rank_series(dp2, series)
    [(holder, reason)] = dispatched_to(d1, d2)
    assert holder != busy_rank and reason == "load"  # the other rank was busy
    threads.append(busy(8))  # the least-loaded rank is the holder: now one long request runs on each rank
    d3 = rank_series(dp2, series)
    assert dispatched_to(d2, d3) == [(holder, "load")]
    hits_before = rank_series(dp2, "dsv4_rank_prefix_cache_hit_tokens_total")
    second = client.completions.create(model="tiny", prompt=base + [100, 200, 300, 400], max_tokens=4, temperature=0)
    assert dispatched_to(d3, rank_series(dp2, series)) == [(holder, "prefix")]
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 128 and first.usage.prompt_tokens_details.cached_tokens == 0
    hits_after = rank_series(dp2, "dsv4_rank_prefix_cache_hit_tokens_total")
    assert hits_after[(holder, "")] - hits_before.get((holder, ""), 0) == cached  # served by the holder's cache
    assert hits_after.get((busy_rank, ""), 0) == hits_before.get((busy_rank, ""), 0)
    stop.set()
    for t in threads:
        t.join(120)
    deadline = time.monotonic() + 30  # the aborts free both ranks: the gauges read an idle replica
    while sum(rank_series(dp2, "dsv4_rank_requests_running").values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    running = rank_series(dp2, "dsv4_rank_requests_running")
    assert running[("0", "")] == running[("1", "")] == 0
    occ = rank_series(dp2, "dsv4_rank_cache_pool_occupancy_ratio")
    text = httpx.get(dp2.base_url + "/metrics").text
    usage = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("vllm:kv_cache_usage_perc")))
    assert abs(usage - max(occ.values())) < 1e-9  # the replica's usage is the fullest rank's fullest pool


def test_killing_a_rank_mid_request_ends_the_replica_within_the_timeout():
    """A dead rank leaves the MoE exchange one rank short: the replica must exit non-zero (the pod restarts),
    naming the rank, within the collective timeout — also while a request is running on the surviving rank."""
    import os
    import re
    import signal

    from dsv4.runtime.server.launch import start_server

    timeout = 10.0
    sp = start_server(["--device", "cpu", "--dp", "2", "--ep", "--tp-timeout-s", str(timeout)], timeout=240)
    try:
        pid = int(re.search(r"started rank 1 \(pid (\d+)\)", sp.log()).group(1))
        client = OpenAI(base_url=sp.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt="hello", max_tokens=3000, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code = sp.proc.wait(timeout + 10)
        took = time.monotonic() - t0
    finally:
        sp.stop(5)
    assert code != 0 and took <= timeout, (code, took)
    assert f"data-parallel group broken: rank 1 (pid {pid}) killed by SIGKILL" in sp.log(), sp.log()[-3000:]
