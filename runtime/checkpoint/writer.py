"""Write a checkpoint folder in the Hugging Face layout: config.json, model.safetensors (or shards plus
model.safetensors.index.json), tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_safetensors(out_dir: str | Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None,
                      metadata: dict[str, str] | None = None) -> list[Path]:
    """Save `tensors` as one `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards with an
    index when their total exceeds `max_shard_bytes`. Returns the written files."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    items = [(k, v.detach().contiguous().cpu()) for k, v in tensors.items()]
    total = sum(v.numel() * v.element_size() for _, v in items)
    if max_shard_bytes is None or total <= max_shard_bytes:
        path = out / "model.safetensors"
        save_file(dict(items), str(path), metadata=meta)
        return [path]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for k, v in items:
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((k, v))
        size += nb
    n = len(shards)
    weight_map: dict[str, str] = {}
    files = []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(dict(shard), str(out / name), metadata=meta)
        files.append(out / name)
        for k, _ in shard:
            weight_map[k] = name
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_config(out_dir: str | Path, config: dict[str, Any]) -> Path:
    p = Path(out_dir) / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(config, indent=2) + "\n")
    return p
