"""Sharded forward == dense forward, on a fixed script of steps (chunked prefill, a mixed batch, decodes).

    python -m dsv4.runtime.parallel.selfcheck --tp 2 [--model DIR]

Spawns `tp` ranks (gloo, loopback), each loads the checkpoint, shards it and runs the script on its own
KV pools; rank 0 saves its logits. The parent runs the dense model on the same script and prints the largest
difference. `tests/test_tp_shard.py` uses `sharded_logits` and `dense_logits`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

NUM_BLOCKS = 16


def script(cfg: Any) -> list[Any]:
    """Batches of a fixed two-sequence script. Token pools get blocks 0..7 (seq 0) and 8..15 (seq 1);
    compressed pools one block each (the prompts stay below one logical block)."""
    from dsv4.runtime.model import ForwardBatch

    V = cfg.vocab_size
    a = [(7 * i + 3) % V for i in range(40)]
    b = [(11 * i + 5) % V for i in range(30)]
    tok = {"swa": [list(range(8)), list(range(8, 16))], "csa_state": [list(range(8)), list(range(8, 16))],
           "hca_state": [list(range(8)), list(range(8, 16))], "csa": [[0], [1]], "hca": [[0], [1]]}
    one = {k: [v[0]] for k, v in tok.items()}
    steps = [ForwardBatch.build([(a[:24], 0)], one, logits="all"),
             ForwardBatch.build([(a[24:], 24), (b, 0)], tok, logits="all")]
    for i in range(4):  # decode both
        steps.append(ForwardBatch.build([([(13 * i + 1) % V], 40 + i), ([(17 * i + 2) % V], 30 + i)], tok))
    return steps


def _run(model: Any, cfg: Any, device: str = "cpu") -> list[Any]:
    import torch
    from dsv4.runtime.model import KVPools, cache_spec

    spec = cache_spec(cfg, kv_dtype="fp32")
    pools = KVPools.for_model(cfg, spec, NUM_BLOCKS, device=device)
    with torch.inference_mode():
        return [model.forward(b.to(device), pools).float().cpu() for b in script(cfg)]


def dense_logits(model_dir: str) -> list[Any]:
    from dsv4.runtime.model import load_model

    model, cfg, _ = load_model(model_dir, progress=False)
    return _run(model.eval(), cfg)


def _rank_main(rank: int, world: int, port: int, model_dir: str, out: str, weights_dtype: str | None = None) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from dsv4.runtime.model import load_model
    from dsv4.runtime.parallel.shard import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if weights_dtype is None:  # the whole model, then cut
            model, cfg, _ = load_model(model_dir, progress=False)
            shard_model(model.eval(), cfg, rank, world)
        else:  # only this rank's part read, weights kept as `weights_dtype` says
            from dsv4.runtime.checkpoint.loader import TPShard

            model, cfg, _ = load_model(model_dir, progress=False, shard=TPShard(rank, world),
                                       weights_dtype=weights_dtype)
        logits = _run(model.eval(), cfg)
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


def sharded_logits(model_dir: str, tp: int, weights_dtype: str | None = None) -> list[Any]:
    import torch
    import torch.multiprocessing as mp
    from dsv4.runtime.server.launch import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.pt")
        # fork: the ranks inherit the imported torch (spawn re-imports it per rank, seconds each on a busy host)
        mp.start_processes(_rank_main, args=(tp, free_port(), model_dir, out, weights_dtype), nprocs=tp, join=True,
                           start_method="fork")
        return torch.load(out)


def main(argv: list[str] | None = None) -> int:
    from dsv4.runtime.server.build import ensure_tiny_model
    from dsv4.runtime.server.config import default_model_dir

    ap = argparse.ArgumentParser(prog="python -m dsv4.runtime.parallel.selfcheck")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--model", default=None)
    a = ap.parse_args(argv)
    model_dir = a.model or str(default_model_dir())
    if a.model is None:
        ensure_tiny_model(model_dir)
    dense = dense_logits(model_dir)
    tp = sharded_logits(model_dir, a.tp)
    diff = max(float((x - y).abs().max()) for x, y in zip(dense, tp, strict=True))
    print(f"tp={a.tp}: {len(dense)} steps, max |sharded - dense| logit difference {diff:.3g}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
