"""`dsv4 bench scheduler --smoke`: the real serving engine, step time split into forward and the rest."""

from __future__ import annotations

import json

import pytest
from dsv4.bench import scheduler

from dsv4.cli import main


def test_scheduler_smoke_cli(tmp_path, capsys):
    assert main(["bench", "scheduler", "--smoke", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "scheduler_smoke.json").read_text())
    assert [r["running"] for r in out["results"]] == [8, 32]
    for r in out["results"]:
        m = r["median_s"]
        assert r["steps"] == 5
        assert 0 < m["forward"] < m["step"]
        for part in ("schedule", "batch", "commit", "sample", "observer"):
            assert m[part] > 0, part  # every wrapped phase ran in every step
        assert 0 < r["overhead_fraction"] < 1
        # the parts are measured inside the step: together they cannot exceed it
        assert sum(m[p] for p in ("forward", "schedule", "batch", "commit", "sample", "observer")) <= m["step"]
    assert out["targets"]["overhead <= 10% of step at 64 running"] is None  # smoke has no size 64
    md = (tmp_path / "scheduler_smoke.md").read_text()
    assert "| 8 |" in md and "| 32 |" in md and "not measured (no size 64)" in md
    assert (tmp_path / "scheduler_smoke.png").stat().st_size > 1000
    assert "overhead % of step" in capsys.readouterr().out


@pytest.mark.parametrize(("kw", "msg"), [
    ({"sizes": (0,)}, "--sizes entries must be in [1, 4096], got 0"),
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"threads": 0}, "--threads must be >= 1, got 0"),
    ({"budget_gib": 0.0}, "--budget-gib must be in (0, 64], got 0"),
])
def test_bad_arguments_name_the_flag(kw, msg):
    args = {"sizes": (8,), "steps": 1, "smoke": True} | kw
    with pytest.raises(ValueError) as e:
        scheduler.run_scheduler(**args)
    assert msg in str(e.value)


def test_bad_sizes_text_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="--sizes must be comma-separated integers"):
        main(["bench", "scheduler", "--sizes", "8,x", "--out", str(tmp_path)])
