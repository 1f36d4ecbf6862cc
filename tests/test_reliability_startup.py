"""Start-up faults against the real `dsv4 serve` subprocess: a corrupt or truncated checkpoint, a cache budget too
small for the pools, fixed pools larger than host memory -> a clear error with the numbers and a non-zero exit
(never a traceback, never a hang). An accelerator-sized budget on CPU is clamped to host memory (the guard)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dsv4.runtime.server.build import ensure_tiny_model
from dsv4.runtime.server.launch import free_port, start_server
from dsv4.runtime.server.memory_guard import check_cpu_blocks, clamp_cpu_budget, pools_bytes

GiB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ckpt") / "tiny"
    ensure_tiny_model(p, say=lambda *_: None)
    return p


def broken_copy(tiny: Path, dst: Path, how: str) -> Path:
    shutil.copytree(tiny, dst)
    st = dst / "model.safetensors"
    if how == "truncated":
        os.truncate(st, st.stat().st_size // 2)
    elif how == "corrupt-header":
        with open(st, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage{")
    elif how == "bad-config":
        (dst / "config.json").write_text('{"hidden_size": ')
    elif how == "missing-weights":
        st.unlink()
    return dst


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dsv4.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("how, needles", [
    ("truncated", ["truncated", "bytes"]),
    ("corrupt-header", ["model.safetensors"]),
    ("bad-config", ["config.json", "not valid JSON"]),
    ("missing-weights", ["no *.safetensors"]),
])
def test_broken_checkpoint_clear_error_nonzero_exit(tiny, tmp_path, how, needles):
    r = serve("--model", str(broken_copy(tiny, tmp_path / how, how)))
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dsv4 serve: error: CheckpointError:"), r.stderr[-3000:]
    assert all(n in last for n in needles), last
    assert "Traceback" not in r.stderr


def test_budget_too_small_names_the_numbers(tiny):
    r = serve("--model", str(tiny), "--cache-budget-gib", "0.0001")
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "CacheConfigError" in last and "budget_bytes 107374" in last and "needs" in last, last
    assert "Traceback" not in r.stderr


def test_fixed_pools_larger_than_host_memory_refused(tiny):
    r = serve("--model", str(tiny), "--num-blocks", "100000000", "--device", "cpu")
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "num_blocks needs" in last and "GiB of available host memory" in last, last


def test_accelerator_sized_budget_is_clamped_on_cpu(tiny):
    # 124 GiB is what the planner gives an H200 replica; on CPU it must shrink to a share of host RAM
    sp = start_server(["--model", str(tiny), "--device", "cpu", "--cache-budget-gib", "124",
                       "--host-memory-fraction", "0.005"])
    try:
        log = sp.log()
        assert "exceeds host_memory_fraction 0.005" in log and "clamped to" in log, log[-3000:]
        total_mib = float(log.split("  total ")[1].split(" MiB")[0])
        assert total_mib * 2**20 < 124 * GiB * 0.01
        code, body = sp.get("/v1/models")
        assert code == 200 and json.loads(body)["data"][0]["max_model_len"] > 0
    finally:
        assert sp.stop() == 0


def test_guard_rules_pure():
    assert clamp_cpu_budget(10 * GiB, 8 * GiB, 0.5) == (4 * GiB, clamp_cpu_budget(10 * GiB, 8 * GiB, 0.5)[1])
    assert "clamped to 4.00 GiB" in clamp_cpu_budget(10 * GiB, 8 * GiB, 0.5)[1]
    assert clamp_cpu_budget(1 * GiB, 8 * GiB, 0.5) == (1 * GiB, None)
    assert check_cpu_blocks(3 * GiB, 8 * GiB, 0.5) is None
    assert "5.00 GiB of cache pools" in check_cpu_blocks(5 * GiB, 8 * GiB, 0.5)

    class P:
        def __init__(self, b):
            self.bytes_per_block = b

    class S:
        pools = {"swa": P(10), "csa": P(4), "idx": P(2)}

    assert pools_bytes(S, {"swa": 3, "csa": 5}) == 30 + 20 + 10  # idx follows csa's block count
