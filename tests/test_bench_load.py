"""`dsv4 bench load --smoke`: writes both checkpoint layouts, loads each in a fresh interpreter, reports
load time and the RSS the load itself added (not the parent's), and writes JSON + Markdown."""

from __future__ import annotations

import json

import torch
from dsv4.bench.load import measure

from dsv4.cli import main


def test_load_smoke_cli_and_rss_is_the_childs_own(tmp_path, capsys):
    out, work = tmp_path / "res", tmp_path / "ck"
    assert main(["bench", "load", "--smoke", "--out", str(out), "--workdir", str(work)]) == 0
    res = json.loads((out / "load_smoke.json").read_text())
    md = (out / "load_smoke.md").read_text()
    assert set(res["layouts"]) == {"hf", "fp8"} and res["command"] == "dsv4 bench load --smoke"
    hf, fp8 = res["layouts"]["hf"], res["layouts"]["fp8"]
    for m in (hf, fp8):
        assert m["meta_params"] == 0 and m["load_s"] > 0 and m["peak_reset"]
        assert 0 < m["extra_rss"] and m["peak_rss"] >= m["base_rss"]
        assert m["ratio_model"] == m["extra_rss"] / m["model_bytes"]
        assert f"| {m['files']} | {m['checkpoint_bytes'] / 1e6:.1f} |" in md
    assert hf["model_bytes"] == fp8["model_bytes"]  # the same bf16 model from both layouts
    # the bf16 checkpoint holds the model's bytes (+ headers); FP8/FP4 is well under it
    assert hf["model_bytes"] <= hf["checkpoint_bytes"] < 1.01 * hf["model_bytes"]
    assert fp8["checkpoint_bytes"] < 0.7 * hf["checkpoint_bytes"]
    assert "extra RSS" in capsys.readouterr().out

    # A parent holding a lot of memory (as the bench does right after writing the weights) must not show up as
    # the child's peak: ru_maxrss carries the parent's high-water mark across vfork + exec.
    ballast = torch.ones(400 * 2**20, dtype=torch.uint8)
    again = measure(work / "hf")
    assert again["extra_rss"] < hf["model_bytes"] + 200 * 2**20 < ballast.numel()
    del ballast


def test_load_bad_arguments_name_the_flag(tmp_path, capsys):
    assert main(["bench", "load", "--smoke", "--layouts", "gguf", "--out", str(tmp_path)]) == 2
    assert "--layouts must be a comma list of hf, fp8" in capsys.readouterr().err
    assert main(["bench", "load", "--smoke", "--layers", "99", "--out", str(tmp_path)]) == 2
    assert "--layers must be in [1, " in capsys.readouterr().err
    assert main(["bench", "load", "--smoke", "--size-mb", "0", "--out", str(tmp_path)]) == 2
    assert "--size-mb must be > 0" in capsys.readouterr().err


def test_load_smoke_tp2_reads_and_holds_rank_0s_part(tmp_path):
    out, work = tmp_path / "res", tmp_path / "ck"
    assert main(["bench", "load", "--smoke", "--layouts", "fp8", "--tp", "1,2", "--out", str(out),
                 "--workdir", str(work)]) == 0
    res = json.loads((out / "load_smoke.json").read_text())
    one, two = res["layouts"]["fp8"], res["layouts"]["fp8 tp2"]
    assert (one["tp"], two["tp"]) == (1, 2) and res["command"].endswith("--tp 1,2")
    # at smoke size the replicated parts (compressors, norms, mHC, the K=V head) are a large share of the bytes
    assert two["bytes_read"] < 0.9 * one["bytes_read"] and two["model_bytes"] < 0.75 * one["model_bytes"]
    assert one["bytes_read"] <= one["checkpoint_bytes"] and one["seq_read_bytes"] >= one["checkpoint_bytes"] * 0.99
    assert one["plain_read_bytes"] == one["seq_read_bytes"] and one["plain_MBps"] > 0
    # the rank-ranges floor reads what the load reads: every byte at TP 1, the rank's part at TP 2
    assert one["ranges_read_bytes"] >= one["bytes_read"] and two["bytes_read"] <= two["ranges_read_bytes"]
    assert two["ranges_read_bytes"] < 0.9 * one["ranges_read_bytes"]
    for m in (one, two):  # issue 17's per-rank targets, computed from the row's own figures
        assert m["target_rss_bound"] == 1.2 * m["checkpoint_bytes"] / m["tp"] + 256 * 2**20
        assert m["target_rss_ok"] == (m["extra_rss"] <= m["target_rss_bound"])
        assert m["throughput_vs_plain"] == m["read_MBps"] / m["plain_MBps"]
    assert "| fp8 tp2 |" in (out / "load_smoke.md").read_text()


def test_load_smoke_keeps_weights_quantised(tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "load", "--smoke", "--layouts", "fp8", "--weights-dtype", "checkpoint", "--out", str(out),
                 "--workdir", str(tmp_path / "ck")]) == 0
    m = json.loads((out / "load_smoke.json").read_text())["layouts"]["fp8"]
    # held as stored (norms fp32 instead of bf16): about the checkpoint, not the ~2x of the dequantised model
    assert m["weights_dtype"] == "checkpoint" and m["model_bytes"] < 1.2 * m["checkpoint_bytes"]
