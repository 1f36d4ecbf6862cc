"""The MTP head (`dsv4.runtime.model.mtp`) on the tiny random checkpoint, against an independent computation:
the MTP block's weights loaded into a one-layer transformers `DeepseekV4ForCausalLM` (its own sliding block,
hc_head, norm and head), whose layer input is replaced by x_k = e_proj(enorm(embed(t+1))) + h_proj(hnorm(h_k))
computed here with plain tensor ops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dsv4.runtime.checkpoint.random_init import random_tensors
from dsv4.runtime.checkpoint.writer import write_config, write_safetensors
from dsv4.runtime.config import MOE, SLIDING, tiny
from dsv4.runtime.model import ForwardBatch, cache_spec, load_model, mtp_forward, mtp_pools

from tests.model_utils import PagedRunner, one_thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny()
    out = tmp_path_factory.mktemp("mtp_tiny")
    tensors = random_tensors(cfg, seed=5)
    write_safetensors(out, tensors)
    write_config(out, cfg.to_dict())
    model, lcfg, _ = load_model(out, progress=False)
    return model, lcfg, tensors


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _reference_mtp(cfg, tensors, h: torch.Tensor, next_ids: list[int], tmp) -> torch.Tensor:
    """MTP logits [T, vocab] via transformers: a one-layer (sliding, learned routing) model holding mtp.0.*."""
    from transformers import DeepseekV4ForCausalLM

    one = dataclasses.replace(cfg, num_hidden_layers=1, layer_types=[SLIDING], mlp_layer_types=[MOE])
    p = "mtp.0."
    top = {"model.embed_tokens.weight": tensors["model.embed_tokens.weight"], "head.weight": tensors["head.weight"],
           "model.norm.weight": tensors[p + "norm.weight"], "model.hc_head.hc_fn": tensors[p + "hc_head_fn"],
           "model.hc_head.hc_base": tensors[p + "hc_head_base"], "model.hc_head.hc_scale": tensors[p + "hc_head_scale"]}
    own = ("e_proj", "h_proj", "enorm", "hnorm", "norm", "hc_head")  # MTP-only tensors; the rest is the block
    layer = {"model.layers.0." + k[len(p):]: v for k, v in tensors.items()
             if k.startswith(p) and not k[len(p):].startswith(own)}
    write_safetensors(tmp, {**top, **layer})
    write_config(tmp, one.to_dict())
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()

    eps = cfg.rms_norm_eps
    e = _rms(tensors["model.embed_tokens.weight"][torch.tensor(next_ids)], tensors[p + "enorm.weight"], eps)
    x = (e @ tensors[p + "e_proj.weight"].T)[:, None, :] + _rms(h, tensors[p + "hnorm.weight"], eps) @ \
        tensors[p + "h_proj.weight"].T

    def swap_input(_mod, args, kwargs):
        return (x[None].to(args[0].dtype),), kwargs

    handle = hf.model.layers[0].register_forward_pre_hook(swap_input, with_kwargs=True)
    try:
        with torch.no_grad():
            return hf(torch.tensor([next_ids])).logits[0]
    finally:
        handle.remove()


def test_mtp_matches_an_independent_computation(ckpt, tmp_path):
    model, cfg, tensors = ckpt
    n = 2 * cfg.sliding_window + 7  # the MTP block's window is crossed
    ids = torch.randint(0, cfg.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(3)).tolist()
    r = PagedRunner(model, cfg, max_tokens=n)
    tables = {name: [r.tables[0][name]] for name in r.tables[0]}
    main = ForwardBatch.build([(ids[:n], 0)], tables, logits="all")
    with torch.inference_mode():
        h = model.hidden_states(main, r.pools)
    nxt = ForwardBatch.build([(ids[1:], 0)], {"swa": tables["swa"]}, logits="all")
    pools = mtp_pools(cfg, r.spec, r.pools.num_blocks["swa"])
    logits, streams = mtp_forward(model, h, nxt, pools)
    assert logits.shape == (n, cfg.vocab_size) and streams.shape == h.shape
    ref = _reference_mtp(cfg, tensors, h.clone(), ids[1:], tmp_path)
    diff = (logits - ref).abs().max().item()
    assert diff <= 1e-4, f"MTP logits differ from the independent computation by {diff}"
    assert ref.abs().max().item() > 1.0
    # the head depends on both inputs: another next-token or another hidden state changes the draft
    other = ForwardBatch.build([([(t + 1) % cfg.vocab_size for t in ids[1:]], 0)], {"swa": tables["swa"]},
                               logits="all")
    l2, _ = mtp_forward(model, h, other, mtp_pools(cfg, r.spec, r.pools.num_blocks["swa"]))
    assert (l2 - logits).abs().max().item() > 1e-2


def test_mtp_decode_steps_equal_one_pass(ckpt):
    """Speculative-decoding use: the MTP block's own swa rows let it run one token at a time."""
    model, cfg, _ = ckpt
    n = cfg.sliding_window + 9
    ids = torch.randint(0, cfg.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(4)).tolist()
    r = PagedRunner(model, cfg, max_tokens=n)
    tables = {name: [r.tables[0][name]] for name in r.tables[0]}
    with torch.inference_mode():
        h = model.hidden_states(ForwardBatch.build([(ids[:n], 0)], tables, logits="all"), r.pools)
    swa = {"swa": tables["swa"]}
    full, _ = mtp_forward(model, h, ForwardBatch.build([(ids[1:], 0)], swa, logits="all"),
                          mtp_pools(cfg, r.spec, r.pools.num_blocks["swa"]))
    pools = mtp_pools(cfg, r.spec, r.pools.num_blocks["swa"])
    steps = [mtp_forward(model, h[p:p + 1], ForwardBatch.build([([ids[p + 1]], p)], swa), pools)[0]
             for p in range(n)]
    assert (torch.cat(steps) - full).abs().max().item() <= 1e-4


def test_mtp_rejects_bad_input(ckpt):
    model, cfg, _ = ckpt
    spec = cache_spec(cfg)
    pools = mtp_pools(cfg, spec, 2)
    b = ForwardBatch.build([([1, 2], 0)], {"swa": [[0]]})
    with pytest.raises(ValueError, match="h must be"):
        mtp_forward(model, torch.zeros(3, cfg.hc_mult, cfg.hidden_size), b, pools)
    with pytest.raises(ValueError, match="MTP depth 1 out of range"):
        mtp_forward(model, torch.zeros(2, cfg.hc_mult, cfg.hidden_size), b, pools, depth=1)
