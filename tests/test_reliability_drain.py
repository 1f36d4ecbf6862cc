"""SIGTERM under load against a real `dsv4 serve` subprocess: every request in flight when the signal arrives
completes correctly (equal to its greedy reference) within the grace period, new requests get 503, exit 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import httpx
import pytest
from dsv4.runtime.server.launch import start_server

N = 32
GRACE_S = 90


def body(i: int, stream: bool) -> dict:
    return {"prompt": f"drain under load {i % 8}", "max_tokens": 12 + (i % 4) * 4, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def run_one(client: httpx.AsyncClient, base: str, i: int) -> tuple[int, str, str | None]:
    if i % 3 == 0:
        r = await client.post(base + "/v1/completions", json=body(i, False))
        if r.status_code != 200:
            return r.status_code, r.text, None
        c = r.json()["choices"][0]
        return 200, c["text"], c["finish_reason"]
    parts, finish, saw_done = [], None, False
    async with client.stream("POST", base + "/v1/completions", json=body(i, True)) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode(), None
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                saw_done = True
            elif line.startswith("data: "):
                for c in json.loads(line[6:]).get("choices", []):
                    parts.append(c["text"])
                    finish = c["finish_reason"] or finish
    return (200 if saw_done else 599), "".join(parts), finish


def wait_exit(sp, timeout: float) -> int:
    """The exit code; if the process hangs, fail with every thread's stack (SIGUSR1 -> faulthandler)."""
    try:
        return sp.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        sp.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        pytest.fail(f"dsv4 serve did not exit {timeout:.0f} s after draining:\n{sp.log()[-6000:]}")


@pytest.mark.slow
def test_sigterm_under_load_loses_nothing():
    sp = start_server(["--grace-period-s", str(GRACE_S), "--max-num-seqs", "8", "--max-queue", "64"])
    try:
        base = sp.base_url
        ref = {}
        for i in range(N):
            key = (i % 8, i % 4)
            if key not in ref:
                ref[key] = httpx.post(base + "/v1/completions", json=body(i, False), timeout=60).json()
        ref_text = {k: v["choices"][0]["text"] for k, v in ref.items()}

        async def main() -> tuple[list, float, int, int]:
            async with httpx.AsyncClient(timeout=GRACE_S + 30, limits=httpx.Limits(max_connections=N + 8)) as client:
                tasks = [asyncio.create_task(run_one(client, base, i)) for i in range(N)]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # all N accepted (running or waiting) before the signal
                    st = (await client.get(base + "/ready")).json()
                    if st["running"] + st["waiting"] >= N:
                        break
                    await asyncio.sleep(0.02)
                sp.terminate()
                t_sig = time.monotonic()
                ready = 200
                while ready == 200 and time.monotonic() - t_sig < 5:
                    ready = (await client.get(base + "/ready")).status_code
                late = (await client.post(base + "/v1/completions", json=body(0, False))).status_code
                results = await asyncio.gather(*tasks)
                return results, time.monotonic() - t_sig, ready, late

        results, drain_s, ready, late = asyncio.run(main())
        assert ready == 503 and late == 503
        failed = [(i, r) for i, r in enumerate(results) if r[0] != 200]
        assert not failed, f"{len(failed)} in-flight requests failed: {failed[:3]}"
        wrong = [i for i, (_, text, fin) in enumerate(results)
                 if text != ref_text[(i % 8, i % 4)] or fin != "length"]
        assert not wrong, f"responses differ from the reference: {wrong}"
        assert drain_s < GRACE_S
        assert wait_exit(sp, 60) == 0
        print(f"\nSIGTERM with {N} in flight: 0 failed, 0 wrong, drained in {drain_s:.1f} s (grace {GRACE_S} s)")
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()


def test_grace_period_over_aborts_and_exits():
    """A grace period shorter than the work: the process still exits 0 promptly, after aborting what is left."""
    sp = start_server(["--grace-period-s", "1", "--max-num-seqs", "2"])
    try:
        signalled: list[bool] = []

        async def main() -> list:
            async with httpx.AsyncClient(timeout=60) as client:
                big = {"prompt": "long", "max_tokens": 5000, "ignore_eos": True, "stream": True}

                async def one() -> int:
                    async with client.stream("POST", sp.base_url + "/v1/completions", json=big) as r:
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: ")
                            if n == 2 and not signalled:  # one SIGTERM (a second one exits at once)
                                signalled.append(True)
                                sp.terminate()
                        return n

                return await asyncio.gather(one(), one(), return_exceptions=True)

        t0 = time.monotonic()
        asyncio.run(main())
        assert wait_exit(sp, 30) == 0
        assert time.monotonic() - t0 < 30
        assert "grace period over: aborting" in sp.log()
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()
