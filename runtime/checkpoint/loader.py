"""Load a checkpoint folder onto a meta-initialised `DeepseekV4Model`, one tensor at a time.

* safetensors with or without `model.safetensors.index.json`; DeepSeek's published layout (`layout.py`) or the
  Hugging Face (transformers) one; known extras of later releases skipped with one warning per kind;
* FP8 e4m3 + 128x128 block scales and FP4 e2m1 packed experts (`I8`/`U8` or `F4`) + per-32 scales are
  dequantised on the fly (`quant.py`), so peak host memory stays near one copy of the (dequantised) weights;
* each shard is opened once and read with positional reads (scales with their weight); tensors read as stored
  go `READ_THREADS` at a time (at most `IN_FLIGHT_BYTES` in flight), those dequantised one at a time on the
  calling thread; with a `TPShard` only the rank's part of each tensor is read (`parallel/ownership.py`) —
  scattered ranges, which a disk serves near its sequential speed only when several are asked for at once;
* every failure is a `CheckpointError` whose message names the file / tensor / field and the expectation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dsv4.runtime.checkpoint import quant
from dsv4.runtime.checkpoint.errors import CheckpointError
from dsv4.runtime.checkpoint.files import TensorMeta, list_tensors, read_rows, storage
from dsv4.runtime.checkpoint.layout import KNOWN_EXTRAS, MTP_PREFIX
from dsv4.runtime.checkpoint.names import canonical_name, checkpoint_tensors, module_target
from dsv4.runtime.config import ConfigError, ModelConfig
from dsv4.runtime.parallel.ownership import OwnedPart, owned_part
from torch import nn

from dsv4.settings_enums import WEIGHTS_DTYPES

log = logging.getLogger("dsv4.checkpoint")
_QUANTISED = ("F8_E4M3", "F8_E4M3FN", "I8", "U8", "F4")  # weights that mean nothing without their .scale
READ_THREADS_ENV, READ_THREADS = "DSV4_LOAD_THREADS", 4  # tensors read at once (1: one after another)
IN_FLIGHT_BYTES = 64 << 20  # file bytes of the tensors being read at once (their temporaries scale with it)
_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    try:
        return ModelConfig.from_file(p)
    except ConfigError as e:
        where = p / "config.json" if p.is_dir() else p
        raise CheckpointError(f"{where}: {e}") from None


def _resolve_dtype(cfg: ModelConfig, dtype: Any) -> torch.dtype:
    if dtype is None:
        dtype = cfg.torch_dtype if cfg.torch_dtype in _DT else "bfloat16"
    if isinstance(dtype, str):
        if dtype not in _DT:
            raise CheckpointError(f"dtype must be one of {sorted(_DT)}, got {dtype!r}")
        return _DT[dtype]
    return dtype


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered (before any init touches it).

    Not `with torch.device("meta")`: that mode routes every op of the constructor (inits, RoPE tables) through
    torch._refs, which imports torch._dynamo (~170 MB of host RSS and seconds of start-up). Parameters created with
    torch.empty on the CPU are never touched (no resident pages) before they move to meta here."""
    orig = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        orig(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = orig  # type: ignore[method-assign]


def _raw_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


Plan = dict[str, tuple[str, TensorMeta, TensorMeta | None]]


def _plan(files: dict[str, TensorMeta], cfg: ModelConfig, raw_config: dict[str, Any]) -> Plan:
    """Canonical (Hugging Face) name -> (file name, weight meta, scale meta or None). Tensors and config keys of
    a known published variant (`layout.KNOWN_EXTRAS`) are skipped with one warning line per kind."""
    scales = {n for n in files if n.endswith(".scale")}
    variants = [x for x in KNOWN_EXTRAS if any(k.startswith(x.config_key) for k in raw_config)]
    known = {s.name for s in checkpoint_tensors(cfg, include_mtp=True)}
    skipped: dict[str, list[str]] = {}
    plan: Plan = {}
    for name, meta in files.items():
        if name in scales:
            continue
        hf = canonical_name(name)
        extra = next((x for x in variants if hf not in known and x.tensor_pattern is not None
                      and x.tensor_pattern.match(name)), None)
        if extra is not None:
            skipped.setdefault(extra.kind, []).append(name)
            continue
        sname = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
        plan[hf] = (name, meta, files.get(sname) if sname else None)
    used = {p[0][: -len(".weight")] + ".scale" for p in plan.values() if p[2] is not None}
    skipped_scales = {n[: -len(".weight")] + ".scale" for names in skipped.values() for n in names}
    stray = sorted(scales - used - skipped_scales)
    if stray:
        raise CheckpointError(f"unexpected scale tensor(s) without a weight: {', '.join(stray[:5])}")
    for x in variants:
        keys = sorted(k for k in raw_config if k.startswith(x.config_key))
        names = skipped.get(x.kind, [])
        log.warning("checkpoint: skipping the %s: %d config key(s) (%s) and %d tensor(s)%s, not used by this "
                    "runtime", x.kind, len(keys), ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else ""),
                    len(names), f" (and their scales; e.g. {sorted(names)[0]})" if names else "")
    return plan


@dataclass(frozen=True)
class TPShard:
    """Load only what rank `rank` of `world` tensor-parallel ranks (`mode="tp"`) or expert-parallel data-parallel
    ranks (`mode="ep"`: only the routed experts are split) holds (`parallel/ownership.py`)."""

    rank: int
    world: int
    pg: Any = None  # the process group the sharded modules all-reduce / exchange over
    mode: str = "tp"
    tp: int = 1  # mode "ep" with TP inside each data-parallel rank: the TP group's size ...
    tp_pg: Any = None  # ... and its process group (the non-expert tensors are cut as TP rank `rank % tp`)




@dataclass
class _LoadPlan:
    plan: Plan  # canonical name -> (file name, weight meta, scale meta or None), checked against the config
    expected: dict[str, Any]  # canonical name -> TensorSpec
    jobs: list[tuple]  # (file, offset, canonical name, parameter, expert row, OwnedPart), in file order
    part_of: Callable[[str], OwnedPart | None]
    has_mtp: bool  # the MTP block is read


def _load_plan(folder: Path, cfg: ModelConfig, shard: TPShard | None, with_mtp: bool) -> _LoadPlan:
    """What a load reads: every tensor checked against the config (missing, unexpected, shape, scale), and the
    rank's part of each, in file order."""
    files = list_tensors(folder)

    plan = _plan(files, cfg, _raw_config(folder))
    if not with_mtp:
        mtp = [k for k in plan if k.startswith(MTP_PREFIX)]
        if mtp:
            nbytes = sum(plan[k][1].nbytes + (plan[k][2].nbytes if plan[k][2] else 0) for k in mtp)
            log.info("checkpoint: not loading the MTP block (%d tensors, %.2f GiB in the files): it is not run "
                     "(no speculative decoding)", len(mtp), nbytes / 2**30)
            for k in mtp:
                del plan[k]
    has_mtp = any(k.startswith(MTP_PREFIX) for k in plan)
    expected = {s.name: s for s in checkpoint_tensors(cfg, include_mtp=has_mtp)}
    missing = sorted(set(expected) - set(plan))
    if missing:
        s = expected[missing[0]]
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing, e.g. {missing[0]} (expected shape "
                              f"{list(s.shape)}); first missing: {', '.join(missing[:5])}")
    unexpected = sorted(set(plan) - set(expected))
    if unexpected:
        n0 = plan[unexpected[0]]
        first = ", ".join(plan[u][0] for u in unexpected[:5])
        raise CheckpointError(f"{Path(n0[1].file).name}: {len(unexpected)} unexpected tensor(s), e.g. {n0[0]} "
                              f"(shape {list(n0[1].shape)}); first: {first}")
    for hf, (name, meta, smeta) in plan.items():
        want = expected[hf].shape
        if smeta is None and meta.dtype in _QUANTISED and expected[hf].dtype != "int64":
            raise CheckpointError(f"{Path(meta.file).name}: tensor {name} is {meta.dtype} but its scale "
                                  f"{name.removesuffix('.weight')}.scale is missing")
        got = quant.logical_shape(meta, smeta)
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{Path(meta.file).name}: tensor {name} has shape {list(got)}, expected "
                                  f"{list(want)} for this config.json")

    world = shard.world if shard else 1
    parts = {hf: owned_part(hf.removeprefix("model."), cfg, shard.rank, world, shard.mode, shard.tp)
             for hf in plan} if shard else {}

    def part_of(hf: str) -> OwnedPart | None:
        return parts[hf] if shard else OwnedPart()

    jobs = []
    for hf, (_, meta, _) in plan.items():
        pname, row = module_target(hf)
        part = part_of(hf)
        if part is not None:
            jobs.append((meta.file, meta.offset, hf, pname, part.expert if part.expert is not None else row, part))
    jobs.sort(key=lambda j: (j[0], j[1]))  # sequential reads, file by file
    return _LoadPlan(plan, expected, jobs, part_of, has_mtp)


def rank_byte_ranges(path: str | Path, shard: TPShard | None = None, with_mtp: bool = True
                     ) -> dict[str, list[tuple[int, int]]]:
    """file -> merged byte ranges a rank's load reads (`dsv4 bench load` times reading just these: the disk's floor
    for a rank that needs only its part of each file)."""
    folder = Path(path)
    lp = _load_plan(folder, read_config(folder), shard, with_mtp)
    return _read_ranges(lp.plan, lp.jobs)


def load_checkpoint(path: str | Path, device: Any = "cpu", dtype: Any = None, progress: bool = True,
                    shard: TPShard | None = None, weights_dtype: str = "bf16", with_mtp: bool = True
                    ) -> tuple[Any, ModelConfig]:
    """(DeepseekV4Model in eval mode on `device`, ModelConfig). With `shard`, the model is cut like
    `parallel/shard.shard_model` before any memory is allocated, and only the rank's rows / columns / experts of
    each tensor are read from the files (`model.load_stats` counts the bytes). `weights_dtype="checkpoint"` keeps
    FP8 linears and FP4 routed experts quantised in memory (`model/quantized.py`, dequantised on the fly); "bf16"
    dequantises them at load into the model dtype. `with_mtp=False` leaves the MTP block's tensors unread (the
    server does not run it: no speculative decoding), one log line says how much that saved."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise CheckpointError(f"weights dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    from dsv4.runtime.model.model import DeepseekV4Model
    from dsv4.runtime.model.rope import inv_freq_for
    from tqdm import tqdm

    folder = Path(path)
    threads = read_threads()
    cfg = read_config(folder)
    wdtype = _resolve_dtype(cfg, dtype)
    lp = _load_plan(folder, cfg, shard, with_mtp)
    plan, expected, jobs, part_of, has_mtp = lp.plan, lp.expected, lp.jobs, lp.part_of, lp.has_mtp
    world = shard.world if shard else 1
    ranges = _read_ranges(plan, jobs) if shard else None  # a rank reads only part of each file
    _prefetch(ranges)  # the disk starts on the rank's bytes while the model is built
    with _parameters_on_meta():
        model = DeepseekV4Model(cfg, wdtype, with_mtp=has_mtp)
    if world > 1 and shard.mode == "ep":
        from dsv4.runtime.parallel.ep import shard_model_ep
        from dsv4.runtime.parallel.expert_exchange import AllGatherExchange

        model.expert_exchange = AllGatherExchange(shard.rank, world, shard.pg, act_dtype=wdtype)
        shard_model_ep(model, cfg, shard.rank, world, model.expert_exchange, shard.tp, shard.tp_pg)  # on meta
    elif world > 1:
        from dsv4.runtime.parallel.shard import shard_model

        shard_model(model, cfg, shard.rank, world, shard.pg)  # on the meta device: only the shapes change

    if weights_dtype == "checkpoint":
        _keep_quantised(model, plan, wdtype, part_of)
    _materialise(model, device)
    model.inv_freq_main = inv_freq_for(cfg, compressed=False).to(device)
    model.inv_freq_compress = inv_freq_for(cfg, compressed=True).to(device)
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))

    sizes = [_part_bytes(plan[j[2]], expected[j[2]].shape, j[5]) for j in jobs]
    bar = tqdm(total=sum(sizes), desc="loading weights", unit="B", unit_scale=True, disable=not progress,
               leave=False)
    started, done = time.monotonic(), 0

    def tick(nbytes: int) -> None:
        nonlocal done
        done += 1
        bar.update(nbytes)
        if done % 64 == 0 or done == len(jobs):
            bar.set_postfix_str(f"{done}/{len(jobs)} tensors, {done / max(time.monotonic() - started, 1e-9):.0f}/s")

    with _OpenFiles() as files:
        pooled = [_reads_only(plan, expected, targets, job) for job in jobs]
        _run_jobs(lambda job: _load_job(files, plan, expected, targets, job), jobs, sizes, pooled, tick, threads)
    model.load_stats = {"bytes_read": files.bytes_read, "tensors": len(jobs), "files_opened": files.opened}
    bar.close()
    _validate_values(model, cfg)
    model.eval()
    return model, cfg


def _target(targets: dict[str, torch.Tensor], pname: str, row: int | None) -> torch.Tensor | None:
    """The parameter (or stacked-expert row) a job fills; None for the parts kept quantised (codes + scales)."""
    if pname not in targets:
        return None
    return targets[pname] if row is None else targets[pname][row]


def _reads_only(plan: Plan, expected: dict[str, Any], targets: dict[str, torch.Tensor], job: tuple) -> bool:
    """Whether a job only reads bytes into their final memory (no conversion worth a core): kept-quantised codes
    and scales, and tensors stored in the model's dtype (`_fill`'s direct case)."""
    _, _, hf, pname, row, part = job
    dst = _target(targets, pname, row)
    _, meta, smeta = plan[hf]
    return dst is None or _direct(meta, smeta, dst, tuple(expected[hf].shape), part)


@torch.no_grad()  # on the reading thread (grad mode is per thread)
def _load_job(files: _OpenFiles, plan: Plan, expected: dict[str, Any], targets: dict[str, torch.Tensor],
              job: tuple) -> None:
    fname, _, hf, pname, row, part = job
    name, meta, smeta = plan[hf]
    try:
        dst = _target(targets, pname, row)
        if dst is None:  # kept quantised: codes and scales are read as stored
            _fill_quantised(files, meta, smeta, targets, pname, row, part)
        else:
            _fill(files, name, meta, smeta, dst, tuple(expected[hf].shape), part)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{fname}: cannot read tensor {name} ({msg}); the file may be truncated or "
                              f"corrupt") from None


def read_threads() -> int:
    """`DSV4_LOAD_THREADS` (default `READ_THREADS`): how many tensors a load reads at once; a clear error names the
    variable when it is not a whole number from 1 to 64."""
    value = os.environ.get(READ_THREADS_ENV, str(READ_THREADS)).strip()
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise CheckpointError(f"{READ_THREADS_ENV} must be a whole number from 1 to 64, got {value!r}")
    return int(value)


def _run_jobs(work: Callable[[tuple], None], jobs: list[tuple], sizes: list[int], pooled: list[bool],
              done: Callable[[int], None], threads: int = READ_THREADS, budget: int = IN_FLIGHT_BYTES) -> None:
    """work(job) for every job. Pure reads (`pooled`) run on `threads` threads (positional reads: the disk sees
    several requests at once, which scattered ranges need to come near a sequential read's speed), at most
    `budget` bytes of them in flight (always at least one); jobs that convert (dequantise) run on this thread,
    one at a time as before, while the reads go on (no two conversions compete for the cores or hold
    temporaries at once). `done(size)` is called on this thread as jobs finish; the first failure is raised
    after cancelling what has not started."""
    pending: deque[tuple[Future[None], int]] = deque()
    in_flight = 0

    def finish_oldest() -> None:
        nonlocal in_flight
        future, size = pending.popleft()
        future.result()
        in_flight -= size
        done(size)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="dsv4-load") as pool:
        try:
            for job, size, on_pool in zip(jobs, sizes, pooled, strict=True):
                if not on_pool or threads <= 1:
                    work(job)
                    done(size)
                else:
                    while pending and (in_flight + size > budget or len(pending) >= 4 * threads):
                        finish_oldest()
                    pending.append((pool.submit(work, job), size))
                    in_flight += size
                while pending and pending[0][0].done():
                    finish_oldest()
            while pending:
                finish_oldest()
        except BaseException:
            for future, _ in pending:
                future.cancel()
            raise


def _materialise(model: nn.Module, device: Any) -> None:
    """Uninitialised storage on `device` for every meta parameter and buffer, like `Module.to_empty`, but with
    `torch.empty(shape)`: `to_empty`'s `empty_like` on meta tensors runs through torch._refs, whose first use
    imports sympy (~0.5 s of a cold load)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                        requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def _read_ranges(plan: Plan, jobs: list[tuple]) -> dict[str, list[tuple[int, int]]]:
    """file -> merged [start, end) byte ranges a rank's jobs read: each owned tensor's rows (whole rows where
    columns are cut; FP8 weights by whole 128-row blocks) and its scale. A slight superset is harmless: it only
    tells the kernel what to read ahead."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for _, _, hf, _, _, part in jobs:
        _, meta, smeta = plan[hf]
        for m in (meta, smeta):
            if m is None:
                continue
            lo, hi = m.offset, m.offset + m.nbytes
            rows = storage(m)[1][0] if m.shape else 0
            if part.rows and m is meta and rows:
                b = quant.BLOCK if smeta is not None and meta.dtype in ("F8_E4M3", "F8_E4M3FN") else 1
                r0, r1 = part.rows[0] // b * b, min(-(-part.rows[1] // b) * b, rows)
                row = m.nbytes // rows
                lo, hi = m.offset + r0 * row, m.offset + r1 * row
            ranges.setdefault(m.file, []).append((lo, hi))
    merged: dict[str, list[tuple[int, int]]] = {}
    for f, rs in ranges.items():
        out: list[tuple[int, int]] = []
        for lo, hi in sorted(rs):
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        merged[f] = out
    return merged


def _prefetch(ranges: dict[str, list[tuple[int, int]]] | None) -> None:
    """Ask the kernel to start reading `ranges` now (`POSIX_FADV_WILLNEED` queues the reads and returns), so the
    disk works while the model is built. Best effort: advice only, no-op where posix_fadvise is missing."""
    if not ranges or not hasattr(os, "posix_fadvise"):
        return
    for file, rs in ranges.items():
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue  # the read reports it
        try:
            for lo, hi in rs:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


class _OpenFiles:
    """Each shard opened once for the whole load (read positionally, from any thread); counts the bytes read."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.bytes_read = 0
        self.opened = 0
        self._lock = threading.Lock()

    def __enter__(self) -> _OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def rows(self, meta: TensorMeta, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        with self._lock:
            if meta.file not in self.fds:
                self.fds[meta.file] = os.open(meta.file, os.O_RDONLY)
                self.opened += 1
            fd = self.fds[meta.file]
        t = read_rows(fd, meta, r0, r1, out)
        with self._lock:
            self.bytes_read += t.numel() * t.element_size()
        return t


def _block_aligned(part: OwnedPart, shape: tuple[int, ...]) -> bool:
    """Whether the owned rows / columns start and end on 128-blocks (or the tensor's end): FP8 parts that can keep
    their block scales."""
    return all(span is None or (span[0] % quant.BLOCK == 0 and (span[1] % quant.BLOCK == 0 or span[1] == n))
               for span, n in ((part.rows, shape[0]), (part.cols, shape[1])))


def _keep_quantised(model: nn.Module, plan: Plan, dtype: torch.dtype,
                    part_of: Callable[[str], OwnedPart | None]) -> None:
    """Swap, on the (possibly TP-cut) meta model, each linear whose file tensor is FP8 + E8M0 scales for an
    `FP8Linear` (row-parallel ones for an `FP8RowParallelLinear`) when the rank's part is block-aligned, and each
    routed-expert stack whose every matrix is packed FP4 + E8M0 scales for FP4 code / scale buffers. Parts that do
    not fit the blocks stay dequantised."""
    from dsv4.runtime.model.quantized import FP8Linear, FP8RowParallelLinear, quantize_experts
    from dsv4.runtime.parallel.shard import RowParallelLinear

    fp4_stacks: dict[str, int] = {}
    for hf, (_, meta, smeta) in plan.items():
        if smeta is None or smeta.dtype != "F8_E8M0" or (part := part_of(hf)) is None:
            continue
        pname, row = module_target(hf)
        if row is None and meta.dtype in ("F8_E4M3", "F8_E4M3FN") and pname.endswith(".weight"):
            if not _block_aligned(part, tuple(meta.shape)):
                continue
            parent, _, leaf = pname[: -len(".weight")].rpartition(".")
            old = model.get_submodule(parent).get_submodule(leaf)
            out_f, in_f = old.weight.shape
            if isinstance(old, RowParallelLinear):
                new: nn.Module = FP8RowParallelLinear(in_f, out_f, dtype, old.pg)
            elif isinstance(old, nn.Linear):
                new = FP8Linear(in_f, out_f, dtype)
            else:
                continue
            setattr(model.get_submodule(parent), leaf, new)
        elif row is not None and meta.dtype in ("I8", "U8", "F4"):
            stack = pname.rpartition(".")[0]
            fp4_stacks[stack] = fp4_stacks.get(stack, 0) + 1
    for stack, n in fp4_stacks.items():
        experts = model.get_submodule(stack)
        if n == 3 * experts.w1.shape[0]:  # all of w1, w2, w3 of every expert this rank holds
            quantize_experts(experts)


def _fill_quantised(files: _OpenFiles, meta: TensorMeta, smeta: TensorMeta, targets: dict[str, torch.Tensor],
                    pname: str, row: int | None, part: OwnedPart) -> None:
    """Codes and scales of the rank's (block-aligned) part, as stored."""
    if row is None:  # FP8Linear: rows by seeking, columns cut after reading
        q, s = targets[pname[: -len("weight")] + "qweight"], targets[pname[: -len("weight")] + "scale"]
        r0, r1 = part.rows or (0, meta.shape[0])
        b = quant.BLOCK
        parts = ((meta, q, (r0, r1), part.cols),
                 (smeta, s, (r0 // b, -(-r1 // b)), part.cols and (part.cols[0] // b, -(-part.cols[1] // b))))
    else:  # an FP4 expert matrix: whole
        q, s = targets[pname + "_q"][row], targets[pname + "_s"][row]
        parts = ((meta, q, (0, storage(meta)[1][0]), None), (smeta, s, (0, smeta.shape[0]), None))
    for m, dst, (a, z), cols in parts:
        if cols is None and dst.device.type == "cpu":
            files.rows(m, a, z, out=dst)  # the bytes as stored (int8 / uint8 / e4m3 / e8m0 alike)
            continue
        t = files.rows(m, a, z)
        dst.copy_((t if cols is None else t[:, cols[0]:cols[1]]).view(dst.dtype))


def _part_bytes(entry: tuple[str, TensorMeta, TensorMeta | None], shape: tuple[int, ...], part: OwnedPart) -> int:
    """About the bytes a part costs to read (for the progress bar)."""
    _, meta, smeta = entry
    n = meta.nbytes + (smeta.nbytes if smeta else 0)
    return n * (part.rows[1] - part.rows[0]) // max(shape[0], 1) if part.rows else n


def _direct(meta: TensorMeta, smeta: TensorMeta | None, dst: torch.Tensor, shape: tuple[int, ...],
            part: OwnedPart) -> bool:
    """Whether the part's bytes, as stored, are the parameter's memory (read straight into it)."""
    r0, r1 = part.rows or (0, shape[0])
    return (smeta is None and not part.cols and storage(meta)[0] == dst.dtype and dst.is_contiguous()
            and dst.device.type == "cpu" and tuple(dst.shape) == (r1 - r0, *shape[1:]))


def _fill(files: _OpenFiles, name: str, meta: TensorMeta, smeta: TensorMeta | None, dst: torch.Tensor,
          shape: tuple[int, ...], part: OwnedPart) -> None:
    """dst <- the rank's part of file tensor `name` (dequantised with its scale when it has one): only the owned
    rows are read (FP8: the 128-row scale blocks that cover them); owned columns are cut after reading."""
    r0, r1 = part.rows or (0, shape[0])
    if _direct(meta, smeta, dst, shape, part):
        files.rows(meta, r0, r1, out=dst)  # the common case: straight into the parameter's memory
        return
    if smeta is None:
        t = files.rows(meta, r0, r1)
    elif meta.dtype in ("F8_E4M3", "F8_E4M3FN"):
        b = quant.BLOCK
        lo, hi = r0 // b * b, min(-(-r1 // b) * b, shape[0])
        w = quant.dequantize(files.rows(meta, lo, hi), files.rows(smeta, lo // b, -(-hi // b)), (hi - lo, shape[1]),
                             name)
        t = w[r0 - lo:r1 - lo]
    else:  # FP4: one scale row per weight row
        t = quant.dequantize(files.rows(meta, r0, r1), files.rows(smeta, r0, r1), (r1 - r0, shape[1]), name)
    if part.cols:
        t = t[:, part.cols[0]:part.cols[1]]
    if dst.dtype == torch.long and t.dtype.is_floating_point:
        raise CheckpointError(f"{Path(meta.file).name}: tensor {name} must be an integer table")
    if tuple(t.shape) != tuple(dst.shape):
        raise CheckpointError(f"{Path(meta.file).name}: tensor {name}: read part {list(t.shape)} does not fit "
                              f"{list(dst.shape)}")
    dst.copy_(t)  # converts the dtype in the same pass


def _validate_values(model: Any, cfg: ModelConfig) -> None:
    for i, layer in enumerate(model.layers):
        t = getattr(layer.ffn.gate, "tid2eid", None)
        if t is not None and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= cfg.n_routed_experts:
                raise CheckpointError(f"layers.{i}.ffn.gate.tid2eid holds expert ids in [{lo}, {hi}], must be in "
                                      f"[0, n_routed_experts={cfg.n_routed_experts})")

