"""Ranks 1..N-1 of a TP group, or of data-parallel attention ranks with EP (`--dp N --ep`):
`python -m dsv4.runtime.parallel.worker`, started by rank 0 (`Leader.start`).

Environment: DSV4_TP_RANK, DSV4_TP_WORLD, MASTER_ADDR, MASTER_PORT, DSV4_TP_CONFIG (the server's ServeConfig as
JSON), DSV4_TP_DEVICE (the server's resolved device). The worker joins the group, reads its part of the
same checkpoint, receives the cache layout and block counts from rank 0, allocates its own full KV pools, then runs
the model on every step rank 0 sends until a STOP message. Its logits are discarded (rank 0 samples). Any
error, including a collective that times out because rank 0 is gone, exits non-zero with one log line.
"""

from __future__ import annotations

import json
import logging
import os
import sys

log = logging.getLogger("dsv4.tp")


def main() -> int:
    rank = int(os.environ["DSV4_TP_RANK"])
    world = int(os.environ["DSV4_TP_WORLD"])
    conf = json.loads(os.environ["DSV4_TP_CONFIG"])
    logging.basicConfig(level=getattr(logging, str(conf.get("log_level", "info")).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    try:
        return _run(rank, world, conf)
    except KeyboardInterrupt:
        return 130
    except BaseException as e:
        log.critical("rank %d stopping: %s: %s", rank, type(e).__name__, e)
        return 1


def _run(rank: int, world: int, conf: dict) -> int:
    import torch
    from dsv4.runtime.model import KVPools, load_model
    from dsv4.runtime.parallel.codec import CMD_NOOP, CMD_STEP, CMD_STOP
    from dsv4.runtime.parallel.dp_channel import DPChannel, rank_step
    from dsv4.runtime.parallel.group import (
        ENV_ADDR,
        ENV_PORT,
        Channel,
        broadcast_setup,
        init_group,
        rank_device,
        shard_for,
    )
    from dsv4.runtime.parallel.leader import _set_threads
    from dsv4.runtime.server.config import ServeConfig

    _watch_parent(rank)
    cfg = ServeConfig(**conf)
    device = rank_device(os.environ.get("DSV4_TP_DEVICE", "cpu"), rank)
    _set_threads(world, device)
    trim = None
    if device == "cpu":
        from dsv4.runtime.malloc_tuning import keep_freed_memory, trim_free_heap

        keep_freed_memory()
        trim = trim_free_heap  # like rank 0's engine when it idles (docs/architecture.md, serving memory)
    data_parallel = cfg.dp > 1  # own requests + own cache; experts split (EP) instead of a TP shard
    info = init_group(rank, world, os.environ[ENV_ADDR], int(os.environ[ENV_PORT]), device, float(cfg.tp_timeout_s),
                      tp=int(cfg.tp) if data_parallel else 1)
    # only this rank's rows / columns / experts are read: no rank ever holds the full model
    model, mcfg, _ = load_model(str(cfg.model_dir), device=device, progress=False,
                                shard=shard_for(info, data_parallel), weights_dtype=cfg.weights_dtype,
                                with_mtp=False)  # not run: no speculative decoding
    setup = broadcast_setup(None, info)
    pools = KVPools.for_model(mcfg, setup["spec"], setup["num_blocks"], device=device)
    from dsv4.runtime.model.compiled import setup as setup_compile

    setup_compile("off" if cfg.compile == "off" else "on", model, pools, device, log.info, decode_step=False)
    log.info("rank %d ready on %s: %.1f MiB of KV pools", rank, device, pools.bytes_allocated() / 2**20)
    chan = DPChannel(info) if data_parallel else Channel(info)
    steps = trimmed_at = 0
    with torch.inference_mode():
        while True:
            cmd, batch, *header = chan.recv()
            if cmd == CMD_NOOP and trim is not None and steps != trimmed_at:
                trim()  # a heartbeat means no step for a while: the group is idle, give the steps' heap back
                trimmed_at = steps
            if cmd == CMD_STEP and data_parallel:
                rank_step(model, batch, pools, header[0], info)
                steps += 1
            elif cmd == CMD_STEP:
                model.forward(batch, pools)
                steps += 1
            elif cmd == CMD_STOP:
                break
            elif cmd != CMD_NOOP:
                raise RuntimeError(f"unknown command {cmd} from rank 0")
    log.info("rank %d stopped after %d steps", rank, steps)
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


def _watch_parent(rank: int) -> None:
    """Exit at once when rank 0 is gone (this process gets re-parented), instead of waiting for a collective
    to time out — e.g. rank 0 killed during start-up, when the timeout is the long start-up one."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                log.critical("rank %d stopping: rank 0 (pid %d) is gone", rank, parent)
                for h in logging.getLogger().handlers:
                    h.flush()
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dsv4-tp-parent").start()


if __name__ == "__main__":
    sys.exit(main())
