"""`dsv4 bench scheduler`: engine time per step spent outside the model forward.

The serving engine of `dsv4 serve` (`build_engine`: the built-in tiny model, the CacheManager, the metrics
observer) runs N sequences that all decode (random 64-token prompts, `ignore_eos`, temperature 1 with a
seed per sequence, so the per-row sampling path is the real one). For each measured step:

    step      = wall time of `LLMEngine.step()`
    forward   = wall time inside `model.forward` (the network; everything else is engine overhead)
    overhead  = step - forward,  split into schedule (Scheduler.schedule), batch (ModelRunner.build_batch:
                block tables -> tensors), commit (CacheManager.commit), sample (sampler), observer (metrics
                on_step), other (append, detokenise, stop checks, outputs)

Target: overhead <= 10 % of the step at 64 running sequences. The tiny model's forward is cheap, so the
fraction is a pessimistic bound for a real model on the same host.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from dsv4.bench.results_io import write_triplet

PHASES = ("schedule", "batch", "forward", "commit", "sample", "observer")


class _Timers:
    """Wraps callables so that their wall time accumulates into `self.t[name]` (reset per step)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        timers = self

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers.t[name] += time.perf_counter() - t0

        setattr(obj, attr, timed)

    def reset(self) -> None:
        for k in self.t:
            self.t[k] = 0.0


def build(num_seqs: int, model_dir: str | None, budget_gib: float) -> Any:
    """The LLMEngine `dsv4 serve` would build for these settings (tiny model unless `model_dir`)."""
    from dsv4.runtime.server.build import build_engine
    from dsv4.runtime.server.config import ServeConfig

    cfg = ServeConfig(model=model_dir, device="cpu", max_num_seqs=num_seqs, max_num_batched_tokens=4096,
                      cache_budget_gib=budget_gib, max_queue=4 * num_seqs, log_level="warning")
    built = build_engine(cfg, say=lambda _m: None)
    return built.engine.engine  # AsyncEngine -> LLMEngine (not started: we drive steps ourselves)


def measure(num_seqs: int, steps: int, model_dir: str | None = None, prompt_len: int = 64,
            budget_gib: float = 0.25, greedy: bool = False) -> dict:
    import torch
    from dsv4.runtime.engine import engine as engine_mod
    from dsv4.runtime.engine.request import Request, SamplingParams

    eng = build(num_seqs, model_dir, budget_gib)
    timers = _Timers()
    timers.wrap(eng.scheduler, "schedule", "schedule")
    timers.wrap(eng.runner, "build_batch", "batch")
    timers.wrap(eng.runner.model, "forward", "forward")
    timers.wrap(eng.cache, "commit", "commit")
    timers.wrap(eng.observer, "on_step", "observer")
    orig_sample = engine_mod.sample

    def timed_sample(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_sample(*a, **k)
        finally:
            timers.t["sample"] += time.perf_counter() - t0

    engine_mod.sample = timed_sample
    try:
        g = torch.Generator().manual_seed(0)
        vocab = int(eng.model_config.vocab_size)
        for i in range(num_seqs):
            ids = torch.randint(2, vocab, (prompt_len,), generator=g).tolist()
            p = SamplingParams(max_tokens=steps + 64, temperature=0.0 if greedy else 1.0,
                               seed=None if greedy else i, ignore_eos=True)
            eng.add(Request(f"s{i}", ids, p))
        for _ in range(1000):  # prefill everything (untimed)
            if not eng.scheduler.waiting and not any(s.in_prefill for s in eng.scheduler.running):
                break
            eng.step()
        running = len(eng.scheduler.running)
        if running != num_seqs:
            raise RuntimeError(f"only {running} of {num_seqs} sequences running: raise --budget-gib")
        eng.step()  # first decode step untimed
        rows = []
        for _ in range(steps):
            timers.reset()
            t0 = time.perf_counter()
            eng.step()
            total = time.perf_counter() - t0
            r = dict(timers.t)
            r["step"] = total
            r["overhead"] = total - r["forward"]
            r["other"] = r["overhead"] - sum(r[k] for k in PHASES if k != "forward")
            rows.append(r)
        for rid in list(eng.requests):
            eng.abort(rid)
    finally:
        engine_mod.sample = orig_sample

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    keys = ("step", "forward", "overhead", *[k for k in PHASES if k != "forward"], "other")
    res = {"running": num_seqs, "steps": steps, "median_s": {k: med(k) for k in keys},
           "mean_s": {k: statistics.fmean(r[k] for r in rows) for k in keys}}
    tot_step = sum(r["step"] for r in rows)
    res["overhead_fraction"] = sum(r["overhead"] for r in rows) / tot_step
    res["overhead_per_seq_us"] = 1e6 * res["median_s"]["overhead"] / num_seqs
    return res


def run_scheduler(sizes: tuple[int, ...], steps: int, smoke: bool, model_dir: str | None = None,
                  threads: int = 1, budget_gib: float = 0.25, greedy: bool = False, prompt_len: int = 64) -> dict:
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    for n in sizes:
        if not 1 <= n <= 4096:
            raise ValueError(f"--sizes entries must be in [1, 4096], got {n}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not 1 <= prompt_len <= 65536:
        raise ValueError(f"--prompt-len must be in [1, 65536], got {prompt_len}")
    if not 0 < budget_gib <= 64:
        raise ValueError(f"--budget-gib must be in (0, 64], got {budget_gib:g}")
    torch.set_num_threads(threads)
    t0 = time.time()
    out = {"bench": "scheduler", "smoke": smoke, "model": model_dir or "built-in tiny", "threads": threads,
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
           "load_average": list(os.getloadavg()), "budget_gib": budget_gib,
           "sampling": "greedy" if greedy else "temperature 1, a seed per sequence", "prompt_len": prompt_len,
           "results": [measure(n, steps, model_dir, prompt_len, budget_gib, greedy) for n in sizes]}
    at64 = next((r for r in out["results"] if r["running"] == 64), None)
    out["targets"] = {"overhead <= 10% of step at 64 running": None if at64 is None else {
        "fraction": at64["overhead_fraction"], "met": at64["overhead_fraction"] <= 0.10}}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def markdown(out: dict) -> str:
    cols = ("step", "forward", "overhead", "schedule", "batch", "commit", "sample", "observer", "other")
    lines = [f"### scheduler overhead{' (smoke)' if out['smoke'] else ''} — {out['model']} model, CPU, "
             f"{out['threads']} thread(s), {out['machine']}; sampling: {out['sampling']}; "
             f"prompts of {out.get('prompt_len', 64)} tokens", "",
             "Median ms per decode step (all sequences decoding):", "",
             "| running | " + " | ".join(cols) + " | overhead % of step | overhead µs / sequence |",
             "|" + "---|" * (len(cols) + 3)]
    for r in out["results"]:
        m = r["median_s"]
        lines.append(f"| {r['running']} | " + " | ".join(f"{1e3 * m[c]:.2f}" for c in cols)
                     + f" | {100 * r['overhead_fraction']:.1f} % | {r['overhead_per_seq_us']:.0f} |")
    lines.append("")
    for k, v in out["targets"].items():
        lines.append(f"Target {k}: " + ("not measured (no size 64)" if v is None else
                                        f"{100 * v['fraction']:.1f} % — {'met' if v['met'] else 'MISSED'}"))
    lines.append(f"\nWall time {out['seconds']:g} s.")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("forward", "schedule", "batch", "commit", "sample", "observer", "other")
    colors = ("#888", "#c44", "#e93", "#4a4", "#47c", "#a5c", "#333")
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [str(r["running"]) for r in out["results"]]
    bottom = [0.0] * len(labels)
    for part, color in zip(parts, colors, strict=True):
        vals = [1e3 * max(0.0, r["median_s"][part]) for r in out["results"]]
        ax.bar(labels, vals, bottom=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("running sequences")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title("engine step: model forward vs the rest")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: dict, out_dir: Path) -> dict[str, Path]:
    model = "" if out["model"] == "built-in tiny" else "_" + Path(out["model"]).name
    greedy = "_greedy" if out.get("sampling") == "greedy" else ""
    plen = "" if out.get("prompt_len", 64) == 64 else f"_p{out['prompt_len']}"
    return write_triplet(out, out_dir, f"scheduler{model}{greedy}{plen}", markdown, plot)


def add_arguments(p) -> None:
    p.add_argument("--sizes", default=None, help="comma-separated running-sequence counts (default 64,256; smoke 8,32)")
    p.add_argument("--steps", type=int, default=None, help="decode steps measured per size (default 30, smoke 5)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see docs/benchmarks.md)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (default 64)")
    p.add_argument("--greedy", action="store_true",
                   help="greedy sampling (default: temperature 1 with a seed per sequence, the per-row path)")
    p.add_argument("--budget-gib", type=float, default=0.25, help="cache budget (default 0.25 GiB)")
    p.add_argument("--smoke", action="store_true", help="8 and 32 sequences, 5 steps: seconds")
    p.add_argument("--out", default="bench/results")


def run(args) -> int:
    try:
        sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip()) if args.sizes else (
            (8, 32) if args.smoke else (64, 256))
    except ValueError:
        raise SystemExit(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    steps = args.steps if args.steps is not None else (5 if args.smoke else 30)
    try:
        out = run_scheduler(sizes, steps, args.smoke, args.model, args.threads, args.budget_gib, args.greedy,
                            args.prompt_len)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(str(e)) from e
    paths = write_results(out, Path(args.out))
    print(markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
