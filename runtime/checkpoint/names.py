"""Tensor names and shapes of a DeepSeek-V4 checkpoint, and the mapping onto our module tree.

Two on-disk layouts exist:

* the Hugging Face layout that transformers' `save_pretrained` writes for `DeepseekV4ForCausalLM`
  (`model.layers.N.attn.wq_a.weight`, `model.embed_tokens.weight`, `model.hc_head.hc_fn`, `head.weight`);
* DeepSeek's published layout (`layers.N.attn.wq_a.weight`, `embed.weight`, `hc_head_fn`, `head.weight`,
  `mtp.0.*`), possibly with FP8 weights plus `.scale` tensors (see `quant.py`).

Our module tree (`dsv4.runtime.model`) uses the Hugging Face names without the `model.` prefix, except
that routed experts are stacked: `layers.N.ffn.experts.w1` is `[E, I, H]` and file tensor
`...experts.e.w1.weight` fills row `e`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsv4.runtime.config import CSA, HASH_MOE, SLIDING, ModelConfig

F32 = "float32"
I64 = "int64"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as stored in the Hugging Face layout: `dtype` is "param" (the model's weight dtype),
    "float32" (kept in fp32 by the reference) or "int64"."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "param"


def _block_tensors(cfg: ModelConfig, prefix: str, layer_type: str, hash_moe: bool) -> list[TensorSpec]:
    H, hd, nH = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    hc = cfg.hc_mult
    mix = (2 + hc) * hc
    out = [
        TensorSpec(f"{prefix}attn.wq_a.weight", (cfg.q_lora_rank, H)),
        TensorSpec(f"{prefix}attn.q_norm.weight", (cfg.q_lora_rank,), F32),
        TensorSpec(f"{prefix}attn.wq_b.weight", (nH * hd, cfg.q_lora_rank)),
        TensorSpec(f"{prefix}attn.wkv.weight", (hd, H)),
        TensorSpec(f"{prefix}attn.norm.weight", (hd,), F32),
        TensorSpec(f"{prefix}attn.wo_a.weight", (cfg.o_groups * cfg.o_lora_rank, nH * hd // cfg.o_groups)),
        TensorSpec(f"{prefix}attn.wo_b.weight", (H, cfg.o_groups * cfg.o_lora_rank)),
        TensorSpec(f"{prefix}attn.attn_sink", (nH,), F32),
    ]
    if layer_type != SLIDING:
        coff = 2 if layer_type == CSA else 1
        ratio = cfg.compress_rates[layer_type]
        c = f"{prefix}attn.compressor."
        out += [
            TensorSpec(c + "ape", (ratio, coff * hd), F32),
            TensorSpec(c + "wkv.weight", (coff * hd, H)),
            TensorSpec(c + "wgate.weight", (coff * hd, H)),
            TensorSpec(c + "norm.weight", (hd,), F32),
        ]
    if layer_type == CSA:
        ratio, di, ni = cfg.csa_ratio, cfg.index_head_dim, cfg.index_n_heads
        i = f"{prefix}attn.indexer."
        out += [
            TensorSpec(i + "wq_b.weight", (ni * di, cfg.q_lora_rank)),
            TensorSpec(i + "weights_proj.weight", (ni, H)),
            TensorSpec(i + "compressor.ape", (ratio, 2 * di), F32),
            TensorSpec(i + "compressor.wkv.weight", (2 * di, H)),
            TensorSpec(i + "compressor.wgate.weight", (2 * di, H)),
            TensorSpec(i + "compressor.norm.weight", (di,), F32),
        ]
    out += [
        TensorSpec(f"{prefix}attn_norm.weight", (H,), F32),
        TensorSpec(f"{prefix}ffn_norm.weight", (H,), F32),
    ]
    E, I, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    f = f"{prefix}ffn."
    out.append(TensorSpec(f + "gate.weight", (E, H)))
    if hash_moe:
        out.append(TensorSpec(f + "gate.tid2eid", (cfg.vocab_size, k), I64))
    else:
        out.append(TensorSpec(f + "gate.bias", (E,), F32))
    for e in range(E):
        out += [
            TensorSpec(f"{f}experts.{e}.w1.weight", (I, H)),
            TensorSpec(f"{f}experts.{e}.w2.weight", (H, I)),
            TensorSpec(f"{f}experts.{e}.w3.weight", (I, H)),
        ]
    out += [
        TensorSpec(f + "shared_experts.w1.weight", (I, H)),
        TensorSpec(f + "shared_experts.w2.weight", (H, I)),
        TensorSpec(f + "shared_experts.w3.weight", (I, H)),
    ]
    for sub in ("attn", "ffn"):
        out += [
            TensorSpec(f"{prefix}hc_{sub}_fn", (mix, hc * H), F32),
            TensorSpec(f"{prefix}hc_{sub}_base", (mix,), F32),
            TensorSpec(f"{prefix}hc_{sub}_scale", (3,), F32),
        ]
    return out


def mtp_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """The multi-token-prediction block(s): a sliding-only, learned-routing block plus its own head mix."""
    H, hc = cfg.hidden_size, cfg.hc_mult
    out: list[TensorSpec] = []
    for j in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{j}."
        out += _block_tensors(cfg, p, SLIDING, hash_moe=False)
        out += [
            TensorSpec(p + "e_proj.weight", (H, H)),
            TensorSpec(p + "h_proj.weight", (H, H)),
            TensorSpec(p + "enorm.weight", (H,), F32),
            TensorSpec(p + "hnorm.weight", (H,), F32),
            TensorSpec(p + "norm.weight", (H,), F32),
            TensorSpec(p + "hc_head_fn", (hc, hc * H), F32),
            TensorSpec(p + "hc_head_base", (hc,), F32),
            TensorSpec(p + "hc_head_scale", (1,), F32),
        ]
    return out


def checkpoint_tensors(cfg: ModelConfig, include_mtp: bool = True) -> list[TensorSpec]:
    """Every tensor of a Hugging Face layout checkpoint, in a stable order (transformers' names)."""
    H, hc, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    out = [TensorSpec("model.embed_tokens.weight", (V, H))]
    for i in range(cfg.num_hidden_layers):
        out += _block_tensors(cfg, f"model.layers.{i}.", cfg.layer_types[i], cfg.mlp_layer_types[i] == HASH_MOE)
    out += [
        TensorSpec("model.norm.weight", (H,), F32),
        TensorSpec("model.hc_head.hc_fn", (hc, hc * H), F32),
        TensorSpec("model.hc_head.hc_base", (hc,), F32),
        TensorSpec("model.hc_head.hc_scale", (1,), F32),
        TensorSpec("head.weight", (V, H)),
    ]
    if include_mtp:
        out += mtp_tensors(cfg)
    return out


# DeepSeek's published top-level names -> Hugging Face names.
_DEEPSEEK_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
    "head.weight": "head.weight",
}
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def canonical_name(name: str) -> str:
    """Map a file tensor name (Hugging Face or DeepSeek layout) onto the Hugging Face name."""
    if name in _DEEPSEEK_TOP:
        return _DEEPSEEK_TOP[name]
    if name.startswith("layers."):
        return "model." + name
    if name.startswith("model.mtp."):
        return name[len("model."):]
    return name


def module_target(hf_name: str) -> tuple[str, int | None]:
    """Hugging Face name -> (parameter name in our module tree, expert row or None)."""
    n = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    m = _EXPERT.match(n)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return n, None
