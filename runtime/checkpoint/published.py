"""Write tensors in DeepSeek's published layout (`layout.py`): the test fixture for the released checkpoints and
the `dsv4 bench load` published case.

From Hugging Face layout tensors (`random_init`'s names) and their config, every inventory entry is written in its
file format: fp8 -> `F8_E4M3` weight + `F8_E8M0` 128x128 block `.scale`; fp4 -> `I8` packed e2m1 (low nibble =
even column) + `F8_E8M0` per-32 `.scale` (or safetensors `F4` with `fp4_dtype="F4"`, as re-exports do); bf16 /
f32 / i64 as such. Each tensor comes with its dequantised twin (what the loader must reproduce, in the source
dtype).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from dsv4.runtime.checkpoint.layout import BF16, F32, FP4, FP8, I64, hf_name, published_tensors
from dsv4.runtime.checkpoint.quant import dequantize, quantize_fp4, quantize_fp8
from dsv4.runtime.config import ModelConfig

_PLAIN = {BF16: torch.bfloat16, F32: torch.float32, I64: torch.int64}


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales -> `float8_e8m0fnu` (stored as safetensors `F8_E8M0`)."""
    return torch.log2(scale).add(127).to(torch.uint8).view(torch.float8_e8m0fnu)


def to_published(cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                 fp4_dtype: str = "I8") -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (published name, file tensor, dequantised twin in the source dtype) for every inventory entry; a
    `.scale` tensor follows its weight with twin = the scale itself. `tensors` must hold the Hugging Face names
    of `checkpoint_tensors(cfg, include_mtp)` (MTP included when its tensors are present)."""
    has_mtp = any(k.startswith("mtp.") for k in tensors)
    for t in published_tensors(cfg, include_mtp=has_mtp):
        v = tensors[hf_name(t.name)]
        if t.fmt in _PLAIN:
            q = v.to(_PLAIN[t.fmt])
            yield t.name, q, q.to(v.dtype)
            continue
        q, s = quantize_fp8(v) if t.fmt == FP8 else quantize_fp4(v)
        twin = dequantize(q, s, t.shape, t.name).to(v.dtype)
        if t.fmt == FP4:
            q = q.view(torch.int8) if fp4_dtype == "I8" else q.view(torch.float4_e2m1fn_x2)
        yield t.name, q, twin
        yield t.scale_name, _e8m0(s), _e8m0(s)


def write_published_checkpoint(cfg: ModelConfig, tensors: dict[str, torch.Tensor], out_dir,
                               max_shard_bytes: int | None = None, fp4_dtype: str = "I8") -> dict[str, torch.Tensor]:
    """config.json (with the release's `quantization_config` and `expert_dtype`) + safetensors shards in the
    published layout. Returns the dequantised twins under their Hugging Face names."""
    from dsv4.runtime.checkpoint.writer import write_config, write_safetensors

    pub, twins = {}, {}
    for name, q, twin in to_published(cfg, tensors, fp4_dtype=fp4_dtype):
        pub[name] = q
        if not name.endswith(".scale"):
            twins[hf_name(name)] = twin
    write_safetensors(out_dir, pub, max_shard_bytes=max_shard_bytes)
    d = cfg.to_dict()
    d["quantization_config"] = dict(PUBLISHED_QUANTIZATION)
    d["expert_dtype"] = "fp4"
    write_config(out_dir, d)
    return twins


# The released config.json's quantisation fields (DeepSeek-V4-Flash / -Pro).
PUBLISHED_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
