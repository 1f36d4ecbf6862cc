"""Tensor names and shapes of a DeepSeek-V4 checkpoint, and the mapping onto our module tree.

Two on-disk layouts exist, both derived from the one inventory in `layout.py`:

* DeepSeek's published layout (`layers.N.attn.wq_a.weight` + `.scale`, `layers.N.attn.kv_norm.weight`,
  `embed.weight`, `hc_head_fn`, `head.weight`, `mtp.0.*`), FP8 / FP4 weights with `.scale` tensors (`quant.py`);
* the Hugging Face layout that transformers' `save_pretrained` writes for `DeepseekV4ForCausalLM`
  (`model.layers.N.attn.wq_a.weight`, `model.layers.N.attn.norm.weight`, `model.embed_tokens.weight`,
  `model.hc_head.hc_fn`, `head.weight`), our canonical names (`layout.hf_name`).

Our module tree (`dsv4.runtime.model`) uses the Hugging Face names without the `model.` prefix, except
that routed experts are stacked: `layers.N.ffn.experts.w1` is `[E, I, H]` and file tensor
`...experts.e.w1.weight` fills row `e`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsv4.runtime.checkpoint.layout import hf_name, published_tensors
from dsv4.runtime.config import ModelConfig

F32 = "float32"
I64 = "int64"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as stored in the Hugging Face layout: `dtype` is "param" (the model's weight dtype),
    "float32" (kept in fp32 by the reference) or "int64"."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "param"


def checkpoint_tensors(cfg: ModelConfig, include_mtp: bool = True) -> list[TensorSpec]:
    """Every tensor of a Hugging Face layout checkpoint, in a stable order (transformers' names)."""
    return [TensorSpec(hf_name(t.name), t.shape, t.held) for t in published_tensors(cfg, include_mtp)]


def canonical_name(name: str) -> str:
    """Map a file tensor name (Hugging Face or DeepSeek layout) onto the Hugging Face name."""
    if name.startswith("model.mtp."):
        return name[len("model."):]
    if name.startswith("model."):
        return name
    return hf_name(name)


_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def module_target(hf_name: str) -> tuple[str, int | None]:
    """Hugging Face name -> (parameter name in our module tree, expert row or None)."""
    n = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    m = _EXPERT.match(n)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    return n, None
