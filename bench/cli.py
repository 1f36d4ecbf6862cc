"""`dsv4 bench <name>`: one benchmark per subcommand; each module exposes add_arguments / run."""

from __future__ import annotations

import importlib

# name -> (module, help). Other benchmarks add a line here.
BENCHES: dict[str, tuple[str, str]] = {
    "capacity": ("dsv4.bench.capacity", "Live-context capacity per SWA storage policy (metadata-only allocator)."),
    "load": ("dsv4.bench.load", "Checkpoint load time and peak RSS vs checkpoint size (HF bf16 and FP8/FP4 layouts)."),
    "kv-error": ("dsv4.bench.kv_error", "Logits error of bf16 / FP8 (+ FP8 or FP4 indexer key) KV storage vs fp32 KV."),
    "kernels": ("dsv4.bench.kernels", "Decode kernel GB/s and % of HBM peak (Triton on CUDA; torch reference on CPU)."),
    "scaling": ("dsv4.bench.scaling", "Prefill / decode cost vs context: our runtime vs transformers' reference."),
    "scaling-profile": ("dsv4.bench.scaling_profile", "Where our prefill / decode time goes (profilers)."),
    "parallel": ("dsv4.bench.parallel", "Decode step time of one replica: --dp N --ep vs --tp N vs one rank (CPU)."),
    "scheduler": ("dsv4.bench.scheduler", "Engine time per step outside the model forward at 64 / 256 sequences."),
    "serving": ("dsv4.bench.serving", "guidellm vs a live `dsv4 serve`: concurrency, batching delay, prompt mixes."),
    "structured": ("dsv4.bench.structured", "Sampler step cost of grammar-constrained rows at batch 1 / 64."),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="NAME")
    for name, (module_name, help_text) in BENCHES.items():
        safe = help_text.replace("%", "%%")  # argparse %-formats help strings
        sp = sub.add_parser(name, help=safe, description=safe)
        sp.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(sp)


def run(args) -> int:
    module_name = getattr(args, "_bench_module", None)
    if not module_name:
        print("usage: dsv4 bench {" + ",".join(BENCHES) + "} [options]")
        return 2
    return int(importlib.import_module(module_name).run(args) or 0)
