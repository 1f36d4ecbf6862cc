"""Tensor-parallel building blocks: the split rules, the step wire format, sharded forward == dense forward
(real gloo ranks), the operator's TP config accepted by `dsv4 serve`, and a bad TP size refused before start."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from dsv4.runtime.config import tiny
from dsv4.runtime.model import ForwardBatch
from dsv4.runtime.parallel.codec import CMD_STEP, CodecError, decode, encode
from dsv4.runtime.parallel.shard import TPConfigError, check_tp


def test_check_tp_names_the_field():
    cfg = tiny()  # 8 heads, 2 output groups, 8 experts, shared width 64, vocab 1024
    for tp in (1, 2, 4, 8):
        check_tp(cfg, tp)
    with pytest.raises(TPConfigError, match="num_attention_heads"):
        check_tp(cfg, 3)
    with pytest.raises(TPConfigError, match="tp must be >= 1"):
        check_tp(cfg, 0)
    odd = tiny()
    odd.o_groups, odd.num_attention_heads, odd.n_routed_experts = 3, 12, 12
    with pytest.raises(TPConfigError, match="o_groups"):
        check_tp(odd, 2 * 2)  # 4 divides 12 heads and experts, but neither 4 | 3 nor 3 | 4


def test_codec_round_trip_and_errors():
    b = ForwardBatch.build([([5, 6, 7], 0), ([9], 40)],
                           {"swa": [[1, 2], [3, 4, 5]], "csa": [[0], [2]], "csa_state": [[7], [8, 9]]},
                           recompute_until=[0, 16], logits="all")
    b.logits_indices = b.logits_indices[:0]  # a step without logits rows travels too
    header, payload = encode(b, CMD_STEP, seq_no=7)
    assert int(header[0]) == CMD_STEP and int(header[1]) == 7
    d = decode(header, payload)
    for name in ("input_ids", "positions", "query_start", "recompute_until", "logits_indices"):
        assert torch.equal(getattr(d, name), getattr(b, name)), name
    assert set(d.block_tables) == {"swa", "csa", "csa_state"}
    for p, t in b.block_tables.items():
        assert torch.equal(d.block_tables[p], t), p
    with pytest.raises(CodecError, match="payload has"):
        decode(header, payload[:-1])
    b.block_tables["bogus"] = b.block_tables["swa"]
    with pytest.raises(CodecError, match="bogus"):
        encode(b)


def _tiny_dir() -> str:
    from dsv4.runtime.server.build import ensure_tiny_model
    from dsv4.runtime.server.config import default_model_dir

    d = default_model_dir()
    ensure_tiny_model(d)
    return str(d)


@pytest.mark.slow
def test_sharded_forward_equals_dense_tp4():
    """Four gloo ranks on the tiny model (2 output groups): two ranks share each group's wo_a columns, the path
    the TP 2 server tests (whole groups per rank, tests/test_tp_serve.py) do not take."""
    tp = 4
    from dsv4.runtime.parallel.selfcheck import dense_logits, sharded_logits

    d = _tiny_dir()
    dense, sharded = dense_logits(d), sharded_logits(d, tp)
    assert len(dense) == len(sharded) == 6
    for x, y in zip(dense, sharded, strict=True):
        assert x.shape == y.shape
        assert torch.equal(x.argmax(-1), y.argmax(-1))
        assert float((x - y).abs().max()) < 1e-4
        lx, ly = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        assert float((lx - ly).abs().max()) < 1e-5


def test_operator_tp_config_is_accepted_by_serve():
    """The ConfigMap of a TP2 plan (key `tp`) is a valid `dsv4 serve --config` file as a whole."""
    from dsv4.operator import api, manifests
    from dsv4.operator.planner import plan
    from dsv4.runtime.server.config import ServeConfig

    spec = api.parse_spec({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                           "accelerator": {"type": "cpu", "gpusPerNode": 2},
                           "overrides": {"tensorParallelSize": 2}, "replicas": 1})
    p = plan(spec)
    assert p.tensor_parallel_size == 2
    ref = manifests.EndpointRef("chat", "ns", "uid")
    values = yaml.safe_load(manifests.config_map(ref, spec, p)["data"]["config.yaml"])
    cfg = ServeConfig.build(file_values=values)
    assert cfg.tp == 2 and cfg.tp_timeout_s == 60.0


def test_serve_refuses_a_tp_size_the_model_cannot_split():
    r = subprocess.run([sys.executable, "-m", "dsv4.cli", "serve", "--device", "cpu", "--tp", "3",
                        "--model", _tiny_dir()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "tp=3 must divide the model's num_attention_heads (8)" in r.stderr, r.stderr[-2000:]
    assert "started rank" not in r.stderr  # refused before any worker process
