"""Weights kept in their checkpoint format (`load_model(..., weights_dtype="checkpoint")`): FP8 linears and FP4
routed experts stay quantised in memory and are dequantised on the fly; outputs equal the dequantise-at-load path
(every layer kind, MTP weights included) and the model holds the checkpoint's bytes, not the bf16 ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dsv4.runtime.checkpoint.files import list_tensors
from dsv4.runtime.checkpoint.loader import TPShard
from dsv4.runtime.checkpoint.published import write_published_checkpoint
from dsv4.runtime.checkpoint.random_init import random_tensors
from dsv4.runtime.model import load_model
from dsv4.runtime.model.quantized import FP8Linear, FP8RowParallelLinear

from tests.model_utils import prefill_logits, tiny_configs


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantised_weights_equal_the_dequantised_load(tmp_path, dtype):
    cfg = tiny_configs()["mix"]
    write_published_checkpoint(cfg, random_tensors(cfg, seed=6), tmp_path, fp4_dtype="F4" if dtype == "float32"
                               else "I8")
    a, _, _ = load_model(tmp_path, progress=False, dtype=dtype, weights_dtype="checkpoint")
    b, _, _ = load_model(tmp_path, progress=False, dtype=dtype)
    fp8 = {n: m for n, m in a.named_modules() if isinstance(m, FP8Linear)}
    assert "layers.1.attn.indexer.wq_b" in fp8 and "mtp.0.e_proj" in fp8 and "layers.3.ffn.shared_experts.w2" in fp8
    assert "layers.1.attn.compressor.wkv" not in fp8  # bf16 in the published layout
    ref = dict(b.named_parameters())
    for n, m in fp8.items():
        assert torch.equal(m.weight, ref[n + ".weight"]), n
    for i, layer in enumerate(list(a.layers) + list(a.mtp)):
        ex, ex_ref = layer.ffn.experts, (list(b.layers) + list(b.mtp))[i].ffn.experts
        assert "w1_q" in dict(ex.named_buffers()) and "w1" not in dict(ex.named_parameters())
        for name in ("w1", "w2", "w3"):
            for e in range(cfg.n_routed_experts):
                assert torch.equal(ex.matrix(name, e), getattr(ex_ref, name)[e]), (i, name, e)
    held = sum(_bytes(m) for m in fp8.values()) + sum(
        t.numel() * t.element_size() for n, t in a.named_buffers() if n.endswith(("_q", "_s")))
    stored = sum(m.nbytes for m in list_tensors(tmp_path).values()
                 if m.dtype in ("F8_E4M3", "F8_E8M0", "I8", "F4"))
    assert held == stored  # the quantised tensors are held exactly as the files store them
    dequantised = sum(t.numel() * t.element_size() for n, t in b.named_parameters()
                      if ".ffn.experts." in n or n.removesuffix(".weight") in fp8)
    assert _bytes(b) - _bytes(a) == dequantised - held > 0  # everything else is held alike
    assert torch.equal(prefill_logits(a, cfg), prefill_logits(b, cfg))


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4-split-groups"])
def test_quantised_weights_per_rank_equal_the_dequantised_shard(tmp_path, world):
    """With TPShard each rank keeps its block-aligned FP8 parts (head rows of wq_b, wo_a rows / columns, wo_b and
    shared-expert columns) and its FP4 experts quantised; parts that do not fit 128-blocks stay dequantised."""
    cfg = dataclasses.replace(tiny_configs()["mix"], head_dim=128, qk_rope_head_dim=16, o_lora_rank=128,
                              moe_intermediate_size=256, n_routed_experts=8)
    write_published_checkpoint(cfg, random_tensors(cfg, seed=7), tmp_path, max_shard_bytes=2_000_000)
    for rank in range(world):
        a, _, _ = load_model(tmp_path, progress=False, dtype="float32", shard=TPShard(rank, world),
                             weights_dtype="checkpoint")
        b, _, _ = load_model(tmp_path, progress=False, dtype="float32", shard=TPShard(rank, world))
        fp8 = {n: m for n, m in a.named_modules() if isinstance(m, FP8Linear)}
        assert isinstance(fp8["layers.1.attn.wo_b"], FP8RowParallelLinear) and "layers.1.attn.wq_b" in fp8
        assert ("layers.1.ffn.shared_experts.w1" in fp8) == (world == 2)  # 256 / 4 = 64 rows: not block-aligned
        ref = dict(b.named_parameters())
        for n, m in fp8.items():
            assert torch.equal(m.weight, ref[n + ".weight"]), (rank, n)
        for la, lb in zip(a.layers, b.layers, strict=True):
            for name in ("w1", "w2", "w3"):
                for e in range(cfg.n_routed_experts // world):
                    assert torch.equal(la.ffn.experts.matrix(name, e), getattr(lb.ffn.experts, name)[e])
        assert _bytes(a) < _bytes(b)


def test_quantised_tp2_forward_equals_the_dense_model(tmp_path):
    """Two gloo ranks, each reading only its part and keeping its FP8 / FP4 weights quantised, give the dense
    (dequantise-at-load, one process) logits."""
    from dsv4.runtime.parallel.selfcheck import dense_logits, sharded_logits

    cfg = dataclasses.replace(tiny_configs()["mix"], head_dim=128, qk_rope_head_dim=16, o_lora_rank=128,
                              moe_intermediate_size=256, n_routed_experts=8)
    write_published_checkpoint(cfg, random_tensors(cfg, seed=8), tmp_path)
    dense, sharded = dense_logits(str(tmp_path)), sharded_logits(str(tmp_path), 2, weights_dtype="checkpoint")
    assert len(dense) == len(sharded) > 0
    for x, y in zip(dense, sharded, strict=True):
        assert x.shape == y.shape and float((x - y).abs().max()) < 1e-4


def test_unknown_weights_dtype_is_named(tmp_path):
    from dsv4.runtime.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"weights dtype must be one of \('bf16', 'checkpoint'\), got 'fp4'"):
        load_model(tmp_path, progress=False, weights_dtype="fp4")
