"""Rank 0 of a TP group: the `dsv4 serve` process itself.

`Leader.start(cfg)` spawns ranks 1..N-1 (`python -m dsv4.runtime.parallel.worker`, one process each, own
session so terminal signals reach only the server), joins the group, and starts two daemon threads:

* the watcher polls the worker processes every 0.1 s; a worker that exits while the group is open ends the
  server (`fatal`), whatever the cause (crash, OOM kill, SIGKILL);
* the heartbeat sends a NOOP message whenever no step went out for `timeout_s / 4`, so idle workers never hit the
  collective timeout and a hung (not dead) worker is noticed within `timeout_s`.

`Leader.wrap(model)` gives the engine a model whose `forward(batch, pools)` first sends the batch to the workers
and then runs rank 0's shard. Any exception in a step (a broken peer, a timeout, a model error after the batch
went out) leaves the group inconsistent, so it is fatal too: one CRITICAL log line naming the rank and cause, the
workers killed, exit code 1 (the pod restarts).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from dsv4.runtime.parallel.codec import CMD_NOOP, CMD_STEP, CMD_STOP
from dsv4.runtime.parallel.dp_channel import DPChannel
from dsv4.runtime.parallel.group import (
    ENV_ADDR,
    ENV_PORT,
    ENV_RANK,
    ENV_WORLD,
    Channel,
    GroupInfo,
    broadcast_setup,
    init_group,
)

log = logging.getLogger("dsv4.tp")
FATAL_EXIT_CODE = 1


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Leader:
    def __init__(self, info: GroupInfo, workers: dict[int, subprocess.Popen], data_parallel: bool = False):
        self.info = info
        self.workers = workers
        self.data_parallel = data_parallel  # dp ranks with EP (DPChannel, step_all) instead of TP shards
        self.channel: Channel | DPChannel = DPChannel(info) if data_parallel else Channel(info)
        self.lock = threading.Lock()
        self.closing = False
        self._fatal_once = threading.Lock()
        self.last_send = time.monotonic()
        self.heartbeat_s = max(0.05, min(1.0, info.timeout_s / 4))

    @property
    def kind(self) -> str:
        return "data parallel" if self.data_parallel else "tensor parallel"

    # ---- start-up ----------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: Any, device: str) -> Leader:
        """Spawn the workers for `cfg.tp` (or `cfg.dp`) ranks and join the group as rank 0 on `device`."""
        from dsv4.runtime.server.launch import free_port

        data_parallel = int(cfg.dp) > 1
        world = int(cfg.dp) * int(cfg.tp)  # dp > 1 with tp > 1: dp TP groups of tp ranks
        tp_in_dp = int(cfg.tp) if data_parallel else 1
        kind = "data parallel" if data_parallel else "tensor parallel"
        addr = os.environ.get(ENV_ADDR, "127.0.0.1")
        port = int(os.environ.get(ENV_PORT) or free_port())
        conf = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "config"})
        workers: dict[int, subprocess.Popen] = {}
        for r in range(1, world):
            env = {**os.environ, ENV_RANK: str(r), ENV_WORLD: str(world), ENV_ADDR: addr, ENV_PORT: str(port),
                   "DSV4_TP_CONFIG": conf, "DSV4_TP_DEVICE": device}
            workers[r] = subprocess.Popen([sys.executable, "-m", "dsv4.runtime.parallel.worker"], env=env,
                                          start_new_session=True)
            log.info("%s: started rank %d (pid %d)", kind, r, workers[r].pid)
        atexit.register(_kill_all, workers)
        leader_box: list[Leader] = []
        watcher = threading.Thread(target=_watch_startup, args=(workers, leader_box), daemon=True,
                                   name="dsv4-tp-watch-startup")
        watcher.start()
        _set_threads(world, device)
        info = init_group(0, world, addr, port, device, float(cfg.tp_timeout_s), tp=tp_in_dp)
        leader = cls(info, workers, data_parallel)
        leader_box.append(leader)
        atexit.register(leader._at_exit)  # runs before _kill_all (LIFO): no false alarm from the watcher
        threading.Thread(target=leader._watch, daemon=True, name="dsv4-tp-watch").start()
        log.info("%s: %d ranks joined (%s on %s:%d, collective timeout %g s)", kind, world, info.backend,
                 addr, port, info.timeout_s)
        return leader

    def setup_workers(self, spec: Any, num_blocks: dict[str, int]) -> None:
        """Send the cache layout and block counts (every rank allocates the same full pools), then start the
        heartbeat (the workers listen on the channel from now on)."""
        broadcast_setup({"spec": spec, "num_blocks": dict(num_blocks)}, self.info)
        threading.Thread(target=self._heartbeat, daemon=True, name="dsv4-tp-heartbeat").start()

    def wrap(self, model: Any) -> GroupModel:
        return GroupModel(model, self)

    # ---- steps ---------------------------------------------------------------------------------------
    def step(self, model: Any, batch: Any, pools: Any) -> Any:
        with self.lock:
            try:
                self.channel.send(CMD_STEP, batch)
                out = model.forward(batch, pools)
            except BaseException as e:
                self.fatal(f"step {self.channel.seq_no} failed on rank 0: {type(e).__name__}: {e}")
            self.last_send = time.monotonic()
            return out

    def step_all(self, model: Any, batches: list[Any], pools: Any) -> list[Any]:
        """Data parallel: rank k runs batches[k] (None = idle); returns every rank's logits rows (rank order)."""
        from dsv4.runtime.parallel.dp_channel import rank_step

        with self.lock:
            try:
                header = self.channel.send(CMD_STEP, batches)
                out = rank_step(model, batches[0], pools, header, self.info)
            except BaseException as e:
                self.fatal(f"step {self.channel.seq_no} failed on rank 0: {type(e).__name__}: {e}")
            self.last_send = time.monotonic()
            return out

    def _heartbeat(self) -> None:
        while not self.closing:
            time.sleep(self.heartbeat_s / 2)
            if time.monotonic() - self.last_send < self.heartbeat_s:
                continue
            with self.lock:
                if self.closing:
                    return
                try:
                    self.channel.send(CMD_NOOP)
                except BaseException as e:
                    self.fatal(f"heartbeat failed: {type(e).__name__}: {e}")
                self.last_send = time.monotonic()

    def _watch(self) -> None:
        while not self.closing:
            for r, p in self.workers.items():
                code = p.poll()
                if code is not None and not self.closing:
                    self.fatal(f"rank {r} (pid {p.pid}) {_describe_exit(code)}")
            time.sleep(0.1)

    # ---- the end ---------------------------------------------------------------------------------------
    def fatal(self, why: str) -> None:
        """Log one line, kill the workers, exit the process non-zero (from any thread). Never returns."""
        if not self._fatal_once.acquire(blocking=False):
            while True:  # another thread is already exiting
                time.sleep(1)
        dead = self._dead_workers(wait_s=0.5)
        if dead and not why.startswith(dead[0]):  # a collective noticed first: name the rank that died
            why = f"{'; '.join(dead)} (noticed as: {_short(why)})"
        log.critical("%s group broken: %s; exiting with code %d (the pod restarts)", self.kind.replace(" ", "-"),
                     _short(why, 600), FATAL_EXIT_CODE)
        _kill_all(self.workers)
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stderr.flush()
        os._exit(FATAL_EXIT_CODE)

    def _dead_workers(self, wait_s: float) -> list[str]:
        """'rank r (pid p) killed by SIGKILL' for each worker that exited (waiting up to wait_s for one)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [f"rank {r} (pid {p.pid}) {_describe_exit(c)}" for r, p in self.workers.items()
                    if (c := p.poll()) is not None]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _at_exit(self) -> None:
        self.closing = True
        _kill_all(self.workers)

    def close(self, timeout: float = 10.0) -> None:
        """Tell the workers to stop, wait for them, leave the group."""
        import torch.distributed as dist

        self.closing = True
        with self.lock:
            try:
                self.channel.send(CMD_STOP)
            except BaseException as e:  # a worker already gone: nothing left to stop cleanly
                log.warning("%s: stop message failed (%s)", self.kind, e)
        deadline = time.monotonic() + timeout
        for r, p in self.workers.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: rank %d did not stop in %.0f s; killing it", self.kind, r, timeout)
                p.kill()
                p.wait()
        try:
            dist.destroy_process_group()
        except Exception:  # already torn down
            pass
        log.info("%s: %d workers stopped", self.kind, len(self.workers))


class GroupModel:
    """What the engine calls `model`: forward = broadcast the step, then run rank 0's shard."""

    def __init__(self, model: Any, leader: Leader):
        self.model = model
        self.leader = leader

    def forward(self, batch: Any, pools: Any) -> Any:
        return self.leader.step(self.model, batch, pools)

    __call__ = forward

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _short(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "..."


def _set_threads(world: int, device: str) -> None:
    """CPU ranks share the host's cores; every rank uses the same count so replicated parts stay identical."""
    if device == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def _kill_all(workers: dict[int, subprocess.Popen]) -> None:
    for p in workers.values():
        if p.poll() is None:
            p.kill()
    for p in workers.values():
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _watch_startup(workers: dict[int, subprocess.Popen], leader_box: list) -> None:
    """Until the group is set up, a worker that exits means start-up cannot finish: exit non-zero."""
    while not leader_box:
        for r, p in workers.items():
            code = p.poll()
            if code is not None:
                log.critical("tensor-parallel group broken during start-up: rank %d (pid %d) %s; exiting with "
                             "code %d", r, p.pid, _describe_exit(code), FATAL_EXIT_CODE)
                _kill_all(workers)
                os._exit(FATAL_EXIT_CODE)
        time.sleep(0.1)


def start_for_serving(cfg: Any, model_dir: Any, device: str) -> Leader:
    """`dsv4 serve --tp N` (or `--dp N --ep`): check the model splits over N ranks (before any process starts),
    pick rank 0's device, spawn the workers and join the group. Raises ServeConfigError naming the field."""
    from dsv4.runtime.config import ConfigError, ModelConfig
    from dsv4.runtime.parallel.group import rank_device
    from dsv4.runtime.parallel.ownership import check_dp_tp
    from dsv4.runtime.parallel.shard import TPConfigError, check_tp
    from dsv4.runtime.server.config import ServeConfigError

    dp, tp = int(cfg.dp), int(cfg.tp)
    name = f"dp {dp} x tp {tp}" if dp > 1 and tp > 1 else f"dp {dp}" if dp > 1 else f"tp {tp}"
    try:
        mcfg = ModelConfig.from_file(model_dir)
        check_dp_tp(mcfg, dp, tp) if dp > 1 else check_tp(mcfg, tp)
    except (TPConfigError, ConfigError) as e:
        raise ServeConfigError(f"{model_dir}: {e}") from e
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        if n < dp * tp:
            raise ServeConfigError(f"{name} needs {dp * tp} GPUs (one per rank); this machine has {n}")
    return Leader.start(cfg, rank_device(device, 0))


def capacity_lines(leader: Leader, mcfg: Any, cache: Any, context: int) -> list[str]:
    """Start-up report of a TP group. The cache is replicated, so a rank's pools are the replica's pools:
    `CacheManager` figures (the same `from_budget` the planner calls) hold per rank unchanged."""
    from dsv4.runtime.parallel.shard import shard_summary

    n = leader.info.world
    r = cache.capacity_report(context)
    nb = ",".join(f"{p}:{v}" for p, v in sorted(cache.num_blocks.items()))
    if leader.data_parallel:
        dp, tp = leader.info.dp_world, leader.info.tp
        inside = ("everything else whole" if tp == 1 else
                  f"in each attention rank a TP group of {tp} ({shard_summary(mcfg, tp).removeprefix('per rank: ')})")
        return [
            f"data parallel: {dp} attention ranks with expert parallelism over {n} processes ({leader.info.backend}, "
            f"collective timeout {leader.info.timeout_s:g} s); per process: {mcfg.n_routed_experts // n} of "
            f"{mcfg.n_routed_experts} routed experts; {inside}; each attention rank its own requests and KV cache",
            f"dp capacity: ranks={dp} tp={tp} per_rank_cache_bytes={r['total_bytes']} "
            f"replica_cache_bytes={dp * r['total_bytes']} context={r['context']} "
            f"sessions_per_rank={r['concurrent_sequences']} replica_sessions={dp * r['concurrent_sequences']} "
            f"max_request_tokens={r['max_request_tokens']} num_blocks={nb}",
        ]
    return [
        f"tensor parallel: {n} ranks ({leader.info.backend}, collective timeout {leader.info.timeout_s:g} s); "
        + shard_summary(mcfg, n),
        f"tp capacity: world={n} per_rank_cache_bytes={r['total_bytes']} group_cache_bytes={n * r['total_bytes']} "
        f"context={r['context']} sessions={r['concurrent_sequences']} max_request_tokens={r['max_request_tokens']} "
        f"num_blocks={nb}",
    ]
