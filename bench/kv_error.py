"""`dsv4 bench kv-error`: logits error of quantised KV storage (bf16, FP8 + FP8/FP4 indexer keys) vs fp32 KV.

For each seed, random weights of the tiny preset (every layer kind) are written and loaded, one prompt of
`3 x hca_ratio + 5` tokens is decoded in chunks of 3 through the paged pools (so later chunks read back the
stored, quantised rows of earlier ones), and compared with the same run on fp32 KV:

    max_abs      max |logits - logits_fp32|
    rel_l2       ||logits - logits_fp32|| / ||logits_fp32||
    argmax       fraction of positions with the same greedy token

plus the per-row codec error of the KV row format on N(0, 3^2) rows (head_dim / rope_dim of the preset).
Random weights amplify KV noise (no quantisation-aware training, hash / top-k routing flips on small changes),
so these are upper bounds for the trained checkpoints, not their quality.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

FORMATS = (("bf16", "bf16"), ("fp8", "fp8"), ("fp8", "fp4"))  # (kv_dtype, index_dtype)


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, default=5, help="random models measured (default 5; --smoke: 1)")
    p.add_argument("--smoke", action="store_true", help="one seed, a few seconds (CI)")
    p.add_argument("--out", default="bench/results", help="results folder (kv_error[_smoke].json/.md)")


def _run(model, cfg, kv_dtype: str, index_dtype: str, ids: list[int], chunk: int):
    """Logits of every position, decoding `ids` in chunks through freshly allocated contiguous blocks."""
    import torch
    from dsv4.runtime.cache.spec import CacheSpec
    from dsv4.runtime.model import ForwardBatch, KVPools

    spec = CacheSpec.from_model(cfg, kv_dtype, index_dtype=index_dtype)
    tables, nblocks = {}, {}
    for name, ps in spec.pools.items():
        if name == "idx":
            continue
        nblocks[name] = -(-len(ids) // ps.tokens_per_block)
        tables[name] = [list(range(nblocks[name]))]
    pools = KVPools.for_model(cfg, spec, nblocks)
    outs = []
    with torch.no_grad():
        for p in range(0, len(ids), chunk):
            b = ForwardBatch.build([(ids[p:p + chunk], p)], tables, logits="all")
            outs.append(model(b, pools))
    return torch.cat(outs).float()


def codec_error(head_dim: int, rope_dim: int, seed: int = 0) -> dict[str, float]:
    """Relative L2 error of one KV row through each storage format (rows of N(0, 3^2))."""
    import torch
    from dsv4.runtime.model import fp8_codec

    x = torch.randn(256, head_dim, generator=torch.Generator().manual_seed(seed)) * 3
    bf = x.to(torch.bfloat16).float()
    f8 = fp8_codec.decode(fp8_codec.encode(x, rope_dim), rope_dim, head_dim)
    return {"bf16": float((bf - x).norm() / x.norm()), "fp8": float((f8 - x).norm() / x.norm())}


def measure(seeds: list[int], chunk: int = 3) -> dict:
    import torch

    threads = torch.get_num_threads()
    try:
        return _measure(seeds, chunk)
    finally:
        torch.set_num_threads(threads)


def _measure(seeds: list[int], chunk: int) -> dict:
    import torch
    from dsv4.runtime.checkpoint.random_init import write_random_checkpoint
    from dsv4.runtime.config import tiny
    from dsv4.runtime.model import load_model

    torch.set_num_threads(1)  # tiny shapes: several times faster without OpenMP spinning on a shared CPU
    cfg0 = tiny()
    n = 3 * cfg0.hca_ratio + 5
    rows: dict[str, list[dict]] = {f"{kv}+{ix}": [] for kv, ix in FORMATS}
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="dsv4-kv-error-") as d:
            write_random_checkpoint(cfg0, d, seed=seed)
            model, cfg, _ = load_model(d, progress=False, dtype="float32")
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        ref = _run(model, cfg, "fp32", "fp32", ids, chunk)
        for kv, ix in FORMATS:
            out = _run(model, cfg, kv, ix, ids, chunk)
            rows[f"{kv}+{ix}"].append({
                "seed": seed, "max_abs": float((out - ref).abs().max()),
                "rel_l2": float((out - ref).norm() / ref.norm()),
                "argmax": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                "ref_max_abs": float(ref.abs().max())})
    return {"preset": "tiny", "tokens": n, "chunk": chunk, "seeds": seeds,
            "codec_rel_l2": codec_error(cfg0.head_dim, cfg0.qk_rope_head_dim), "formats": rows}


def _rng(vals: list[float], fmt: str) -> str:
    """`median (min-max)` over the seeds."""
    v = sorted(vals)
    med = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return format(med, fmt) if v[0] == v[-1] else f"{format(med, fmt)} ({format(v[0], fmt)}-{format(v[-1], fmt)})"


def to_markdown(res: dict, command: str) -> str:
    c = res["codec_rel_l2"]
    lines = [f"# KV storage error vs fp32 KV (random {res['preset']} models, seeds {res['seeds']}, "
             f"{res['tokens']} tokens decoded {res['chunk']} at a time)", "", f"Command: `{command}`", "",
             "| KV + indexer keys | row codec rel. L2 | logits max abs diff | logits rel. L2 | argmax agreement |",
             "|---|---|---|---|---|"]
    for name, rs in res["formats"].items():
        codec = c["bf16"] if name.startswith("bf16") else c["fp8"]
        lines.append(f"| {name} | {100 * codec:.2f} % | {_rng([r['max_abs'] for r in rs], '.3g')} | "
                     f"{_rng([100 * r['rel_l2'] for r in rs], '.2f')} % | "
                     f"{_rng([100 * r['argmax'] for r in rs], '.0f')} % |")
    ref = max(r["ref_max_abs"] for rs in res["formats"].values() for r in rs)
    lines += ["", f"median (min-max) over the seeds; fp32 logits reach |{ref:.1f}|."]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.seeds < 1:
        print(f"error: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    seeds = [0] if args.smoke else list(range(args.seeds))
    res = measure(seeds)
    command = "dsv4 bench kv-error" + (" --smoke" if args.smoke else "") + \
        (f" --seeds {args.seeds}" if not args.smoke and args.seeds != 5 else "")
    res["command"] = command
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kv_error_smoke" if args.smoke else "kv_error"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = to_markdown(res, command)
    (out / f"{stem}.md").write_text(md)
    print(md + f"results: {out / (stem + '.json')}, {out / (stem + '.md')}")
    return 0
