"""Tensor parallelism on one node: N processes, one per rank, the model sharded by module surgery.

* `shard.py`   — `check_tp(cfg, tp)` and `shard_model(model, cfg, rank, world, pg)` (in place).
* `codec.py`   — one engine step (`ForwardBatch`) as a fixed int64 header + one int64 payload.
* `group.py`   — process-group setup (gloo on CPU, NCCL on GPU) with a timeout on every collective, and
                 the step channel (header all-reduce, payload broadcast).
* `leader.py`  — rank 0 (the server): spawns the workers, watches them, heartbeats, wraps the model so each
                 step is broadcast first; any broken peer ends the process non-zero with one clear line.
* `worker.py`  — ranks 1..N-1: `python -m dsv4.runtime.parallel.worker`, loads, shards, runs every step.

See docs/parallel.md.
"""
