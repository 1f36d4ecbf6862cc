"""`dsv4 bench serving --smoke`: guidellm (own venv) against a live `dsv4 serve`; outputs carry real figures."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from dsv4.bench import serving

from dsv4.cli import main


def test_serving_smoke_cli(tmp_path, capsys):
    if not (serving.DEFAULT_MODEL / "tokenizer.json").exists():
        pytest.skip("tiny model missing: run `make setup`")
    raw = tmp_path / "raw"
    assert main(["bench", "serving", "--smoke", "--out", str(tmp_path), "--raw", str(raw)]) == 0
    out = json.loads((tmp_path / "serving_smoke.json").read_text())
    assert out["client"] == "guidellm" and out["guidellm_version"] == "0.8.1"
    [run] = out["runs"]
    assert (run["mix"], run["delay_ms"], run["prompt_tokens"], run["output_tokens"]) == ("short", 0.0, 32, 8)
    [p] = run["points"]
    assert p["streams"] == 2 and p["successful"] == 4 and p["errored"] == 0
    # the server's usage: guidellm's synthetic prompts have the exact length, ignore_eos gives every token
    assert p["prompt_tokens_mean"] == 32 and p["output_tokens_mean"] == 8
    assert p["requests_per_s"] > 0 and p["output_tokens_per_s"] == pytest.approx(8 * p["requests_per_s"])
    assert p["tokens_per_s"] == pytest.approx(40 * p["requests_per_s"])
    assert 0 < run["start_rss_bytes"] <= run["peak_rss_bytes"] < 8 * 2**30  # the server's, sampled over the mix
    assert 0 < p["ttft_ms_p50"] <= p["ttft_ms_p99"] and 0 < p["itl_ms_p50"] <= p["itl_ms_p99"]
    assert p["requests_per_s"] * p["duration_s"] == pytest.approx(4)
    # guidellm's own report and the scenario we generated are kept in --raw
    report = json.loads((raw / "guidellm_short_delay0.json").read_text())
    assert serving.parse_report(report) == run["points"]
    md = (tmp_path / "serving_smoke.md").read_text()
    assert "| short (32 -> 8) | 0 ms | 2 | 4 / 0 |" in md
    assert (tmp_path / "serving_smoke.png").stat().st_size > 1000
    assert "TTFT p50" in capsys.readouterr().out


def _point(n: int, tok_s: float, ttft: float, itl: float) -> dict:
    return {"streams": n, "successful": 8, "output_tokens_per_s": tok_s, "ttft_ms_p50": ttft, "itl_ms_p50": itl}


def test_delay_effect_pairs_same_mix_and_streams():
    runs = [{"delay_ms": 0.0, "mix": "short", "points": [_point(1, 100, 10, 5), _point(4, 200, 20, 6)]},
            {"delay_ms": 20.0, "mix": "short", "points": [_point(4, 300, 30, 3), _point(8, 1, 1, 1)]}]
    [e] = serving.delay_effect(runs)
    assert (e["mix"], e["streams"], e["delay_ms"], e["vs_delay_ms"]) == ("short", 4, 20.0, 0.0)
    assert (e["throughput_ratio"], e["ttft_p50_ratio"], e["itl_p50_ratio"]) == (1.5, 1.5, 0.5)
    assert serving.delay_effect(runs[:1]) == []


def test_scenario_is_a_guidellm_sweep():
    plan = serving.PLANS["full"]
    mix = plan.mixes[0]
    s = serving.scenario("http://127.0.0.1:1", "tiny", "/m", mix, plan, serving.Path("/r.json"))
    assert [b["profile.streams"] for b in s["benchmarks"]] == list(mix.streams)
    assert s["spec"]["constraints"][0]["count"] == [max(16, 2 * n) for n in mix.streams]
    assert s["spec"]["data"] == [{"kind": "synthetic_text", "prompt_tokens": 128, "output_tokens": 64}]


@pytest.mark.parametrize(("kw", "msg"), [
    ({"delays": "0,-5"}, "--delays entries must be in [0, 10000] ms, got -5"),
    ({"delays": "x"}, "--delays must be comma-separated numbers"),
    ({"streams": "0"}, "--streams entries must be in [1, 1024], got 0"),
    ({"requests": 0}, "--requests must be >= 1, got 0"),
    ({"mixes": "medium"}, "--mixes: unknown ['medium']"),
])
def test_bad_arguments_name_the_flag(kw, msg):
    args = SimpleNamespace(**({"smoke": False, "delays": None, "streams": None, "mixes": None, "requests": None}
                              | kw))
    with pytest.raises(ValueError) as e:
        serving.plan_from_args(args)
    assert msg in str(e.value)


def test_prompt_longer_than_the_server_allows_is_refused():
    with pytest.raises(ValueError, match="exceeds the server's max_model_len 100"):
        serving.validate_plan(serving.PLANS["full"], max_model_len=100)


def test_heap_effect_pairs_bounded_with_unbounded_and_reports_peak_rss():
    runs = [{"delay_ms": 0.0, "heap": "bounded", "mix": "long4k", "prompt_tokens": 4096, "output_tokens": 16,
             "start_rss_bytes": 2 * 2**30, "peak_rss_bytes": 3 * 2**30, "points": [_point(4, 90, 10, 5)]},
            {"delay_ms": 0.0, "heap": "unbounded", "mix": "long4k", "prompt_tokens": 4096, "output_tokens": 16,
             "start_rss_bytes": 2 * 2**30, "peak_rss_bytes": 4 * 2**30, "points": [_point(4, 100, 10, 4)]}]
    [e] = serving.heap_effect(runs)
    assert (e["mix"], e["streams"], e["delay_ms"]) == ("long4k", 4, 0.0)
    assert (e["throughput_ratio"], e["itl_p50_ratio"], e["peak_rss_ratio"]) == (0.9, 1.25, 0.75)
    assert e["tokens_ratio"] is None  # points without prompt + output throughput
    assert serving.delay_effect(runs) == []  # one delay: nothing to compare
    for p in (r["points"][0] for r in runs):
        p.update(errored=0, incomplete=0, requests_per_s=1.0, ttft_ms_p99=1.0, itl_ms_p99=1.0)
    md = serving.markdown({"smoke": False, "guidellm_version": "0.8.1", "model": "/m/x", "machine": "m",
                           "endpoint": "e", "runs": runs, "delay_effect": [], "heap_effect": [e], "seconds": 1})
    assert "| 2.00 / 3.00 |" in md and "| 0 ms, heap unbounded | 4 |" in md
    assert "| 0.90 | — | 1.00 | 1.25 | 0.75 |" in md


def test_rss_watch_reads_another_process_peak():
    """A fresh child touches 64 MiB and frees it; the watch sees the peak (not this test process: its retained
    heap, shared with the rest of the suite, can hold the 64 MiB already)."""
    import subprocess
    import sys

    from dsv4.bench.rss_watch import RssWatch, status_bytes

    code = ("import sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.readline(); "
            "a = bytearray(b'\\x01' * (64 * 2**20)); time.sleep(0.5); del a; "
            "sys.stdout.write('freed\\n'); sys.stdout.flush(); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        watch = RssWatch(child.pid, interval_s=0.01)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "freed\n"
        peak = watch.stop()
        assert status_bytes(child.pid, "VmRSS")
        assert peak is not None and peak >= watch.start_rss + 60 * 2**20, (peak, watch.start_rss)
    finally:
        child.kill()
        child.wait()
    assert RssWatch(2**31 - 1).stop() is None  # no such process
