"""`dsv4 bench structured`: the per-step cost of grammar-constrained rows in the sampler.

One sampler step (`sampling.sample`) over B rows of random logits with the tiny model's vocabulary, every row
sampled (temperature 1, a seed per row), measured twice: all rows unconstrained, and all rows under a
`response_format` json_schema grammar (xgrammar, as `dsv4 serve` compiles it; each row's matcher advances by
the token sampled, and restarts when its JSON is complete). The difference is what constrained rows cost per
step: filling their rows of the token bitmask plus applying it. Unconstrained rows in the same batch pay
nothing (`apply_constraints` touches only constrained rows).
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

from dsv4.bench.results_io import write_triplet

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}}}}


def _tokenizer() -> Any:
    from dsv4.runtime.server.build import ensure_tiny_model
    from dsv4.runtime.server.config import default_model_dir
    from dsv4.runtime.tokenizer import Tokenizer

    path = default_model_dir()
    ensure_tiny_model(path, say=lambda *_: None)
    return Tokenizer.from_dir(path)


def measure(batch: int, steps: int, tok: Any, spec: Any | None) -> float:
    """Median seconds of one `sample` call over `batch` rows (all constrained by `spec`, or none)."""
    import torch
    from dsv4.runtime.engine.request import SamplingParams
    from dsv4.runtime.engine.sampling import RowSpec, make_generator, sample

    vocab = tok.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=10**6)
    rows = [RowSpec(params, make_generator(i), {}, [], None, spec.start() if spec else None) for i in range(batch)]
    torch.manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(batch, vocab)
        t0 = time.perf_counter()
        tokens, _ = sample(logits, rows)
        times.append(time.perf_counter() - t0)
        for r, t in zip(rows, tokens, strict=True):
            if spec is not None and t in tok.stop_token_ids:
                r.constraint = spec.start()  # this row's JSON is complete: start the next one
    return statistics.median(times)


def run_structured(batches: tuple[int, ...], steps: int, smoke: bool) -> dict:
    if any(not 1 <= b <= 4096 for b in batches):
        raise ValueError(f"--batches entries must be in [1, 4096], got {batches}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    import torch
    from dsv4.runtime.server.structured import GrammarCompiler

    torch.set_num_threads(1)
    tok = _tokenizer()
    spec = GrammarCompiler(tok, tok.vocab_size).compile(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}, thinking=False)
    results = []
    for b in batches:
        free = measure(b, steps, tok, None)
        constrained = measure(b, steps, tok, spec)
        results.append({"batch": b, "steps": steps, "unconstrained_s": free, "constrained_s": constrained,
                        "constrained_cost_s": constrained - free,
                        "cost_per_row_us": 1e6 * (constrained - free) / b})
    return {"bench": "structured", "smoke": smoke, "library": "xgrammar", "vocab": tok.vocab_size,
            "schema": SCHEMA, "host": platform.processor() or platform.machine(), "threads": 1,
            "results": results}


def markdown(out: dict) -> str:
    lines = [f"### constrained sampling{' (smoke)' if out['smoke'] else ''} — {out['library']}, vocabulary "
             f"{out['vocab']}, CPU, 1 thread (median of {out['results'][0]['steps']} steps)", "",
             "| batch | sample step, unconstrained (ms) | all rows constrained (ms) | cost of constrained rows (ms) "
             "| per row (µs) |", "|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {r['batch']} | {1e3 * r['unconstrained_s']:.3f} | {1e3 * r['constrained_s']:.3f} | "
                     f"{1e3 * r['constrained_cost_s']:.3f} | {r['cost_per_row_us']:.1f} |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["batch"]) for r in out["results"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [1e3 * r["unconstrained_s"] for r in out["results"]], 0.4, label="unconstrained")
    ax.bar([i + 0.2 for i in x], [1e3 * r["constrained_s"] for r in out["results"]], 0.4, label="json_schema")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("rows in the step")
    ax.set_ylabel("ms per sampler step (median)")
    ax.set_title("grammar-constrained sampling cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--batches", default=None, help="comma-separated rows per step (default 1,64; smoke 1,8)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps measured per batch (default 50, smoke 5)")
    p.add_argument("--smoke", action="store_true", help="1 and 8 rows, 5 steps: seconds")
    p.add_argument("--out", default="bench/results")


def run(args) -> int:
    try:
        batches = tuple(int(x) for x in args.batches.split(",") if x.strip()) if args.batches else (
            (1, 8) if args.smoke else (1, 64))
    except ValueError:
        raise SystemExit(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    steps = args.steps if args.steps is not None else (5 if args.smoke else 50)
    try:
        out = run_structured(batches, steps, args.smoke)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    paths = write_triplet(out, Path(args.out), "structured", markdown, plot)
    print(markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
