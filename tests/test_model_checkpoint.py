"""Checkpoint tooling: init-random layout vs transformers, loader errors, shards, FP8/FP4 weights, tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dsv4.runtime.checkpoint.errors import CheckpointError
from dsv4.runtime.checkpoint.quant import dequantize, quantize_fp4, quantize_fp8
from dsv4.runtime.checkpoint.random_init import write_random_checkpoint
from dsv4.runtime.config import tiny
from dsv4.runtime.model import load_model
from dsv4.runtime.tokenizer import BOS, EOS, Tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4.cli import main as cli
from tests.model_utils import PagedRunner, tiny_configs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert cli(["model", "init-random", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    return out


def _names_shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_init_random_matches_transformers_layout(tiny_dir, tmp_path):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    raw = json.loads((tiny_dir / "config.json").read_text())
    hc = DeepseekV4Config(**raw)
    assert hc.layer_types == tiny().layer_types and hc.qk_rope_head_dim == tiny().qk_rope_head_dim
    DeepseekV4ForCausalLM(hc).save_pretrained(tmp_path)
    theirs = _names_shapes(tmp_path / "model.safetensors")
    ours = {k: v for k, v in _names_shapes(tiny_dir / "model.safetensors").items() if not k.startswith("mtp.")}
    assert ours == theirs
    # and transformers loads our checkpoint (MTP tensors are ignored there)
    m = DeepseekV4ForCausalLM.from_pretrained(tiny_dir)
    ours_t = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(m.model.layers[0].mlp.gate.tid2eid, ours_t["model.layers.0.ffn.gate.tid2eid"])


def test_init_random_deterministic_and_if_missing(tiny_dir, tmp_path, capsys):
    assert cli(["model", "init-random", "--preset", "tiny", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert (tmp_path / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    before = (tmp_path / "model.safetensors").stat().st_mtime_ns
    assert cli(["model", "init-random", "--out", str(tmp_path), "--seed", "3", "--if-missing"]) == 0
    assert (tmp_path / "model.safetensors").stat().st_mtime_ns == before
    assert "nothing to do" in capsys.readouterr().out
    # a checkpoint from an older generator revision (stale stamp) or other settings is rewritten, not kept
    (tmp_path / "dsv4-generator.json").write_text('{"fingerprint": "an older revision"}')
    assert cli(["model", "init-random", "--out", str(tmp_path), "--seed", "3", "--if-missing"]) == 0
    assert "rewriting it" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert cli(["model", "init-random", "--out", str(tmp_path), "--seed", "4", "--if-missing"]) == 0
    assert "rewriting it" in capsys.readouterr().out
    assert (tmp_path / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert cli(["model", "info", str(tmp_path)]) == 0
    assert "1 sliding, 3 CSA, 2 HCA" in capsys.readouterr().out


def test_load_model_runs_and_loads_mtp(tiny_dir):
    model, cfg, tok = load_model(tiny_dir, progress=False)
    assert len(model.mtp) == cfg.num_nextn_predict_layers == 1
    ref = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(model.mtp[0].e_proj.weight, ref["mtp.0.e_proj.weight"])
    assert torch.equal(model.layers[3].ffn.experts.w2[5], ref["model.layers.3.ffn.experts.5.w2.weight"])
    ids = tok.encode_chat([{"role": "user", "content": "hello world"}])
    logits = PagedRunner(model, cfg, max_tokens=64).step([(0, ids, 0)], logits="last")
    assert logits.shape == (1, cfg.vocab_size) and torch.isfinite(logits).all()


def test_sharded_checkpoint_with_index(tmp_path):
    cfg = tiny_configs()["mix"]
    write_random_checkpoint(cfg, tmp_path / "one", seed=1)
    write_random_checkpoint(cfg, tmp_path / "many", seed=1, max_shard_bytes=200_000)
    idx = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    a, _, _ = load_model(tmp_path / "one", progress=False)
    b, _, _ = load_model(tmp_path / "many", progress=False)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, fn):
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def test_loader_errors_are_clear(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "missing")
    _edit_tensors(d, lambda t: t.pop("model.layers.2.attn.compressor.wkv.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.2\.attn\.compressor\.wkv\.weight.*\[64, 128\]"):
        load_model(d, progress=False)

    d = _copy(tiny_dir, tmp_path / "shape")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.1.attn.wq_a.weight", torch.zeros(32, 128)))
    with pytest.raises(CheckpointError, match=r"wq_a\.weight has shape \[32, 128\], expected \[64, 128\]"):
        load_model(d, progress=False)

    d = _copy(tiny_dir, tmp_path / "extra")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.0.attn.bogus", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.attn\.bogus"):
        load_model(d, progress=False)

    d = _copy(tiny_dir, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(d, progress=False)

    d = _copy(tiny_dir, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        load_model(d, progress=False)

    d = _copy(tiny_dir, tmp_path / "mtype")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"unknown model_type 'llama'"):
        load_model(d, progress=False)

    (d / "config.json").write_text(json.dumps({**raw, "num_experts_per_tok": 99}))
    msg = r"config\.json: num_experts_per_tok must be in \[1, n_routed_experts=8\]"
    with pytest.raises(CheckpointError, match=msg):
        load_model(d, progress=False)

    d = _copy(tiny_dir, tmp_path / "tid")
    _edit_tensors(d, lambda t: t["model.layers.0.ffn.gate.tid2eid"].__setitem__((0, 0), 42))
    with pytest.raises(CheckpointError, match=r"tid2eid holds expert ids in \[0, 42\]"):
        load_model(d, progress=False)


def test_cli_error_has_no_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert cli(["model", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model_type 'gpt2'" in err and "Traceback" not in err


def test_quant_roundtrip_bounds():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    q, s = quantize_fp8(w)
    w8 = dequantize(q, s, (300, 200), "w")
    sfull = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal half-step 2^-10 of the block scale
    assert ((w8 - w).abs() <= w.abs() * 2**-4 + sfull * 2**-10 + 1e-7).all()
    p, s4 = quantize_fp4(w[:, :192])
    w4 = dequantize(p, torch.log2(s4).add(127).to(torch.uint8), (300, 192), "w")
    blk = w[:, :192].abs().view(300, 6, 32).amax(-1).repeat_interleave(32, 1)
    assert ((w4 - w[:, :192]).abs() <= blk / 3 + 1e-6).all()  # half an e2m1 step at most


def test_fp8_fp4_published_layout_matches_dequantized_twin(tmp_path):
    """DeepSeek's layout (`layout.py`: top-level names, kv_norm, FP8 weights + E8M0 block scales, FP4 routed experts,
    bf16 norms / gate / compressors) loads and equals a twin holding the dequantised weights under HF names."""
    from dsv4.runtime.checkpoint.published import write_published_checkpoint

    cfg = tiny_configs()["mix"]
    write_random_checkpoint(cfg, tmp_path / "src", seed=2)
    t = load_file(str(tmp_path / "src" / "model.safetensors"))
    twin = write_published_checkpoint(cfg, t, tmp_path / "fp8")
    assert set(twin) == set(t)
    (tmp_path / "twin").mkdir()
    shutil.copy(tmp_path / "src" / "config.json", tmp_path / "twin" / "config.json")
    save_file(twin, str(tmp_path / "twin" / "model.safetensors"))
    a, _, _ = load_model(tmp_path / "fp8", progress=False, dtype="float32")
    b, _, _ = load_model(tmp_path / "twin", progress=False, dtype="float32")
    for (k, v), (_, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(v, v2), k
    ids = list(range(5, 45))
    la = PagedRunner(a, cfg, max_tokens=64).step([(0, ids, 0)])
    lb = PagedRunner(b, cfg, max_tokens=64).step([(0, ids, 0)])
    assert (la - lb).abs().max().item() <= 1e-5


def test_tokenizer_roundtrip_and_chat_template(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.vocab_size == tiny().vocab_size
    assert tok.bos_token_id == tiny().bos_token_id == 0 and tok.eos_token_id == tiny().eos_token_id == 1
    text = "Hello world, the model answers: 42 ünïcødé 🙂"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"}], chat_template_kwargs={"thinking": False})
    assert prompt == BOS + "Be brief.<｜User｜>hi<｜Assistant｜></think>"
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_token_id and EOS not in tok.decode(ids)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200)], ids=["whole-blocks", "ragged"])
def test_dequantize_equals_the_format_definition(shape):
    """W = q · s(block) (FP8, 128x128 blocks) and W = e2m1(code) · s(row, col // 32) (FP4, low nibble = even
    column), element by element, for whole and ragged block grids and both scale encodings."""
    from dsv4.runtime.checkpoint.quant import E2M1

    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)
    q, s = quantize_fp8(w)
    want = q.float() * s[torch.arange(shape[0])[:, None] // 128, torch.arange(shape[1])[None, :] // 128]
    for enc in (s, torch.log2(s).add(127).to(torch.uint8)):
        assert torch.equal(dequantize(q, enc, shape, "w"), want)
    cols = shape[1] // 32 * 32
    p, s4 = quantize_fp4(w[:, :cols])
    b = p.long()
    codes = torch.stack([b & 15, b >> 4], dim=-1).reshape(shape[0], cols)
    want4 = E2M1[codes] * s4[:, torch.arange(cols) // 32]
    for enc in (s4, torch.log2(s4).add(127).to(torch.uint8)):
        assert torch.equal(dequantize(p, enc, (shape[0], cols), "w"), want4)


def test_fp4_codes_are_the_nearest_e2m1_value_ties_to_the_smaller_magnitude():
    """`quant.quantize_fp4` picks, for every element, the e2m1 value nearest to x / scale (the first of E2M1 on a
    tie; a value rounding to zero is +0), exactly what argmin over |x / scale - E2M1| gives."""
    from dsv4.runtime.checkpoint.quant import E2M1, FP4_BLOCK, quantize_fp4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g) * torch.rand(32, 1, generator=g) * 10
    w[0, :FP4_BLOCK] = 0.1  # one block of exact ties (its amax is 6: scale 1)
    w[0, :14] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 0.0, -0.0, 6.0, -6.0])
    packed, scale = quantize_fp4(w)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(32, 256).long()
    x = w / scale.repeat_interleave(FP4_BLOCK, dim=1)
    nearest = (x[..., None] - E2M1).abs().argmin(dim=-1)
    assert torch.equal(codes, nearest)
    assert float(scale[0, 0]) == 1.0
    assert codes[0, :14].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 9, 14, 0, 0, 7, 15]
