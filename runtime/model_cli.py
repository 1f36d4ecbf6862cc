"""`dsv4 model`: create and inspect DeepSeek-V4 checkpoints.

    dsv4 model init-random --preset tiny --out DIR [--seed N] [--dtype float32|bfloat16] [--if-missing]
    dsv4 model info DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    p = sub.add_parser("init-random", help="write a deterministic random checkpoint (HF layout) with a tokenizer")
    p.add_argument("--preset", default="tiny", help="model shape preset: tiny (flash/pro are too large to init)")
    p.add_argument("--config", help="a config.json to use instead of --preset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-mb", type=float, default=None, help="split into shards with an index above this size")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when OUT already holds this revision's checkpoint for these settings")
    i = sub.add_parser("info", help="summarise a checkpoint folder (config, tensors, bytes)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")


def _init_random(args: argparse.Namespace) -> int:
    out = Path(args.out)
    import torch
    from dsv4.runtime.checkpoint.random_init import is_current, write_random_checkpoint
    from dsv4.runtime.config import ConfigError, ModelConfig, preset

    try:
        cfg = ModelConfig.from_file(args.config) if args.config else preset(args.preset)
    except ConfigError as e:
        print(f"dsv4 model: error: {e}", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    if args.if_missing and is_current(out, cfg, args.seed, dtype):
        print(f"dsv4 model: {out} already has this revision's checkpoint; nothing to do")
        return 0
    if args.if_missing and (out / "config.json").exists():
        print(f"dsv4 model: {out} was written by another revision of the generator or other settings; rewriting it")
    t0 = time.time()
    print(f"dsv4 model: writing a random '{args.preset if not args.config else args.config}' checkpoint to {out}")
    max_shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    try:
        stats = write_random_checkpoint(cfg, out, seed=args.seed, dtype=dtype, max_shard_bytes=max_shard,
                                        progress=lambda m: print(f"dsv4 model: {m}", flush=True))
    except ValueError as e:
        print(f"dsv4 model: error: {e}", file=sys.stderr)
        return 2
    print(f"dsv4 model: done in {time.time() - t0:.1f}s: {stats['parameters'] / 1e6:.2f}M parameters, "
          f"{stats['tensors']} tensors, {stats['bytes'] / 2**20:.1f} MiB in {stats['files']} file(s)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from dsv4.runtime.checkpoint.errors import CheckpointError
    from dsv4.runtime.checkpoint.inspect import checkpoint_info
    from dsv4.runtime.config import ConfigError

    try:
        info = checkpoint_info(args.path)
    except (CheckpointError, ConfigError) as e:
        print(f"dsv4 model: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k in ("bytes per dtype", "weight bytes per GPU (TP)"):
            v = ", ".join(f"{d}: {_size(n)}" if isinstance(n, int) else f"{d}: {n}" for d, n in v.items())
        print(f"{k:>26}: {v}")
    return 0


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    if args.model_command == "init-random":
        return _init_random(args)
    if args.model_command == "info":
        return _info(args)
    print("usage: dsv4 model {init-random,info} ... (see dsv4 model --help)", file=sys.stderr)
    return 2
