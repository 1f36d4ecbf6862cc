"""Convert Hugging Face layout tensors to DeepSeek's published layout (for tests and `dsv4 bench load`).

Names: `model.layers.N.*` -> `layers.N.*`, `model.embed_tokens.weight` -> `embed.weight`, `model.norm.weight` ->
`norm.weight`, `model.hc_head.hc_*` -> `hc_head_*`. Routed expert matrices -> FP4 (packed e2m1 + UE8M0 byte per
32); other 2-D projection weights -> FP8 e4m3 + fp32 128x128 block scales; embeddings, head, compressors, mHC
mixes, norms, MTP and integer tables stay as they are (the published checkpoints keep those in bf16 / fp32).
Returns the published tensors and their dequantised twin (what the loader must reproduce).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from dsv4.runtime.checkpoint.quant import dequantize, quantize_fp4, quantize_fp8

_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
        "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
        "model.hc_head.hc_scale": "hc_head_scale"}


def published_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    return hf_name[len("model."):] if hf_name.startswith("model.layers.") else hf_name


def _kind(name: str, v: torch.Tensor) -> str:
    if v.dim() != 2 or not v.dtype.is_floating_point:
        return "keep"
    if ".experts." in name and ".shared_experts." not in name:
        return "fp4"
    if "compressor" in name or "embed" in name or name.startswith(("head", "mtp")) or "hc_" in name:
        return "keep"
    return "fp8"


def to_published(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (published name, published tensor, dequantised twin in the source dtype); a `.scale` tensor is
    yielded right after its weight with twin = the scale itself."""
    for name, v in tensors.items():
        ds = published_name(name)
        kind = _kind(name, v)
        if kind == "keep":
            yield ds, v, v
            continue
        if kind == "fp4":
            q, s = quantize_fp4(v)
            s_file = torch.log2(s).add(127).to(torch.uint8)  # UE8M0 bytes
        else:
            q, s = quantize_fp8(v)
            s_file = s
        yield ds, q, dequantize(q, s, tuple(v.shape), name).to(v.dtype)
        yield ds[: -len(".weight")] + ".scale", s_file, s_file
