"""`dsv4 bench kv-error --smoke`: quantised KV storage measured against fp32 KV through the real model."""

from __future__ import annotations

import json

from dsv4.cli import main


def test_kv_error_smoke_cli(tmp_path, capsys):
    assert main(["bench", "kv-error", "--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kv_error_smoke.json").read_text())
    md = (tmp_path / "kv_error_smoke.md").read_text()
    assert res["command"] == "dsv4 bench kv-error --smoke" and res["seeds"] == [0]
    assert res["tokens"] == 3 * 16 + 5  # crosses every HCA boundary of the tiny preset (ratio 16) three times
    c = res["codec_rel_l2"]
    assert 0 < c["bf16"] < 2**-8 and 0.01 < c["fp8"] < 0.04  # bf16: 8 mantissa bits; e4m3: 3 + per-64 scale
    assert set(res["formats"]) == {"bf16+bf16", "fp8+fp8", "fp8+fp4"}
    for name, rows in res["formats"].items():
        (r,) = rows
        assert r["max_abs"] > 0 and 0 < r["rel_l2"] < 1 and 0 < r["argmax"] <= 1, name  # measured, not zero
        assert f"| {name} |" in md
    assert "Command: `dsv4 bench kv-error --smoke`" in md and "logits rel. L2" in capsys.readouterr().out


def test_kv_error_rejects_bad_seeds(tmp_path, capsys):
    assert main(["bench", "kv-error", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err
