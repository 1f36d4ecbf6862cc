"""The DeepSeek-V4 model in torch on the engine's flattened batch, with paged multi-pool KV storage.

Public API:
    ForwardBatch, KVPools, DeepseekV4Model, build_model, cache_spec, load_model(path, device, dtype),
    mtp_forward, mtp_pools (the MTP draft head)
"""

from __future__ import annotations

from typing import Any

from dsv4.runtime.model.batch import ForwardBatch
from dsv4.runtime.model.kv_pools import KVPools, cache_spec
from dsv4.runtime.model.model import DeepseekV4Model, build_model
from dsv4.runtime.model.mtp import mtp_forward, mtp_pools


def load_model(path: str, device: Any = "cpu", dtype: Any = None, progress: bool = True,
               shard: Any = None, weights_dtype: str = "bf16", with_mtp: bool = True) -> tuple[Any, Any, Any]:
    """(model, ModelConfig, Tokenizer | None) from a checkpoint folder. dtype None = the checkpoint's
    `torch_dtype` (float32 / bfloat16). `shard` (a `checkpoint.loader.TPShard`): load only that TP rank's part, already
    cut like `parallel.shard.shard_model`. `weights_dtype`: "bf16" dequantises FP8/FP4 weights at load, "checkpoint"
    keeps them as stored (`model/quantized.py`). `with_mtp=False`: the MTP block is not read.
    Raises CheckpointError / ConfigError with a one-line explanation."""
    from dsv4.runtime.checkpoint.loader import load_checkpoint
    from dsv4.runtime.tokenizer import Tokenizer

    model, cfg = load_checkpoint(path, device=device, dtype=dtype, progress=progress, shard=shard,
                                 weights_dtype=weights_dtype, with_mtp=with_mtp)
    try:
        tok = Tokenizer.from_dir(path)
    except FileNotFoundError:
        tok = None
    return model, cfg, tok


__all__ = ["ForwardBatch", "KVPools", "DeepseekV4Model", "build_model", "cache_spec", "load_model", "mtp_forward",
           "mtp_pools"]
