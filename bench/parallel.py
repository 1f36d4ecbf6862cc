"""`dsv4 bench parallel`: decode step time of one replica laid out as `--dp N --ep` vs `--tp N` (and one rank).

Every layout is a live `dsv4 serve` (real rank processes over gloo on CPU) on the same checkpoint, threads split
evenly over the ranks (`torch.set_num_threads(cores // ranks)` in each). For each batch size B the bench sends B
concurrent completions (32-token prompts, `max_tokens` decode tokens, `ignore_eos`) and reads, from the server's
own `/metrics`, the step count and time (`dsv4_step_duration_seconds{phase="total"}`) and generated tokens;
decode dominates (B x max_tokens decode rows vs one 32-token prefill per request). Layouts are measured in turn,
`--rounds` times alternating, and the best round per layout is kept (machines are noisy); ratios are taken within
one run.

What the CPU figure means: TP splits every matmul of every layer over the ranks and all-reduces twice per layer;
DP+EP runs each rank's attention on its own half of the batch and exchanges the MoE tokens (all-gather +
reduce-scatter) — on CPU both pay gloo's loopback latency per collective; on GPU (NVLink, NCCL) the collectives
are microseconds and DP+EP's real gain is the cache: N KV caches instead of one (`dsv4 bench capacity`).
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from pathlib import Path
from typing import Any

from dsv4.bench.results_io import write_triplet

PROMPT_TOKENS = 32


def layouts(ranks: int) -> dict[str, list[str]]:
    return {"1 rank": [], f"TP{ranks}": ["--tp", str(ranks)], f"DP{ranks}+EP": ["--dp", str(ranks), "--ep"]}


def _scrape(server: Any) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    want = {"dsv4_step_duration_seconds_sum": "step_s", "dsv4_step_duration_seconds_count": "steps",
            "vllm:generation_tokens_total": "tokens"}
    out = dict.fromkeys(want.values(), 0.0)
    for fam in text_string_to_metric_families(httpx.get(server.base_url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name in want and s.labels.get("phase", "total") == "total":
                out[want[s.name]] += s.value
    return out


def measure(server: Any, batch: int, max_tokens: int) -> dict[str, float]:
    """One burst of `batch` concurrent requests: mean step time, steps, tokens/s (from the server's metrics)."""
    from openai import AsyncOpenAI

    async def burst() -> None:
        c = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=600)
        try:
            await asyncio.gather(*(c.completions.create(
                model="tiny", prompt=[(37 * j + 11 * i) % 900 + 30 for j in range(PROMPT_TOKENS)],
                max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}) for i in range(batch)))
        finally:
            await c.close()

    before = _scrape(server)
    t0 = time.perf_counter()
    asyncio.run(burst())
    wall = time.perf_counter() - t0
    after = _scrape(server)
    steps = after["steps"] - before["steps"]
    tokens = after["tokens"] - before["tokens"]
    return {"steps": steps, "mean_step_ms": 1e3 * (after["step_s"] - before["step_s"]) / max(1.0, steps),
            "tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall}


def run_parallel(ranks: int, batches: tuple[int, ...], max_tokens: int, rounds: int, smoke: bool,
                 say: Any = print) -> dict:
    if ranks < 2:
        raise ValueError(f"--ranks must be >= 2, got {ranks}")
    if any(b < 1 for b in batches) or max_tokens < 1 or rounds < 1:
        raise ValueError("--batches entries, --max-tokens and --rounds must be >= 1")
    from dsv4.runtime.server.launch import start_servers

    common = ["--device", "cpu", "--max-num-seqs", str(max(batches)), "--cache-budget-gib", "0.25",
              "--expected-context", "256", "--tp-timeout-s", "120"]
    names = list(layouts(ranks))
    say(f"starting {len(names)} servers ({', '.join(names)}) ...")
    servers = start_servers(*[[*common, *extra] for extra in layouts(ranks).values()], timeout=600)
    best: dict[tuple[str, int], dict[str, float]] = {}
    try:
        total = rounds * len(batches) * len(names)
        done = 0
        for rnd in range(rounds):
            for b in batches:
                for name, server in zip(names, servers, strict=True):
                    m = measure(server, b, max_tokens)
                    done += 1
                    say(f"[{done}/{total}] round {rnd + 1} batch {b} {name}: {m['mean_step_ms']:.1f} ms/step, "
                        f"{m['tokens_per_s']:.0f} tokens/s")
                    key = (name, b)
                    if key not in best or m["mean_step_ms"] < best[key]["mean_step_ms"]:
                        best[key] = m
    finally:
        for s in servers:
            s.stop()
    results = []
    for b in batches:
        row: dict[str, Any] = {"batch": b, "layouts": {n: best[(n, b)] for n in names}}
        tp, dp = best[(names[1], b)], best[(names[2], b)]
        row["dp_over_tp_step_time"] = dp["mean_step_ms"] / tp["mean_step_ms"]
        row["dp_over_tp_tokens_per_s"] = dp["tokens_per_s"] / tp["tokens_per_s"]
        results.append(row)
    return {"bench": "parallel", "smoke": smoke, "ranks": ranks, "max_tokens": max_tokens, "rounds": rounds,
            "prompt_tokens": PROMPT_TOKENS, "cores": os.cpu_count(), "host": platform.processor() or
            platform.machine(), "layouts": names, "results": results}


def markdown(out: dict) -> str:
    names = out["layouts"]
    lines = [f"### one replica, {out['ranks']} ranks{' (smoke)' if out['smoke'] else ''}: decode step time on CPU "
             f"({out['cores']} cores, gloo; {out['prompt_tokens']}-token prompts, {out['max_tokens']} tokens each, "
             f"best of {out['rounds']} rounds)", "",
             "| batch | " + " | ".join(f"{n} ms/step (tokens/s)" for n in names)
             + f" | {names[2]} / {names[1]} step time | {names[2]} / {names[1]} tokens/s |",
             "|---|" + "---|" * (len(names) + 2)]
    for r in out["results"]:
        cells = [f"{r['layouts'][n]['mean_step_ms']:.1f} ({r['layouts'][n]['tokens_per_s']:.0f})" for n in names]
        lines.append(f"| {r['batch']} | " + " | ".join(cells)
                     + f" | {r['dp_over_tp_step_time']:.2f}x | {r['dp_over_tp_tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = out["layouts"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = list(range(len(out["results"])))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + (i - 1) * width for j in x], [r["layouts"][n]["mean_step_ms"] for r in out["results"]], width,
               label=n)
    ax.set_xticks(x, [str(r["batch"]) for r in out["results"]])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("mean step time (ms)")
    ax.set_title("one replica: TP vs DP+EP (CPU, gloo)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--ranks", type=int, default=2, help="ranks of the TP and DP+EP layouts (default 2)")
    p.add_argument("--batches", default=None, help="comma-separated concurrent requests (default 16,64; smoke 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="decode tokens per request (default 32, smoke 4)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds, best kept (default 2, smoke 1)")
    p.add_argument("--smoke", action="store_true", help="batch 2, 4 tokens, one round")
    p.add_argument("--out", default="bench/results")


def run(args) -> int:
    try:
        batches = tuple(int(x) for x in args.batches.split(",") if x.strip()) if args.batches else (
            (2,) if args.smoke else (16, 64))
    except ValueError:
        raise SystemExit(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    max_tokens = args.max_tokens if args.max_tokens is not None else (4 if args.smoke else 32)
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 2)
    try:
        out = run_parallel(args.ranks, batches, max_tokens, rounds, args.smoke)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    paths = write_triplet(out, Path(args.out), "parallel", markdown, plot)
    print(markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
