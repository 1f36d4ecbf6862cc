"""`dsv4 serve --tp 2` (two real processes, gloo) against `--tp 1` through the HTTP API with the `openai` client:
same greedy tokens and logprobs (<= 1e-5) for several prompts, concurrent requests and a prefix hit; the start-up
capacity equals the planner's figure for the same budget; the cache occupancy matches; killing a worker rank
ends the server non-zero within the collective timeout with one clear log line.

Both servers start at once (module fixture). The kill test runs last and ends the TP server.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest
from dsv4.runtime.server.launch import start_server, start_servers
from openai import AsyncOpenAI, OpenAI

pytestmark = pytest.mark.slow

BUDGET_GIB = 0.03125  # 32 MiB per rank
EXPECTED_CONTEXT = 512
CHUNK = 256
TIMEOUT_S = 15.0
COMMON = ["--device", "cpu", "--cache-budget-gib", str(BUDGET_GIB), "--expected-context", str(EXPECTED_CONTEXT),
          "--chunked-prefill-size", str(CHUNK), "--max-num-batched-tokens", "512", "--cache-policy", "full"]
TOL = 1e-5


@pytest.fixture(scope="module")
def servers():
    tp1, tp2 = start_servers(COMMON, [*COMMON, "--tp", "2", "--tp-timeout-s", str(TIMEOUT_S)])
    yield tp1, tp2
    assert tp1.stop() == 0, tp1.log()[-3000:]
    if tp2.proc.poll() is None:  # the kill test normally ended it
        assert tp2.stop() == 0, tp2.log()[-3000:]


def clients(servers) -> tuple[OpenAI, OpenAI]:
    return tuple(OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0, timeout=120) for s in servers)


def ids(n: int, salt: int) -> list[int]:
    return [(37 * i + 11 * salt + 5) % 1000 + 2 for i in range(n)]


def assert_same_choice(a, b) -> None:
    """Same text and tokens; logprobs (chosen and top alternatives) within TOL."""
    assert a.text == b.text
    la, lb = a.logprobs, b.logprobs
    assert la.tokens == lb.tokens
    for x, y in zip(la.token_logprobs, lb.token_logprobs, strict=True):
        assert abs(x - y) <= TOL, (x, y)
    for ta, tb in zip(la.top_logprobs, lb.top_logprobs, strict=True):
        assert set(ta) == set(tb)
        assert all(abs(ta[k] - tb[k]) <= TOL for k in ta), (ta, tb)


def max_lp_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs, strict=True))


def test_greedy_tokens_and_logprobs_match_tp1(servers):
    c1, c2 = clients(servers)
    prompts: list = ["hello world", "The quick brown fox jumps over", ids(40, 1), ids(150, 2), ids(300, 3)]
    worst = 0.0
    for p in prompts:
        kw = dict(model="tiny", prompt=p, max_tokens=12, temperature=0, logprobs=3)
        a, b = c1.completions.create(**kw), c2.completions.create(**kw)
        assert_same_choice(a.choices[0], b.choices[0])
        assert a.usage.completion_tokens == b.usage.completion_tokens == 12
        worst = max(worst, max_lp_diff(a.choices[0], b.choices[0]))
    print(f"max logprob difference tp2 vs tp1: {worst:.3g}")
    msgs = [{"role": "user", "content": "Name three colours."}]
    a = c1.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                   top_logprobs=2)
    b = c2.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                   top_logprobs=2)
    assert a.choices[0].message.content == b.choices[0].message.content
    for x, y in zip(a.choices[0].logprobs.content, b.choices[0].logprobs.content, strict=True):
        assert x.token == y.token and abs(x.logprob - y.logprob) <= TOL


def test_concurrent_requests_match_tp1(servers):
    prompts = [ids(20 + 13 * i, 10 + i) for i in range(8)]

    async def run(server) -> list:
        c = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                                               logprobs=2) for p in prompts))
        finally:
            await c.close()

    r1 = asyncio.run(run(servers[0]))
    r2 = asyncio.run(run(servers[1]))
    for a, b in zip(r1, r2, strict=True):
        assert_same_choice(a.choices[0], b.choices[0])


def test_prefix_hit_matches_tp1(servers):
    c1, c2 = clients(servers)
    base = ids(200, 42)
    first = dict(model="tiny", prompt=base + [7, 8, 9], max_tokens=6, temperature=0, logprobs=2)
    second = dict(model="tiny", prompt=base + [100, 200, 300, 400], max_tokens=6, temperature=0, logprobs=2)
    for kw in (first, second):
        a, b = c1.completions.create(**kw), c2.completions.create(**kw)
        assert_same_choice(a.choices[0], b.choices[0])
        hit_a = a.usage.prompt_tokens_details.cached_tokens
        hit_b = b.usage.prompt_tokens_details.cached_tokens
        assert hit_a == hit_b
    assert hit_b >= 128  # the second request reused the shared 200-token prefix (two 64-token blocks at least)


def _tp_capacity(log: str) -> dict[str, str]:
    m = re.search(r"tp capacity: (.*)", log)
    assert m, log[-3000:]
    return dict(kv.split("=", 1) for kv in m.group(1).split())


def _metric(server, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels.get("pool", json.dumps(s.labels))] = s.value
    return out


def test_startup_capacity_equals_planner_and_occupancy_matches(servers):
    from dsv4.operator.capacity import capacity
    from dsv4.runtime.cache.spec import CacheSpec
    from dsv4.runtime.config import tiny

    spec = CacheSpec.from_model(tiny(), kv_dtype="fp32")
    budget = int(BUDGET_GIB * 2**30)
    plan = capacity(spec, budget, expected_context=EXPECTED_CONTEXT, policy="full",
                    max_context_limit=tiny().max_position_embeddings, prefill_chunk=CHUNK)
    assert not plan.error and plan.sessions >= 1
    rep = _tp_capacity(servers[1].log())
    assert rep["world"] == "2"
    assert int(rep["context"]) == EXPECTED_CONTEXT
    assert int(rep["sessions"]) == plan.sessions
    assert int(rep["max_request_tokens"]) == plan.max_request_tokens
    assert {p: int(n) for p, n in (kv.split(":") for kv in rep["num_blocks"].split(","))} == plan.num_blocks
    per_rank = sum(n * spec.block_bytes(p) for p, n in plan.num_blocks.items())
    assert int(rep["per_rank_cache_bytes"]) == per_rank <= budget
    assert int(rep["group_cache_bytes"]) == 2 * per_rank
    # /metrics: the same pools and the same occupancy as TP1 after the same requests
    alloc1, alloc2 = (_metric(s, "dsv4_cache_pool_allocated_bytes") for s in servers)
    assert alloc1 == alloc2
    assert sum(alloc2.values()) == per_rank  # idx is reported beside csa (block_bytes("csa") counts both)
    occ1, occ2 = (_metric(s, "dsv4_cache_pool_occupancy_ratio") for s in servers)
    assert occ1 == occ2 and max(occ2.values()) > 0


def test_killing_a_rank_ends_the_server_within_the_timeout(servers):
    tp2 = servers[1]
    m = re.search(r"started rank 1 \(pid (\d+)\)", tp2.log())
    assert m, tp2.log()[-3000:]
    pid = int(m.group(1))
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    code = tp2.proc.wait(TIMEOUT_S + 5)
    took = time.monotonic() - t0
    assert code != 0
    assert took <= TIMEOUT_S, took
    log = tp2.log()
    assert f"tensor-parallel group broken: rank 1 (pid {pid}) killed by SIGKILL" in log, log[-3000:]
    print(f"server exited with {code} {took:.2f} s after SIGKILL of rank 1")


def test_a_hung_rank_ends_the_server_within_the_timeout():
    """SIGSTOP (alive but silent): no process exits, so only the collective timeout can notice. The idle server's
    heartbeat is an all-reduce every timeout/4, so it fails within about timeout + timeout/4."""
    timeout = 5.0
    sp = start_server(["--device", "cpu", "--tp", "2", "--tp-timeout-s", str(timeout)], timeout=240)
    try:
        pid = int(re.search(r"started rank 1 \(pid (\d+)\)", sp.log()).group(1))
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        code = sp.proc.wait(timeout * 1.25 + 10)
        took = time.monotonic() - t0
    finally:
        sp.stop(5)
    assert code != 0
    assert timeout <= took <= timeout * 1.25 + 5, took
    log = sp.log()
    assert "tensor-parallel group broken: heartbeat failed" in log, log[-3000:]
    print(f"server exited with {code} {took:.2f} s after SIGSTOP of rank 1 (timeout {timeout:g} s)")
