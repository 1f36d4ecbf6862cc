"""`dsv4 bench parallel --smoke`: one replica as 1 rank, TP2 and DP2+EP through live servers."""

from __future__ import annotations

import json

import pytest

from dsv4.cli import main

pytestmark = pytest.mark.slow


def test_parallel_smoke_cli(tmp_path, capsys):
    assert main(["bench", "parallel", "--smoke", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "parallel_smoke.json").read_text())
    assert out["layouts"] == ["1 rank", "TP2", "DP2+EP"] and [r["batch"] for r in out["results"]] == [2]
    for r in out["results"]:
        for name, m in r["layouts"].items():
            assert m["tokens"] == 2 * 4, name  # every layout generated what was asked, counted by its /metrics
            assert m["steps"] >= 4 and m["mean_step_ms"] > 0, name
        tp, dp = r["layouts"]["TP2"], r["layouts"]["DP2+EP"]
        assert r["dp_over_tp_step_time"] == pytest.approx(dp["mean_step_ms"] / tp["mean_step_ms"])
    assert "DP2+EP / TP2 step time" in (tmp_path / "parallel_smoke.md").read_text()
    assert (tmp_path / "parallel_smoke.png").stat().st_size > 1000
    assert "[3/3]" in capsys.readouterr().out
