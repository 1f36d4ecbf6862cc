"""`dsv4 bench scaling-profile`: where our prefill and decode time goes, on the `dsv4 bench scaling` checkpoint.

The engine of `dsv4 bench scaling` (`Ours`: LLMEngine over the `full` cache policy, fp32, one thread) runs

- one prefill of `--context` tokens (chunks of `--chunk`) under cProfile: wall time, and the share of it spent
  inside each named function (cumulative time, so nested calls count in their parents too);
- `--steps` decode steps at batch `--batch` (default 1) on that context under cProfile (the same shares) and
  under torch.profiler (aten operators dispatched per step: on CPU a small model's step is thousands of them).

cProfile adds a cost per Python call, so shares are approximate (Python-heavy parts are overstated); the
plain (unprofiled) times are measured separately. Output (no plot: a table of shares says it):
`bench/results/scaling_profile[_<context>_b<batch>][_smoke].{json,md}`.
"""

from __future__ import annotations

import cProfile
import json
import os
import platform
import pstats
import time
from pathlib import Path
from typing import Any

# (label, file suffix, function name or names summed): cumulative time, as a share of the profiled total
PARTS = (
    ("sparse attention (torch path: gathered rows or one GEMM per run)", "kernels/dispatch.py", "sparse_attention"),
    ("indexer scores", "kernels/dispatch.py", "indexer_scores"),
    ("mHC mixing (hc_pre: RMS, Sinkhorn x20)", "runtime/model/layers.py", "hc_pre"),
    ("mHC combine (hc_post)", "runtime/model/layers.py", "hc_post"),
    # the block calls attention's three phases itself (runtime/model/model.py Block.forward): their sum
    ("attention layer (all of it)", "runtime/model/attention.py", ("project", "select", "combine", "output")),
    ("model forward", "runtime/model/model.py", "forward"),
    ("sampler", "runtime/engine/sampling.py", "sample"),
)


def shares(prof: cProfile.Profile, total: float) -> dict[str, float]:
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out = {}
    for label, suffix, names in PARTS:
        cum = sum(max((v[3] for (f, _ln, fn), v in stats.items() if f.endswith(suffix) and fn == name), default=0.0)
                  for name in ((names,) if isinstance(names, str) else names))
        out[label] = cum / total if total > 0 else 0.0
    return out


def top_functions(prof: cProfile.Profile, n: int = 8) -> list[dict]:
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{Path(f).name}:{fn}" if f != "~" else fn, "calls": v[1], "self_s": v[2]}
            for (f, _ln, fn), v in rows]


def run_profile(context: int, chunk: int, steps: int, smoke: bool = False, batch: int = 1) -> dict:
    import torch
    from dsv4.bench.scaling import Ours, checkpoint_dir, ensure_checkpoint, prompt_ids, scaling_config
    from torch.profiler import ProfilerActivity, profile

    if context < chunk or context % chunk:
        raise ValueError(f"--context must be a positive multiple of --chunk {chunk}, got {context}")
    if not 1 <= steps <= 1000:
        raise ValueError(f"--steps must be in [1, 1000], got {steps}")
    if not 1 <= batch <= 256:
        raise ValueError(f"--batch must be in [1, 256], got {batch}")
    torch.set_num_threads(1)
    from dsv4.runtime.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # as `dsv4 serve` and `dsv4 bench scaling` on CPU
    hidden = 64 if smoke else 256  # the checkpoints of `dsv4 bench scaling [--smoke]`
    cfg = scaling_config(hidden, smoke)
    path = ensure_checkpoint(checkpoint_dir(hidden, smoke), cfg)
    ours = Ours(path, context, batch, chunk, steps)
    ours.prefill_trace(prompt_ids(chunk + 1, cfg.vocab_size, seed=1))  # warm-up
    prompt = prompt_ids(context, cfg.vocab_size)

    plain_prefill = ours.prefill_trace(prompt)[-1][1]
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    ours.prefill_trace(prompt)
    prof_prefill = time.perf_counter() - t0
    prof.disable()
    prefill = {"seconds": plain_prefill, "ms_per_token": 1e3 * plain_prefill / context,
               "profiled_seconds": prof_prefill, "shares": shares(prof, prof_prefill), "top": top_functions(prof)}

    eng = ours.engine
    reqs = [ours._request(prompt, 3 * steps + 8 * batch + 16, 7 + i) for i in range(batch)]  # prefix hits on the prompt
    for req in reqs:
        eng.add(req)
    while any(s.in_prefill for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    eng.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    plain_step = (time.perf_counter() - t0) / steps
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    prof_total = time.perf_counter() - t0
    prof.disable()
    with profile(activities=[ProfilerActivity.CPU]) as tp:
        for _ in range(steps):
            eng.step()
    top_level = [e for e in tp.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    by_op: dict[str, int] = {}
    for e in top_level:
        by_op[e.name] = by_op.get(e.name, 0) + 1
    if len(eng.scheduler.running) != batch:
        raise RuntimeError(f"only {len(eng.scheduler.running)} of {batch} sequences were still decoding")
    for req in reqs:
        eng.abort(req.request_id)
    decode = {"batch": batch, "ms_per_step": 1e3 * plain_step, "profiled_ms_per_step": 1e3 * prof_total / steps,
              "shares": shares(prof, prof_total), "top": top_functions(prof),
              "aten_ops_per_step": len(top_level) / steps,
              "aten_ms_per_step": sum(e.cpu_time_total for e in top_level) / steps / 1e3,
              "most_called_ops": sorted(((k, v / steps) for k, v in by_op.items()), key=lambda kv: -kv[1])[:8]}
    return {"bench": "scaling_profile", "smoke": smoke, "context": context, "chunk": chunk, "steps": steps,
            "hidden": hidden, "threads": 1, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "torch": torch.__version__, "load_average": list(os.getloadavg()), "prefill": prefill, "decode": decode}


def markdown(out: dict) -> str:
    p, d = out["prefill"], out["decode"]
    lines = [f"### scaling profile — ours, hidden {out['hidden']}, context {out['context']:,}, chunk {out['chunk']}, "
             f"1 thread, {out['machine']}", "",
             f"Prefill: {p['seconds']:.2f} s ({p['ms_per_token']:.3f} ms/token). Decode at batch {d['batch']}: "
             f"{d['ms_per_step']:.1f} ms/step, {d['aten_ops_per_step']:.0f} top-level aten operators per step "
             f"({d['aten_ms_per_step']:.1f} ms inside them under torch.profiler).", "",
             f"| share of profiled time (cProfile, cumulative) | prefill | decode b={d['batch']} |", "|---|---|---|"]
    for label in p["shares"]:
        lines.append(f"| {label} | {100 * p['shares'][label]:.0f} % | {100 * d['shares'][label]:.0f} % |")
    lines += ["", "Most dispatched operators per decode step: "
              + ", ".join(f"{k} {v:.0f}" for k, v in d["most_called_ops"]) + ".", "",
              "Top functions by self time, prefill: "
              + ", ".join(f"{t['function']} {t['self_s']:.2f} s" for t in p["top"][:5]) + "."]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default 2048; smoke 256)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 512; smoke 128)")
    p.add_argument("--steps", type=int, default=None, help="decode steps profiled (default 10; smoke 2)")
    p.add_argument("--batch", type=int, default=1, help="decoding sequences (default 1)")
    p.add_argument("--smoke", action="store_true", help="the smoke checkpoint (hidden 64), 256 tokens: seconds")
    p.add_argument("--out", default="bench/results")


def run(args: Any) -> int:
    try:
        out = run_profile(args.context or (256 if args.smoke else 2048), args.chunk or (128 if args.smoke else 512),
                          args.steps or (2 if args.smoke else 10), args.smoke, args.batch)
    except RuntimeError as e:
        raise SystemExit(str(e)) from e
    except ValueError as e:
        raise SystemExit(str(e)) from e
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    shape = "" if (args.context, args.batch) == (None, 1) else f"_{out['context']}_b{args.batch}"
    stem = f"scaling_profile{shape}{'_smoke' if args.smoke else ''}"
    (d / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (d / f"{stem}.md").write_text(markdown(out) + "\n")
    print(markdown(out))
    print(f"wrote {d / (stem + '.json')}, {d / (stem + '.md')}")
    return 0
