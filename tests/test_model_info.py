"""`dsv4 model info` on published-layout checkpoints: true parameter counts (packed FP4 = 2 per byte, scales are
not parameters), bytes per dtype, and weight bytes per GPU at TP 1/2/4/8 — equal to what the planner's
`operator/weights.py` computes from the config alone."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from dsv4.operator import weights as W
from dsv4.runtime.checkpoint.files import list_tensors
from dsv4.runtime.checkpoint.inspect import checkpoint_info
from dsv4.runtime.checkpoint.published import write_published_checkpoint
from dsv4.runtime.checkpoint.random_init import random_tensors

from dsv4.cli import main as cli
from tests.model_utils import tiny_configs


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(tiny_configs()["mix"], n_routed_experts=8)  # splits over TP 1, 2 and 4


@pytest.mark.parametrize("fp4_dtype", ["I8", "F4"])
def test_info_equals_the_planner_on_a_published_checkpoint(tmp_path, cfg, fp4_dtype):
    path = tmp_path / fp4_dtype
    write_published_checkpoint(cfg, random_tensors(cfg, seed=1), path, max_shard_bytes=100_000, fp4_dtype=fp4_dtype)
    info = checkpoint_info(path)
    index = list_tensors(path)
    assert info["parameters"] == W.param_counts(cfg).total
    stored = sum(math.prod(m.shape) for n, m in index.items() if not n.endswith(".scale"))
    packed = sum(math.prod(m.shape) for m in index.values() if m.dtype == "I8")
    assert info["parameters"] == stored + packed  # an I8 byte holds two parameters; F4 headers are logical
    assert sum(info["bytes per dtype"].values()) == W.weight_bytes(cfg, "fp8-fp4")
    assert {"F8_E4M3", "F8_E8M0", "BF16", "F32", "I64", fp4_dtype} == set(info["bytes per dtype"])
    per_gpu = info["weight bytes per GPU (TP)"]
    for tp in (1, 2, 4):
        assert per_gpu[tp] == W.weight_bytes_per_gpu(cfg, tp, "fp8-fp4"), tp
    assert per_gpu[1] > per_gpu[2] > per_gpu[4] > per_gpu[1] / 4  # replicated parts stay whole
    assert per_gpu[8].startswith("n/a (tp=8 must divide the model's num_attention_heads")


def test_info_cli_prints_per_gpu_bytes(tmp_path, cfg, capsys):
    write_published_checkpoint(cfg, random_tensors(cfg, seed=1), tmp_path)
    assert cli(["model", "info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weight bytes per GPU (TP)"]["2"] == W.weight_bytes_per_gpu(cfg, 2)
    assert cli(["model", "info", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "weight bytes per GPU (TP):" in x)
    assert f"1: {W.weight_bytes_per_gpu(cfg, 1) / 1e6:.2f} MB, 2: " in line and "8: n/a (tp=8 must divide" in line
