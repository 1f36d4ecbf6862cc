"""`dsv4 bench capacity --smoke`: runs the real allocator, writes JSON/Markdown/PNG, numbers are physical."""

from __future__ import annotations

import json

import pytest
from dsv4.bench.weights import weight_bytes
from dsv4.runtime.config import flash, pro

from dsv4.cli import main


def test_weight_formula_matches_published_totals():
    assert weight_bytes(flash(), include_mtp=False).total_params / 1e9 == pytest.approx(284, rel=0.01)
    assert weight_bytes(pro(), include_mtp=False).total_params / 1e12 == pytest.approx(1.6, rel=0.02)
    w = weight_bytes(flash())
    assert 150e9 < w.bytes < 170e9  # FP4 experts + FP8 rest


def test_capacity_smoke_cli(tmp_path, capsys):
    assert main(["bench", "capacity", "--smoke", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "capacity_flash_smoke.json").read_text())
    assert (tmp_path / "capacity_flash_smoke.png").stat().st_size > 1000
    assert "| recompute |" in (tmp_path / "capacity_flash_smoke.md").read_text()
    slope = out["slope_bytes_per_token"]
    for res in out["workloads"]:
        pol = res["policies"]
        assert set(pol) == {"full", "checkpoint", "recompute"}
        for r in pol.values():
            # nothing can hold more unique compressed history than the budget pays for
            assert r["unique_tokens_held"] * slope <= out["budget_bytes"]
            assert r["bytes_used"] <= r["bytes_allocated"] <= out["budget_bytes"]
            assert r["context_tokens_held"] >= r["unique_tokens_held"]  # the shared prefix counts per session
        assert pol["recompute"]["unique_tokens_held"] > pol["full"]["unique_tokens_held"]
        assert pol["full"]["recompute_tokens"] == 0 and pol["recompute"]["swa_checkpoints_kept"] == 0
        assert res["dense_v32_tokens"] < res["physical_bound_tokens"]
    assert "physical bound" in capsys.readouterr().out


def test_online_hca_state_frees_fixed_bytes_for_history(tmp_path):
    """`--hca-state online` shrinks the per-running-request state, and the same allocator then holds more."""
    assert main(["bench", "capacity", "--smoke", "--workload", "chat", "--out", str(tmp_path)]) == 0
    assert main(["bench", "capacity", "--smoke", "--workload", "chat", "--hca-state", "online",
                 "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "capacity_flash_chat_smoke.json").read_text())
    on = json.loads((tmp_path / "capacity_flash_chat_hca_online_smoke.json").read_text())
    assert on["hca_state"] == "online" and raw["hca_state"] == "raw"
    assert on["slope_bytes_per_token"] == raw["slope_bytes_per_token"]
    assert on["fixed_bytes_per_request"] < 0.5 * raw["fixed_bytes_per_request"]
    r, o = raw["workloads"][0], on["workloads"][0]
    assert o["physical_bound_tokens"] > r["physical_bound_tokens"]
    assert o["policies"]["recompute"]["unique_tokens_held"] > r["policies"]["recompute"]["unique_tokens_held"]
