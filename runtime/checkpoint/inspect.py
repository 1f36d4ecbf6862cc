"""`dsv4 model info`: what a checkpoint folder holds, read from headers only (no tensor data).

Parameters are logical elements: a packed FP4 byte (`I8`/`U8` with a `.scale`) holds 2, a safetensors `F4` header
already gives the logical shape, and `.scale` tensors are not parameters. "weight bytes per GPU" is what one
tensor-parallel rank holds (`parallel/ownership.py`): the same numbers the planner's `operator/weights.py` computes
from the config (`tests/test_model_info.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dsv4.runtime.checkpoint.files import TensorMeta, list_tensors
from dsv4.runtime.checkpoint.layout import MTP_PREFIX, held_nbytes
from dsv4.runtime.config import CSA, HCA, SLIDING, ModelConfig
from dsv4.runtime.parallel.ownership import TPConfigError, check_tp, rank_bytes, split_and_whole

INFO_TP = (1, 2, 4, 8)


def _parameters(name: str, meta: TensorMeta, index: dict[str, TensorMeta]) -> int:
    if name.endswith(".scale"):
        return 0
    n = math.prod(meta.shape)
    packed = meta.dtype in ("I8", "U8") and name.endswith(".weight") and name[: -len("weight")] + "scale" in index
    return 2 * n if packed else n


def weight_bytes_per_gpu(cfg: ModelConfig, index: dict[str, TensorMeta]) -> dict[int, int | str]:
    """TP size -> bytes one rank of `dsv4 serve` holds of these tensors once loaded (norms fp32; the MTP block is
    not loaded), or why the model cannot be split that way."""
    split, whole = split_and_whole((name, held_nbytes(name, m.dtype, m.nbytes)) for name, m in index.items()
                                   if not name.startswith((MTP_PREFIX, "model." + MTP_PREFIX)))
    out: dict[int, int | str] = {}
    for tp in INFO_TP:
        try:
            check_tp(cfg, tp)
            out[tp] = rank_bytes(split, whole, tp)
        except TPConfigError as e:
            out[tp] = f"n/a ({e})"
    return out


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    cfg = ModelConfig.from_file(p)
    index = list_tensors(p)
    files = sorted({m.file for m in index.values()})
    dtypes: dict[str, int] = {}
    dtype_bytes: dict[str, int] = {}
    for m in index.values():
        dtypes[m.dtype] = dtypes.get(m.dtype, 0) + 1
        dtype_bytes[m.dtype] = dtype_bytes.get(m.dtype, 0) + m.nbytes
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
        "parameters": sum(_parameters(n, m, index) for n, m in index.items()),
        "tensor dtypes": dtypes,
        "bytes per dtype": dtype_bytes,
        "weight bytes per GPU (TP)": weight_bytes_per_gpu(cfg, index),
        "files": [Path(f).name for f in files],
        "bytes on disk": sum(Path(f).stat().st_size for f in files),
        "tokenizer": (p / "tokenizer.json").exists(),
        "mtp tensors": sum(1 for k in index if k.startswith((MTP_PREFIX, "model." + MTP_PREFIX))),
    }
