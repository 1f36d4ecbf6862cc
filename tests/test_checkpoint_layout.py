"""The published DeepSeek-V4 layout (`runtime/checkpoint/layout.py`): it reproduces the released files' tensor counts
and bytes, our fixture writes exactly it, and the loader reads it (I8 or F4 experts), serves from it, rejects
unknown tensors by name and skips the known extras of later releases with one warning per kind."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from dsv4.runtime.checkpoint.errors import CheckpointError
from dsv4.runtime.checkpoint.files import list_tensors
from dsv4.runtime.checkpoint.layout import published_file_entries, published_tensors
from dsv4.runtime.checkpoint.published import write_published_checkpoint
from dsv4.runtime.checkpoint.random_init import random_tensors
from dsv4.runtime.checkpoint.writer import write_safetensors
from dsv4.runtime.config import ModelConfig
from dsv4.runtime.model import load_model
from safetensors.torch import load_file, save_file

from tests import published_configs as pc
from tests.model_utils import prefill_logits, tiny_configs


@pytest.mark.parametrize("raw, count, gib", [(pc.FLASH, pc.FLASH_TENSORS, 148.6), (pc.PRO, pc.PRO_TENSORS, 805.3)],
                         ids=["flash", "pro"])
def test_inventory_reproduces_the_released_tensor_counts(raw, count, gib):
    entries = published_file_entries(ModelConfig.from_dict(raw))
    assert len(entries) == count
    assert len({e.name for e in entries}) == count
    assert sum(e.nbytes for e in entries) / 2**30 == pytest.approx(gib, abs=0.1)  # Flash ~159.6 GB, Pro ~805 GiB


def test_inventory_names_and_formats_of_the_release():
    cfg = ModelConfig.from_dict(pc.FLASH)
    by_name = {e.name: e for e in published_file_entries(cfg)}
    want = {
        "layers.0.attn.kv_norm.weight": ("BF16", (512,)),
        "mtp.0.attn.kv_norm.weight": ("BF16", (512,)),
        "layers.0.attn.wq_a.weight": ("F8_E4M3", (1024, 4096)),
        "layers.0.attn.wq_a.scale": ("F8_E8M0", (8, 32)),
        "layers.0.ffn.gate.weight": ("BF16", (256, 4096)),
        "layers.0.ffn.gate.tid2eid": ("I64", (129280, 6)),
        "layers.3.ffn.gate.bias": ("F32", (256,)),
        "layers.2.attn.indexer.weights_proj.weight": ("BF16", (64, 4096)),
        "layers.2.attn.indexer.wq_b.scale": ("F8_E8M0", (64, 8)),
        "layers.2.attn.compressor.ape": ("F32", (4, 1024)),
        "layers.3.attn.compressor.wkv.weight": ("BF16", (512, 4096)),
        "layers.0.ffn.experts.0.w1.weight": ("I8", (2048, 2048)),
        "layers.0.ffn.experts.0.w1.scale": ("F8_E8M0", (2048, 128)),
        "layers.0.ffn.experts.0.w2.scale": ("F8_E8M0", (4096, 64)),
        "layers.0.ffn.shared_experts.w1.scale": ("F8_E8M0", (16, 32)),
        "mtp.0.e_proj.weight": ("F8_E4M3", (4096, 4096)),
        "mtp.0.h_proj.scale": ("F8_E8M0", (32, 32)),
        "mtp.0.hc_head_fn": ("F32", (4, 16384)),
        "hc_head_scale": ("F32", (1,)),
        "embed.weight": ("BF16", (129280, 4096)),
    }
    assert {k: (by_name[k].dtype, by_name[k].shape) for k in want} == want
    assert "layers.0.attn.compressor.ape" not in by_name and "layers.3.attn.indexer.wq_b.weight" not in by_name
    assert not any(".attn.norm." in n for n in by_name)


def _published(tmp_path, cfg, name="pub", fp4_dtype="I8", shard=None):
    tensors = random_tensors(cfg, seed=4)
    twins = write_published_checkpoint(cfg, tensors, tmp_path / name, max_shard_bytes=shard, fp4_dtype=fp4_dtype)
    return tmp_path / name, twins


def test_fixture_writes_exactly_the_inventory(tmp_path):
    cfg = tiny_configs()["mix"]
    path, _ = _published(tmp_path, cfg, shard=150_000)
    got = {n: (m.dtype, m.shape) for n, m in list_tensors(path).items()}
    assert got == {e.name: (e.dtype, e.shape) for e in published_file_entries(cfg)}
    raw = json.loads((path / "config.json").read_text())
    assert raw["expert_dtype"] == "fp4" and raw["quantization_config"]["weight_block_size"] == [128, 128]


def _twin_dir(tmp_path, cfg, twins):
    d = tmp_path / "twin"
    write_safetensors(d, twins)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return d


@pytest.mark.parametrize("fp4_dtype", ["I8", "F4"])
def test_published_checkpoint_loads_to_its_dequantised_twin(tmp_path, fp4_dtype):
    cfg = tiny_configs()["mix"]
    path, twins = _published(tmp_path, cfg, fp4_dtype=fp4_dtype)
    if fp4_dtype == "F4":
        assert list_tensors(path)["layers.1.ffn.experts.0.w1.weight"].dtype == "F4"
    a, _, _ = load_model(path, progress=False, dtype="float32")
    b, _, _ = load_model(_twin_dir(tmp_path, cfg, twins), progress=False, dtype="float32")
    assert len(a.mtp) == 1
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(prefill_logits(a, cfg), prefill_logits(b, cfg))


def test_published_checkpoint_serves_greedy_request(tmp_path):
    from dsv4.runtime.cache.manager import CacheManager
    from dsv4.runtime.cache.spec import CacheSpec
    from dsv4.runtime.engine.engine import EngineConfig, LLMEngine
    from dsv4.runtime.engine.request import Request, SamplingParams
    from dsv4.runtime.engine.scheduler import SchedulerConfig
    from dsv4.runtime.model import KVPools
    from dsv4.runtime.tokenizer import Tokenizer, write_tokenizer

    cfg = tiny_configs()["mix"]
    path, _ = _published(tmp_path, cfg)
    write_tokenizer(path, cfg.vocab_size, 0)
    model, cfg, tok = load_model(path, progress=False)
    assert isinstance(tok, Tokenizer)
    spec = CacheSpec.from_model(cfg, kv_dtype="fp32")
    cache = CacheManager(spec, {p: 64 for p in spec.block_pools})
    pools = KVPools.for_model(cfg, spec, cache.num_blocks)
    eng = LLMEngine(model, cfg, tok, cache, pools, EngineConfig(SchedulerConfig(), max_model_len=256))
    req = Request("r", [(i * 37) % 400 + 20 for i in range(30)],
                  SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    eng.add(req)
    while eng.has_work:
        eng.step()
    out = list(req.sequences[0].output_ids)
    assert len(out) == 6 and all(0 <= t < cfg.vocab_size for t in out)


def _edit(path, fn):
    f = path / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def test_unknown_tensor_is_named_and_known_extras_are_skipped(tmp_path, caplog):
    cfg = tiny_configs()["mix"]
    path, _ = _published(tmp_path, cfg)
    _edit(path, lambda t: t.__setitem__("layers.1.attn.mystery.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.1\.attn\.mystery\.weight"):
        load_model(path, progress=False)

    _edit(path, lambda t: t.pop("layers.1.attn.mystery.weight"))
    _edit(path, lambda t: t.pop("layers.1.attn.wq_a.scale"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_a\.weight is F8_E4M3 but its scale .* missing"):
        load_model(path, progress=False)

    path, _ = _published(tmp_path, cfg, name="dspark")
    extra = {"mtp.1.e_proj.weight": torch.zeros(4, 4), "mtp.1.e_proj.scale": torch.ones(1, 1),
             "mtp.0.main_proj.weight": torch.zeros(4, 4)}
    _edit(path, lambda t: t.update(extra))
    with pytest.raises(CheckpointError, match=r"unexpected.*mtp\.0\.main_proj\.weight"):
        load_model(path, progress=False)  # without the variant's config keys they are not known extras
    raw = json.loads((path / "config.json").read_text())
    raw.update(dspark_num_stages=3, dspark_target_layer_ids=[1, 2])
    (path / "config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="dsv4.checkpoint"):
        model, _, _ = load_model(path, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "dsv4.checkpoint"]
    assert len(lines) == 1 and "DSpark" in lines[0] and "2 config key(s)" in lines[0] and "2 tensor(s)" in lines[0]
    assert len(model.mtp) == 1


def test_held_dtypes_follow_the_inventory():
    """Norms are stored bf16 and held fp32; ape, sinks, mHC and biases fp32; tid2eid int64; the rest the weights'
    dtype (what the Hugging Face layout spec, random init and the model use)."""
    from dsv4.runtime.checkpoint.names import checkpoint_tensors

    cfg = tiny_configs()["mix"]
    held = {s.name: s.dtype for s in checkpoint_tensors(cfg)}
    assert held["model.layers.0.attn.norm.weight"] == "float32"
    assert held["model.layers.0.ffn.gate.tid2eid"] == "int64"
    assert held["model.layers.1.attn.compressor.wkv.weight"] == "param"
    assert len(held) == len(published_tensors(cfg))
