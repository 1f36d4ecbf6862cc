"""SIGTERM during load: readiness drops at once, new requests get 503, every in-flight request completes, exit 0."""

from __future__ import annotations

import threading
import time

import httpx
from dsv4.runtime.server.launch import start_server
from openai import OpenAI


def test_sigterm_drains_without_losing_requests():
    sp = start_server(["--grace-period-s", "60"])
    try:
        client = OpenAI(base_url=sp.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        results: dict[int, tuple[str, int]] = {}
        started = threading.Barrier(7)

        def stream(i: int) -> None:
            text, reason, first = [], None, True
            for ch in client.completions.create(model="tiny", prompt=f"drain test {i}", max_tokens=30,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if first:
                    first = False
                    started.wait(timeout=60)
                if ch.choices:
                    text.append(ch.choices[0].text)
                    reason = ch.choices[0].finish_reason or reason
                elif ch.usage:
                    results[i] = (reason, ch.usage.completion_tokens)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream has its first chunk
        sp.terminate()
        t0 = time.monotonic()
        status = 200
        while status == 200 and time.monotonic() - t0 < 2:
            status = httpx.get(sp.base_url + "/ready").status_code
        assert status == 503, "readiness did not drop after SIGTERM"
        r = httpx.post(sp.base_url + "/v1/completions", json={"prompt": "late", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        for t in threads:
            t.join(timeout=120)
        assert results == {i: ("length", 30) for i in range(6)}
        assert sp.proc.wait(timeout=30) == 0
        assert "draining" in sp.log()
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()


def test_full_queue_answers_429_with_retry_after():
    sp = start_server(["--max-num-seqs", "1", "--max-queue", "1"])
    try:
        def post(i: int) -> httpx.Response:
            return httpx.post(sp.base_url + "/v1/completions", timeout=120, json={
                "prompt": f"queue {i}", "max_tokens": 40, "temperature": 0, "ignore_eos": True})

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(5) as ex:
            rs = list(ex.map(post, range(5)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 429 in codes, codes
        r429 = next(r for r in rs if r.status_code == 429)
        assert int(r429.headers["Retry-After"]) >= 1
        assert "max_queue" in r429.json()["error"]["message"]
        assert sp.stop() == 0
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()
