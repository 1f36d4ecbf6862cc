"""`dsv4 model info`: what a checkpoint folder holds, read from headers only (no tensor data)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dsv4.runtime.checkpoint.files import list_tensors
from dsv4.runtime.config import CSA, HCA, SLIDING, ModelConfig


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    cfg = ModelConfig.from_file(p)
    index = list_tensors(p)
    n_params = sum(math.prod(meta.shape) for meta in index.values())
    files = sorted({m.file for m in index.values()})
    dtypes: dict[str, int] = {}
    for m in index.values():
        dtypes[m.dtype] = dtypes.get(m.dtype, 0) + 1
    return {
        "path": str(p.resolve()),
        "model_type": "deepseek_v4",
        "layers": cfg.num_hidden_layers,
        "layer_mix": f"{len(cfg.layers_of(SLIDING))} sliding, {len(cfg.layers_of(CSA))} CSA, "
                     f"{len(cfg.layers_of(HCA))} HCA",
        "hidden_size": cfg.hidden_size,
        "heads x head_dim": f"{cfg.num_attention_heads} x {cfg.head_dim} (rope {cfg.qk_rope_head_dim})",
        "experts": f"{cfg.n_routed_experts} routed (top {cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared",
        "ratios / window / topk": f"CSA {cfg.csa_ratio}, HCA {cfg.hca_ratio} / {cfg.sliding_window} / "
                                  f"{cfg.index_topk}",
        "vocab_size": cfg.vocab_size,
        "tensors": len(index),
        "parameters": n_params,
        "tensor dtypes": dtypes,
        "files": [Path(f).name for f in files],
        "bytes on disk": sum(Path(f).stat().st_size for f in files),
        "tokenizer": (p / "tokenizer.json").exists(),
        "mtp tensors": sum(1 for k in index if k.startswith(("mtp.", "model.mtp."))),
    }
