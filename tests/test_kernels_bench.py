"""`dsv4 bench kernels` on CPU: torch references at smoke size, JSON + Markdown written."""

from __future__ import annotations

import json

from dsv4.bench import kernels as bench


def test_bench_kernels_cpu_smoke(tmp_path):
    out = bench.run_kernels(smoke=True, device="cpu", reps=1)
    kinds = {(r["kernel"], r["kv"]) for r in out["rows"]}
    assert kinds == {("csa_attn", "fp8"), ("csa_attn", "bf16"), ("hca_attn", "fp8"), ("hca_attn", "bf16"),
                     ("idx_scan", "bf16"), ("idx_scan", "fp8"), ("idx_scan", "fp4"), ("idx_topk", "fp32"),
                     ("fp8_gemm", "fp8"), ("fp4_moe", "fp4")}
    assert all(r["backend"] == "torch" and r["us"] > 0 and r["gbps"] > 0 for r in out["rows"])
    # bytes follow the row format: an fp8 row is 584 B, a bf16 row 1024 B (same rows otherwise)
    by = {(r["kernel"], r["kv"], r["batch"]): r["mbytes"] for r in out["rows"]}
    assert by[("csa_attn", "bf16", 1)] > by[("csa_attn", "fp8", 1)]
    assert by[("idx_scan", "bf16", 4)] > by[("idx_scan", "fp8", 4)] > by[("idx_scan", "fp4", 4)]
    gemms = [r for r in out["rows"] if r["kernel"] in bench.GEMMS]
    assert {(r["kernel"], r["batch"]) for r in gemms} == {(k, t) for k in bench.GEMMS for t in (1, 4)}
    assert all(r["context"] == 0 and r["tflops"] > 0 for r in gemms)
    # one token reaches 6 experts' weights, four tokens more of them (16 experts at smoke size)
    assert by[("fp4_moe", "fp4", 4)] > by[("fp4_moe", "fp4", 1)]
    paths = bench.write_results(out, tmp_path)
    assert json.loads(paths["json"].read_text())["smoke"] is True
    md = paths["md"].read_text()
    assert "| csa_attn | fp8 | 2048 | 1 | torch |" in md and "| fp8_gemm | fp8 | 0 | 4 | torch |" in md


def test_bench_kernels_only_filter():
    out = bench.run_kernels(smoke=True, device="cpu", reps=1, only=["idx_topk"])
    assert {r["kernel"] for r in out["rows"]} == {"idx_topk"} and len(out["rows"]) == 2  # batch 1 and 4


def test_peak_table():
    assert bench._peak("NVIDIA H200", None) == 4800.0
    assert bench._peak("NVIDIA H100 80GB HBM3", None) == 3350.0
    assert bench._peak("weird gpu", None) is None and bench._peak("weird gpu", 1000.0) == 1000.0
