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
    # the runtime's real layouts on 8 x H200: TP8 keeps one cache, DP8+EP one per GPU
    check_layouts(out["layouts"], "flash")
    assert "Layouts of one replica on 8 x H200" in (tmp_path / "capacity_flash_smoke.md").read_text()


def check_layouts(lay: dict, model: str) -> None:
    from dsv4.operator import weights as W
    from dsv4.runtime.config import preset
    from dsv4.runtime.parallel.ownership import TPConfigError, check_tp

    cfg = preset(model)
    rows = {(r["workload"], r["layout"]): r for r in lay["rows"]}
    # TP8, DP8+EP and every DP d x TP t + EP of 8 GPUs the model splits into
    inner = []
    for t in (2, 4):
        try:
            check_tp(cfg, t)
            inner.append(f"DP{8 // t}xTP{t}+EP")
        except TPConfigError:
            pass
    assert {layout for _, layout in rows} == {"TP8", "DP8+EP", *inner} and inner
    for (name, layout), r in rows.items():
        assert r["dp"] * r["tp"] == 8 and r["layout"] == (
            "TP8" if r["dp"] == 1 else f"DP{r['dp']}+EP" if r["tp"] == 1 else f"DP{r['dp']}xTP{r['tp']}+EP")
        assert r["caches"] == r["dp"]  # a TP group shares one cache; each DP rank has its own
        assert r["weights_per_gpu"] == W.weight_bytes_per_gpu_dp_tp(cfg, r["dp"], r["tp"])
        assert r["fits"] == (r["usable_per_gpu"] - r["weights_per_gpu"] - r["reserve_per_gpu"] > 0)
        assert r["sessions"] == r["caches"] * r["sessions_per_cache"] and r["tokens"] == r["sessions"] * r["length"]
        tp = rows[(name, "TP8")]["tokens"]
        if layout == "DP8+EP" and tp:
            assert lay["dp_ep_vs_tp_tokens"][name] == pytest.approx(r["tokens"] / tp)
    for name, best in lay["best"].items():
        most = max((r for r in lay["rows"] if r["workload"] == name), key=lambda r: r["tokens"])
        assert best["tokens"] == most["tokens"] and best["layout"] == (most["layout"] if most["tokens"] else None)


def test_pro_layouts_on_h200_and_b200(tmp_path) -> None:
    """Pro as DP8+EP holds 131.5 GB of weights per GPU (experts / 8; attention, shared expert, embedding and head
    whole; the MTP block is not loaded): an H200's 135.7 GB usable leaves no room for a session; TP inside the DP
    ranks splits the rest and then holds more tokens than TP8 (several caches). On B200 each of DP8+EP's 8 caches
    is about 0.6 x TP8's one, about 5x the tokens (docs/benchmarks.md)."""
    for gpu in ("H200", "B200"):
        assert main(["bench", "capacity", "--smoke", "--model", "pro", "--layouts-only", "--layout-gpu", gpu,
                     "--out", str(tmp_path)]) == 0
    stem = tmp_path / "capacity_pro_layouts_smoke"
    out = json.loads(stem.with_suffix(".json").read_text())
    assert out["workloads"] == [] and stem.with_suffix(".png").stat().st_size > 1000
    h200 = out["layouts"]
    check_layouts(h200, "pro")
    for r in h200["rows"]:  # EP alone leaves each rank the least room for a cache, and holds fewer tokens than TP8
        if r["layout"] == "DP8+EP":
            tp8 = next(t for t in h200["rows"] if t["workload"] == r["workload"] and t["layout"] == "TP8")
            assert r["cache_bytes_per_gpu"] < tp8["cache_bytes_per_gpu"] / 8 and r["tokens"] < tp8["tokens"]
    assert h200["targets"] == {"DP+EP >= 7x TP tokens (agent)": False}
    fit_with_tp_inside = [r for r in h200["rows"] if r["fits"] and r["dp"] > 1 and r["tp"] > 1]
    assert fit_with_tp_inside
    for name, best in h200["best"].items():
        assert best["layout"] in {r["layout"] for r in fit_with_tp_inside} and best["vs_tp"] > 1, name
    assert "Most tokens: agent: DP" in stem.with_suffix(".md").read_text()
    b200 = json.loads((tmp_path / "capacity_pro_B200_layouts_smoke.json").read_text())["layouts"]
    check_layouts(b200, "pro")
    assert all(r["fits"] for r in b200["rows"]) and all(4 < v < 7 for v in b200["dp_ep_vs_tp_tokens"].values())


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
