"""`dsv4 bench load`: checkpoint load time and peak host memory (RSS) relative to the checkpoint size.

Writes a random checkpoint of a preset's layer layout at a chosen size (hidden / expert width shrunk, the number
of routed experts solved for the target size), in two layouts:

* `hf`: the Hugging Face layout in bf16, sharded with `model.safetensors.index.json`;
* `fp8`: DeepSeek's published layout (FP8 e4m3 + 128x128 block scales, FP4 routed experts), loaded as bf16.

With `--tp 1,2,...` each layout is also loaded as rank 0 of an N-way tensor-parallel split (`TPShard`: only the
rank's rows / columns / experts are read). Each load runs in a fresh subprocess (`python -c`), which first reads
the checkpoint files twice: each file whole into new memory (`plain_MBps`, the throughput baseline) and through
one reused buffer (`seq_MBps`, page-cache copy speed), then reports

    load_s          wall time of `load_model` (config, headers, meta model, materialise, stream tensors in)
    base_rss        RSS after importing torch + dsv4 (before loading)
    peak_rss        VmHWM of /proc/self/status at the end, after resetting it to the current RSS before the load
                    (`clear_refs` 5). Not ru_maxrss: Linux carries the parent's high-water mark across
                    vfork + exec, so a bench process holding the freshly written weights would show up as the
                    child's peak.
    bytes_read      bytes the load read from the files (read_MBps = bytes_read / load_s)
    extra = peak_rss - base_rss;   ratio_ckpt = extra / checkpoint bytes;   ratio_model = extra / model bytes

Goal: ratio_model <= 1.3 (one copy of the weights plus one tensor in flight). For the `hf` layout the model
bytes equal the checkpoint bytes; the `fp8` checkpoint is smaller than the bf16 model it dequantises into,
so its ratio_ckpt is above 1 by construction (bf16 / FP8 = 2x, bf16 / FP4 = 4x).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 10**6
GOAL = 1.3
TARGET_RSS_FACTOR, TARGET_RSS_SLACK, TARGET_THROUGHPUT = 1.2, 256 * 2**20, 0.7  # issue 17 (`issue_targets`)
SIZES = {"default": (300 * MB, 1024, 512), "smoke": (8 * MB, 256, 128)}  # target bytes, hidden, expert inter

_CHILD = r"""
import json, os, resource, sys, time
import torch
from dsv4.runtime.model import load_model
import dsv4.runtime.checkpoint.loader, dsv4.runtime.tokenizer, safetensors.torch, tqdm  # imports are not load cost
torch.zeros(8, 8) @ torch.zeros(8, 8)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, progress, rank, world, weights = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cold = sys.argv[6] == "cold"
files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
def evict():  # drop the files' (clean) pages from the page cache: the next read comes from the disk
    for name in files:
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
if cold:
    evict()
plain_bytes, t0 = 0, time.perf_counter()
for name in files:  # the plain read (throughput baseline): each file read whole into memory of its own
    with open(os.path.join(path, name), "rb", buffering=0) as f:
        whole = bytearray(os.fstat(f.fileno()).st_size)
        view = memoryview(whole)
        while len(view) and (n := f.readinto(view)):
            plain_bytes += n
            view = view[n:]
        del view, whole
plain_s = time.perf_counter() - t0
buf, seq_bytes, t0 = bytearray(16 << 20), 0, time.perf_counter()
for name in files:  # page-cache copy speed: the (now cached) files through one reused 16 MiB buffer
    with open(os.path.join(path, name), "rb", buffering=0) as f:
        while (n := f.readinto(buf)):
            seq_bytes += n
seq_s = time.perf_counter() - t0
del buf
from dsv4.runtime.checkpoint.loader import TPShard, rank_byte_ranges
ranges = rank_byte_ranges(path, TPShard(rank, world) if world > 1 else None)
if cold:
    evict()
ranges_bytes, t0 = 0, time.perf_counter()
for name, rs in ranges.items():  # the rank's byte ranges alone, each into memory of its own: the disk's floor
    fd = os.open(name, os.O_RDONLY)
    try:
        if world > 1:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for lo, hi in rs:
            part = bytearray(hi - lo)
            ranges_bytes += os.preadv(fd, [part], lo)
            del part
    finally:
        os.close(fd)
ranges_s = time.perf_counter() - t0
if cold:
    evict()
base = rss()
try:  # reset the peak to the current RSS, so the import peak does not count as load cost
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
model, cfg, _ = load_model(path, dtype="bfloat16", progress=progress,
                           shard=TPShard(rank, world) if world > 1 else None, weights_dtype=weights)
dt = time.perf_counter() - t0
peak = hwm()
nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
meta = sum(1 for t in model.parameters() if t.is_meta)
print(json.dumps({"load_s": dt, "base_rss": base, "peak_rss": peak, "peak_reset": reset, "model_bytes": nbytes,
                  "meta_params": meta, "bytes_read": model.load_stats["bytes_read"], "seq_read_s": seq_s,
                  "seq_read_bytes": seq_bytes, "plain_read_s": plain_s, "plain_read_bytes": plain_bytes,
                  "ranges_read_s": ranges_s, "ranges_read_bytes": ranges_bytes}))
"""


def add_arguments(p) -> None:
    p.add_argument("--preset", default="tiny", help="layer layout to copy: tiny | flash | pro (default tiny)")
    p.add_argument("--size-mb", type=float, default=None,
                   help="approximate bf16 checkpoint size in MB (default 300; --smoke: 8)")
    p.add_argument("--layers", type=int, default=6, help="number of layers taken from the preset (default 6)")
    p.add_argument("--smoke", action="store_true", help="a few-MB checkpoint that loads in about a second (CI)")
    p.add_argument("--layouts", default="hf,fp8", help="comma list of hf, fp8 (default both)")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir, removed)")
    p.add_argument("--out", default="bench/results", help="results folder (load[_smoke].json/.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", default="1", help="comma list of TP sizes: each loads rank 0's part only (default 1)")
    p.add_argument("--cache", default="cold", choices=["cold", "warm"],
                   help="cold (default): the files are evicted from the page cache before the plain read and before "
                        "the load (both read the disk); warm: both read cached pages")
    p.add_argument("--weights-dtype", default="bf16", choices=["bf16", "checkpoint"],
                   help="bf16: dequantise FP8/FP4 at load (default); checkpoint: keep them quantised in memory")


def sized_config(preset: str, target_bytes: int, hidden: int, inter: int, layers: int, experts_multiple: int = 1):
    """The preset's first `layers` layer kinds with hidden / expert width shrunk and the routed-expert count
    chosen so that the bf16 checkpoint is about `target_bytes` (at least num_experts_per_tok + 1 experts, a
    multiple of `experts_multiple` so that the TP sizes measured split them)."""
    from dsv4.runtime.checkpoint.names import checkpoint_tensors
    from dsv4.runtime.config import preset as get_preset

    base = get_preset(preset)
    if not 1 <= layers <= base.num_hidden_layers:
        raise ValueError(f"--layers must be in [1, {base.num_hidden_layers}] for preset {preset!r}, got {layers}")
    if target_bytes <= 0:
        raise ValueError(f"--size-mb must be > 0, got {target_bytes / MB}")
    k = min(base.num_experts_per_tok, 4)
    vocab = min(base.vocab_size, 4096)
    common = dict(num_hidden_layers=layers, layer_types=list(base.layer_types[:layers]),
                  mlp_layer_types=list(base.mlp_layer_types[:layers]), hidden_size=hidden, moe_intermediate_size=inter,
                  vocab_size=vocab, num_experts_per_tok=k, torch_dtype="bfloat16",
                  num_attention_heads=min(base.num_attention_heads, 8), q_lora_rank=min(base.q_lora_rank, hidden),
                  o_lora_rank=min(base.o_lora_rank, hidden // 2), o_groups=min(base.o_groups, 2),
                  head_dim=min(base.head_dim, 128), qk_rope_head_dim=min(base.qk_rope_head_dim, 32),
                  index_n_heads=min(base.index_n_heads, 8), index_head_dim=min(base.index_head_dim, 64),
                  index_topk=min(base.index_topk, 16), num_nextn_predict_layers=1)

    def size(e: int) -> int:
        c = dataclasses.replace(base, **common, n_routed_experts=e)
        return 2 * sum(math.prod(s.shape) for s in checkpoint_tensors(c))

    lo = k + 1
    per_expert = size(lo + 1) - size(lo)
    e = max(lo, lo + round((target_bytes - size(lo)) / per_expert))
    e = -(-e // experts_multiple) * experts_multiple
    return dataclasses.replace(base, **common, n_routed_experts=e)


def write_checkpoints(cfg, root: Path, layouts: list[str], seed: int) -> dict[str, Path]:
    """Random bf16 weights -> root/hf (sharded HF layout) and/or root/fp8 (published layout)."""
    import torch
    from dsv4.runtime.checkpoint.published import to_published
    from dsv4.runtime.checkpoint.random_init import random_tensors
    from dsv4.runtime.checkpoint.writer import write_config, write_safetensors

    tensors = random_tensors(cfg, seed=seed, dtype=torch.bfloat16)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shard = max(1 << 20, total // 4 + 1)  # ~4 shards + index
    out = {}
    d = cfg.to_dict()
    d["torch_dtype"] = "bfloat16"
    if "hf" in layouts:
        write_safetensors(root / "hf", tensors, max_shard_bytes=shard)
        write_config(root / "hf", d)
        out["hf"] = root / "hf"
    if "fp8" in layouts:
        pub = {name: t for name, t, _ in to_published(cfg, tensors)}
        del tensors
        write_safetensors(root / "fp8", pub, max_shard_bytes=shard)
        write_config(root / "fp8", d)
        out["fp8"] = root / "fp8"
    for path in out.values():
        (path / "bench_seed").write_text(f"{seed}\n")
    return out


def _written(path: Path, cfg, seed: int) -> bool:
    """A checkpoint of this config and seed is already in `path` (a `--workdir` kept from an earlier run)."""
    stamp = path / "bench_seed"
    try:
        written = json.loads((path / "config.json").read_text())
        return (written["n_routed_experts"] == cfg.n_routed_experts and written["hidden_size"] == cfg.hidden_size
                and stamp.read_text().strip() == str(seed))
    except (OSError, ValueError, KeyError):
        return False


def measure(path: Path, progress: bool = False, tp: int = 1, weights_dtype: str = "bf16", cache: str = "cold"
            ) -> dict:
    """Load `path` (rank 0's part of a `tp`-way split) in a fresh interpreter and return its timings / RSS figures
    (see the module docstring). `cache="cold"`: the plain read and the load each start with the files evicted from
    the page cache (read from the disk, as a new pod does); "warm": both read cached pages."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), "1" if progress else "0", "0", str(tp),
                        weights_dtype, cache], check=False,
                       stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"loading {path} failed in the subprocess: {(r.stderr or '').strip()[-2000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    files = [p for p in path.iterdir() if p.suffix == ".safetensors"]
    m["checkpoint_bytes"] = sum(p.stat().st_size for p in files)
    m["files"] = len(files)
    extra = m["peak_rss"] - m["base_rss"]
    m["extra_rss"] = extra
    m["ratio_ckpt"] = extra / m["checkpoint_bytes"]
    m["ratio_model"] = extra / m["model_bytes"]
    m["load_MBps"] = m["checkpoint_bytes"] / MB / m["load_s"] if m["load_s"] > 0 else float("inf")
    m["tp"] = tp
    m["weights_dtype"] = weights_dtype
    m["cache"] = cache
    m["read_MBps"] = m["bytes_read"] / MB / m["load_s"] if m["load_s"] > 0 else float("inf")
    m["seq_MBps"] = m["seq_read_bytes"] / MB / m["seq_read_s"] if m["seq_read_s"] > 0 else float("inf")
    m["plain_MBps"] = m["plain_read_bytes"] / MB / m["plain_read_s"] if m["plain_read_s"] > 0 else float("inf")
    m["ranges_MBps"] = m["ranges_read_bytes"] / MB / m["ranges_read_s"] if m["ranges_read_s"] > 0 else float("inf")
    m.update(issue_targets(m))
    return m


def issue_targets(m: dict) -> dict:
    """Issue 17's per-rank targets for a load: extra RSS <= 1.2 x checkpoint bytes / TP + 256 MiB, and load
    throughput (bytes the rank read / load s) >= 0.7 x the plain read of the same files."""
    bound = TARGET_RSS_FACTOR * m["checkpoint_bytes"] / m["tp"] + TARGET_RSS_SLACK
    ratio = m["read_MBps"] / m["plain_MBps"] if m["plain_MBps"] > 0 else 0.0
    return {"target_rss_bound": bound, "target_rss_ok": m["extra_rss"] <= bound,
            "throughput_vs_plain": ratio, "target_throughput_ok": ratio >= TARGET_THROUGHPUT}


def to_markdown(res: dict) -> str:
    c = res["config"]
    lines = [f"# Checkpoint load ({res['preset']} layout, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
             f"{c['n_routed_experts']} experts)", "",
             f"Command: `{res['command']}`", "",
             "| layout | files | checkpoint MB | model MB (per rank) | load s | read MB | read MB/s | plain read MB/s "
             "(page-cache copy) | rank's ranges MB/s | read / plain | extra RSS MB | RSS / model | "
             "goal <= 1.3 x model | RSS <= 1.2 x ckpt/TP + 256 MiB | read >= 0.7 x plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["layouts"].items():
        def yes(ok: bool) -> str:
            return "yes" if ok else "NO"

        lines.append(f"| {name} | {m['files']} | {m['checkpoint_bytes'] / MB:.1f} | {m['model_bytes'] / MB:.1f} | "
                     f"{m['load_s']:.2f} | {m['bytes_read'] / MB:.1f} | {m['read_MBps']:.0f} | {m['plain_MBps']:.0f} "
                     f"({m['seq_MBps']:.0f}) | {m['ranges_MBps']:.0f} | {m['throughput_vs_plain']:.2f} | "
                     f"{m['extra_rss'] / MB:.1f} | "
                     f"{m['ratio_model']:.2f} | {yes(m['ratio_model'] <= GOAL)} | "
                     f"{yes(m['target_rss_ok'])} ({m['target_rss_bound'] / MB:.0f} MB) | "
                     f"{yes(m['target_throughput_ok'])} |")
    lines += ["", "extra RSS = peak RSS of the loading process minus its RSS after imports; model MB = parameters + "
              "buffers after loading (FP8/FP4 weights dequantised to bf16, or kept as stored with `--weights-dtype "
              "checkpoint`); `tpN` rows load rank 0's part of an N-way split (`TPShard`); read MB = bytes the "
              "load read; plain read = the same process first reading each checkpoint file whole into memory of "
              "its own (the throughput baseline: a loader must also fault in the memory it fills), page-cache "
              "copy = the files read through one reused 16 MiB buffer (no new memory: an upper bound no loader "
              "that keeps the bytes reaches); rank's ranges = just the byte ranges this rank's load reads, each into "
              "new memory (the disk's floor for a rank that needs only its part of each file)."]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    kind = "smoke" if args.smoke else "default"
    target, hidden, inter = SIZES[kind]
    if args.size_mb is not None:
        target = int(args.size_mb * MB)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    try:
        tps = [int(x) for x in str(args.tp).split(",") if x.strip()]
    except ValueError:
        tps = []
    if not tps or min(tps) < 1:
        print(f"error: --tp must be a comma list of TP sizes >= 1; got {args.tp!r}", file=sys.stderr)
        return 2
    bad = sorted(set(layouts) - {"hf", "fp8"})
    if bad or not layouts:
        print(f"error: --layouts must be a comma list of hf, fp8; got {args.layouts!r}", file=sys.stderr)
        return 2
    try:
        cfg = sized_config(args.preset, target, hidden, inter, args.layers, math.lcm(*tps))
    except ValueError as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = None
    root = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp(prefix="dsv4-bench-load-"))
    try:
        t0 = time.perf_counter()
        paths = {name: root / name for name in layouts}
        if all(_written(paths[name], cfg, args.seed) for name in layouts):
            print(f"reusing the {', '.join(layouts)} checkpoint(s) of this size and seed under {root}")
        else:
            paths = write_checkpoints(cfg, root, layouts, args.seed)
            print(f"wrote {', '.join(layouts)} checkpoint(s) of {cfg.n_routed_experts} experts x "
                  f"{cfg.num_hidden_layers} layers in {time.perf_counter() - t0:.1f} s under {root}")
        res = {"preset": args.preset, "kind": kind, "goal_ratio_model": GOAL,
               "command": "dsv4 bench load" + (" --smoke" if args.smoke else "")
               + (f" --size-mb {args.size_mb:g}" if args.size_mb is not None else "")
               + (f" --preset {args.preset}" if args.preset != "tiny" else "")
               + (f" --layouts {','.join(layouts)}" if layouts != ["hf", "fp8"] else "")
               + (f" --tp {args.tp}" if tps != [1] else "")
               + (f" --weights-dtype {args.weights_dtype}" if args.weights_dtype != "bf16" else "")
               + (" --cache warm" if args.cache == "warm" else ""),
               "cache": args.cache,
               "config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "moe_intermediate_size",
                                                       "n_routed_experts", "vocab_size")},
               "layouts": {}}
        for (name, path), tp in ((item, tp) for tp in tps for item in paths.items()):
            m = measure(path, progress=not args.smoke and sys.stderr.isatty(), tp=tp, weights_dtype=args.weights_dtype,
                        cache=args.cache)
            name = name if tp == 1 else f"{name} tp{tp}"
            res["layouts"][name] = m
            print(f"{name:>8}: {m['checkpoint_bytes'] / MB:8.1f} MB in {m['files']} file(s), "
                  f"load {m['load_s']:6.2f} s, "
                  f"extra RSS {m['extra_rss'] / MB:8.1f} MB = {m['ratio_ckpt']:.2f} x checkpoint, "
                  f"{m['ratio_model']:.2f} x model ({m['model_bytes'] / MB:.1f} MB bf16)")
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "load_smoke" if args.smoke else "load"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(res))
    print(f"results: {out / (stem + '.json')}, {out / (stem + '.md')}")
    worst = max(m["ratio_model"] for m in res["layouts"].values())
    return 0 if worst <= GOAL or not os.environ.get("DSV4_BENCH_STRICT") else 1
