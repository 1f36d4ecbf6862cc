"""Deterministic random weights for a `ModelConfig`, in the Hugging Face tensor layout.

Scales keep activations O(1) so that a random model still has non-trivial attention and routing:
linear weights ~ N(0, 1/fan_in), embedding ~ N(0, 1), norm weights 1 + N(0, 0.1²), sinks ~ N(0, 1),
compressor position biases ~ N(0, 0.5²), mHC projections ~ N(0, 1/fan_in) with N(0, 0.5²) biases,
hash tables = distinct random experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from dsv4.runtime.checkpoint.names import I64, TensorSpec, checkpoint_tensors
from dsv4.runtime.config import ModelConfig

MAX_RANDOM_PARAMS = 2_000_000_000
GENERATOR_STAMP = "dsv4-generator.json"  # which code and settings wrote a random checkpoint (see `is_current`)
_GENERATOR_MODULES = ("random_init", "names", "layout", "writer")


def generator_fingerprint(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> str:
    """Hash of the generating code (this module, the tensor inventory, the writer, the tokenizer trainer) and the
    settings: a cached built-in model written by an older revision no longer matches and is rewritten."""
    import hashlib
    import importlib
    import json

    h = hashlib.sha256(json.dumps({"cfg": cfg.to_dict(), "seed": seed, "dtype": str(dtype)}, sort_keys=True).encode())
    modules = [f"dsv4.runtime.checkpoint.{m}" for m in _GENERATOR_MODULES] + ["dsv4.runtime.tokenizer"]
    for name in modules:
        try:
            source = importlib.import_module(name).__file__
        except ImportError:
            continue
        h.update(Path(source).read_bytes())
    return h.hexdigest()


def is_current(out_dir: str | Path, cfg: ModelConfig, seed: int, dtype: torch.dtype) -> bool:
    """A complete checkpoint (config.json) written by this revision's generator with these settings."""
    import json

    out = Path(out_dir)
    try:
        stamp = json.loads((out / GENERATOR_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (out / "config.json").exists() and stamp.get("fingerprint") == generator_fingerprint(cfg, seed, dtype)


def _value(spec: TensorSpec, cfg: ModelConfig, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    name, shape = spec.name, spec.shape
    leaf = name.rsplit(".", 1)[-1] if name.endswith(".weight") is False else name.rsplit(".", 2)[-2]

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    if spec.dtype == I64:  # tid2eid: k distinct experts per token id
        rows = torch.rand((shape[0], cfg.n_routed_experts), generator=g).argsort(dim=-1)[:, : shape[1]]
        return rows.to(torch.int64)
    if name.endswith("embed_tokens.weight"):
        t = normal(1.0)
    elif "norm" in leaf:
        t = normal(0.1, 1.0)
    elif name.endswith("attn_sink"):
        t = normal(1.0)
    elif name.endswith(".ape"):
        t = normal(0.5)
    elif name.endswith(("_base", "hc_base")):
        t = normal(0.5)
    elif name.endswith(("_scale", "hc_scale")):
        t = 1.0 + normal(0.1)
    elif name.endswith("gate.bias"):
        t = normal(0.1)
    elif len(shape) == 2:
        t = normal(1.0 / math.sqrt(shape[1]))
    else:
        t = normal(0.1)
    return t.to(torch.float32 if spec.dtype == "float32" else dtype)


def random_tensors(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32, include_mtp: bool = True,
                   progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    specs = checkpoint_tensors(cfg, include_mtp=include_mtp)
    n = sum(math.prod(s.shape) for s in specs)
    if n > MAX_RANDOM_PARAMS:
        raise ValueError(f"random init is for small models: {n / 1e9:.1f}B parameters exceeds the limit of "
                         f"{MAX_RANDOM_PARAMS / 1e9:.0f}B (use the tiny preset or a shrunken config)")
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for i, s in enumerate(specs):
        out[s.name] = _value(s, cfg, g, dtype)
        if progress and (i + 1) % 200 == 0:
            progress(f"  initialised {i + 1}/{len(specs)} tensors")
    return out


def write_random_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                            max_shard_bytes: int | None = None,
                            progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """config.json + model.safetensors (+ index when sharded) + tokenizer.json + tokenizer_config.json."""
    from dsv4.runtime.checkpoint.writer import write_config, write_safetensors
    from dsv4.runtime.tokenizer import write_tokenizer

    say = progress or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"initialising weights (seed {seed}, {dtype})")
    tensors = random_tensors(cfg, seed, dtype, progress=say)
    n_params = sum(t.numel() for t in tensors.values())
    say(f"writing {len(tensors)} tensors, {n_params / 1e6:.2f}M parameters")
    files = write_safetensors(out, tensors, max_shard_bytes=max_shard_bytes)
    say(f"training byte-level BPE tokenizer (vocab {cfg.vocab_size})")
    write_tokenizer(out, cfg.vocab_size, seed)
    import json

    (out / "config.json").unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    (out / GENERATOR_STAMP).write_text(json.dumps({"fingerprint": generator_fingerprint(cfg, seed, dtype)}) + "\n")
    d = cfg.to_dict()
    d["torch_dtype"] = str(dtype).replace("torch.", "")
    write_config(out, d)  # last: its presence marks a complete checkpoint (--if-missing)
    return {"tensors": len(tensors), "parameters": n_params, "files": len(files),
            "bytes": sum(f.stat().st_size for f in files)}
