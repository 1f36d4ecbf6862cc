"""`dsv4 bench kernels`: decode-step kernel bandwidth and the quantised-weight GEMMs at DeepSeek-V4-Flash shapes.

One decode step (one query token per sequence, batch B, context L) of each kernel:

- csa_attn (fp8 | bf16 rows): window 128 rows + top-512 compressed rows per query (64 heads x 512 dims, sink)
- hca_attn (fp8 | bf16 rows): window 128 rows + all L/128 compressed rows (split-K over the long list)
- idx_scan (bf16 | fp8 | fp4 keys): lightning-indexer scores over the L/4 visible indexer keys (64 heads x 128)
- idx_topk (fp32 scores): deterministic top-512 over the L/4 scores -> physical row ids (radix select)
- fp8_gemm (fp8 weight): bf16 x [tokens, 1024] times the FP8 `wq_b` [64·512, 1024] with 128x128 UE8M0 blocks
- fp4_moe (fp4 weight): the routed-expert w1 GEMM, 256 experts [2048, 4096] packed e2m1 + per-32 UE8M0, each token
  routed to 6 random experts (rows sorted by expert)

The GEMMs have no context: their rows use context 0 and batch = tokens (1 / 32 decode, 2048 prefill); bytes =
weight codes + scales of the experts that received rows, x read, y written; TFLOP/s = 2·rows·N·K / time.

Bytes moved = KV rows read (584 B FP8 rows, or 1024 B bf16; indexer keys 256 / 132 / 68 B) + row ids +
queries read + outputs written; top-k: scores and candidate ids read once (a lower bound: the radix
select reads them 5 times). Achieved GB/s = bytes / median time; % of peak against the device's HBM
peak (spec table below, or --peak-gbps) and against a measured device-to-device copy. Each
sequence's rows are scattered over its own physical pool (random permutation), as in a paged cache.

On CUDA it times the Triton kernels and the torch reference; on CPU only the references, at smoke
size (the Triton interpreter is not a performance path). Results: bench/results/kernels_<dev>.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# kernel -> storage formats benchmarked
KINDS = {"csa_attn": ("fp8", "bf16"), "hca_attn": ("fp8", "bf16"), "idx_scan": ("bf16", "fp8", "fp4"),
         "idx_topk": ("fp32",), "fp8_gemm": ("fp8",), "fp4_moe": ("fp4",)}
GEMMS = ("fp8_gemm", "fp4_moe")
# HBM peak of common devices, GB/s (vendor spec sheets)
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "H800": 3350.0, "B200": 8000.0, "A100": 2039.0, "L40S": 864.0}
H, D, ROPE, WINDOW, TOPK, CSA, HCA, HI, DI = 64, 512, 64, 128, 512, 4, 128, 64, 128
# GEMM shapes (N, K) and experts / choices per token; smoke: small enough for the CPU reference
FP8_NK, FP4_NK, EXPERTS, CHOICES = (H * D, 1024), (2048, 4096), 256, 6
SMOKE_FP8_NK, SMOKE_FP4_NK, SMOKE_EXPERTS = (512, 256), (256, 512), 16


def _peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_GBPS.items() if k in name.upper()), None)


def _time(fn, device: str, reps: int) -> float:
    """Median seconds per call."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _sig(v: float) -> float:
    """4 significant digits (CPU smoke rates are far below 0.001)."""
    return float(f"{v:.4g}")


def _copy_gbps(device: str) -> float:
    import torch

    x = torch.empty(256 * 2**20 if device == "cuda" else 16 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), device, 10)
    return 2 * x.numel() / t / 1e9


def _gemm_case(kind: str, tokens: int, smoke: bool, device: str, g):
    """Tensors, bytes and flops of one quantised-weight GEMM; returns (call(backend), bytes, flops)."""
    import torch
    from dsv4.kernels import dispatch

    if kind == "fp8_gemm":
        n, k = SMOKE_FP8_NK if smoke else FP8_NK
        q = torch.randint(0, 126, (n, k), device=device, generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
        s = torch.randint(120, 128, (-(-n // 128), -(-k // 128)), device=device, generator=g, dtype=torch.uint8)
        x = torch.randn(tokens, k, device=device, generator=g).bfloat16()
        nbytes = q.numel() + s.numel() + 2 * tokens * (k + n)
        return (lambda be: dispatch.fp8_block_gemm(x, q, s, backend=be)), nbytes, 2 * tokens * n * k
    n, k = SMOKE_FP4_NK if smoke else FP4_NK
    e = SMOKE_EXPERTS if smoke else EXPERTS
    codes = torch.randint(0, 256, (e, n, k // 2), device=device, generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 128, (e, n, k // 32), device=device, generator=g, dtype=torch.uint8)
    choices = torch.rand(tokens, e, device=device, generator=g).topk(CHOICES, dim=-1).indices
    counts = torch.bincount(choices.flatten(), minlength=e).tolist()
    rows = tokens * CHOICES
    x = torch.randn(rows, k, device=device, generator=g).bfloat16()
    used = sum(1 for c in counts if c)
    nbytes = used * n * (k // 2 + k // 32) + 2 * rows * (k + n)
    return (lambda be: dispatch.mxfp4_grouped_gemm(x, codes, scales, counts, backend=be)), nbytes, 2 * rows * n * k


def _case(kind: str, L: int, B: int, fmt: str, device: str, g):
    """Tensors and bytes of one decode step; returns (call(backend), bytes)."""
    import torch
    from dsv4.kernels import dispatch
    from dsv4.kernels.fp8_kv import fp8_row_bytes, quantize_kv_rows

    if kind == "idx_scan":
        from dsv4.kernels.index_quant import index_row_bytes, quantize_index_rows

        C = L // CSA
        q = torch.randn(B, HI, DI, device=device, generator=g).bfloat16()
        w = torch.randn(B, HI, device=device, generator=g)
        keys = torch.randn(B * C, DI, device=device, generator=g)
        fmt = None if fmt == "bf16" else fmt
        if fmt is None:
            keys = keys.bfloat16()
        else:  # in chunks: the fp4 reference quantiser materialises [rows, dim, 16]
            keys = torch.cat([quantize_index_rows(c, fmt) for c in keys.split(1 << 19)])
        row = 2 * DI if fmt is None else index_row_bytes(DI, fmt)
        cand = torch.randperm(B * C, device=device, generator=g).view(B, C)
        nbytes = B * C * (row + 8 + 4) + q.numel() * 2 + w.numel() * 4
        return (lambda be: dispatch.indexer_scores(q, w, keys, cand, index_format=fmt, backend=be)), nbytes
    if kind == "idx_topk":
        C = L // CSA
        scores = torch.randn(B, C, device=device, generator=g)
        cand = torch.randperm(B * C, device=device, generator=g).view(B, C)
        nbytes = B * C * (4 + 8) + B * TOPK * 8
        return (lambda be: dispatch.select_topk(scores, cand, TOPK, backend=be)), nbytes
    fp8 = fmt == "fp8"
    K = min(TOPK, L // CSA) if kind == "csa_attn" else L // HCA
    rows = B * (WINDOW + K)
    q = torch.randn(B, H, D, device=device, generator=g).bfloat16()
    kv = torch.randn(rows, D, device=device, generator=g)
    kv = quantize_kv_rows(kv, ROPE) if fp8 else kv.bfloat16()
    perm = torch.randperm(rows, device=device, generator=g)
    widx, cidx = perm[: B * WINDOW].view(B, WINDOW), perm[B * WINDOW:].view(B, K)
    sink = torch.randn(H, device=device, generator=g)
    row_bytes = fp8_row_bytes(D, ROPE) if fp8 else 2 * D
    nbytes = rows * (row_bytes + 8) + B * H * D * (2 + 4)
    return (lambda be: dispatch.sparse_attention(q, kv, widx, kv, cidx, sink, D ** -0.5, rope_dim=ROPE,
                                                 backend=be)), nbytes


def run_kernels(smoke: bool, device: str | None = None, peak_gbps: float | None = None, reps: int = 20,
                only: list[str] | None = None) -> dict:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    contexts = [8192, 131072, 1048576] if not smoke else [2048]
    batches = [1, 32] if not smoke else [1, 4]
    backends = ["triton", "torch"] if device == "cuda" else ["torch"]
    peak = _peak(name, peak_gbps) if device == "cuda" else peak_gbps
    copy = _copy_gbps(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []

    def measure(key: dict, call, nbytes: int, flops: int | None) -> None:
        n = reps if device == "cuda" else min(reps, 5)
        for be in backends:
            try:
                t = _time(lambda be=be: call(be), device, n)
            except torch.OutOfMemoryError:  # the torch references materialise gathers / dequantised weights
                rows.append(dict(key, backend=be, error="out of memory"))
                torch.cuda.empty_cache()
                continue
            gbps = nbytes / t / 1e9
            rows.append(dict(key, backend=be, us=round(t * 1e6, 1), mbytes=round(nbytes / 1e6, 3),
                             gbps=_sig(gbps), pct_peak=round(100 * gbps / peak, 1) if peak else None,
                             pct_copy=round(100 * gbps / copy, 1),
                             tflops=_sig(flops / t / 1e12) if flops else None))

    for kind, fmts in KINDS.items():
        if only and kind not in only:
            continue
        for fmt in fmts:
            if kind in GEMMS:
                for tokens in ([1, 4] if smoke else [1, 32, 2048]):
                    call, nbytes, flops = _gemm_case(kind, tokens, smoke, device, g)
                    measure(dict(kernel=kind, kv=fmt, context=0, batch=tokens), call, nbytes, flops)
                    del call
                    if device == "cuda":
                        torch.cuda.empty_cache()
                continue
            for L in contexts:
                for B in batches:
                    call, nbytes = _case(kind, L, B, fmt, device, g)
                    measure(dict(kernel=kind, kv=fmt, context=L, batch=B), call, nbytes, None)
                    del call
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return dict(device=name, smoke=smoke, peak_gbps=peak, copy_gbps=round(copy, 1), torch=torch.__version__,
                rows=rows)


def markdown(out: dict) -> str:
    peak = f"{out['peak_gbps']:.0f} GB/s" if out["peak_gbps"] else "unknown (pass --peak-gbps)"
    lines = [f"# Kernel bandwidth, {out['device']}{' (smoke)' if out['smoke'] else ''}", "",
             f"Peak HBM {peak}; measured device copy {out['copy_gbps']} GB/s; torch {out['torch']}.", "",
             "| kernel | kv | context | batch | backend | µs | MB moved | GB/s | % peak | % copy | TFLOP/s |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['kv']} | {r['context']} | {r['batch']} | {r['backend']} | "
                         f"{r['error']} | | | | | |")
            continue
        pp = "" if r["pct_peak"] is None else r["pct_peak"]
        tf = "" if r.get("tflops") is None else r["tflops"]
        lines.append(f"| {r['kernel']} | {r['kv']} | {r['context']} | {r['batch']} | {r['backend']} | {r['us']} | "
                     f"{r['mbytes']} | {r['gbps']} | {pp} | {r['pct_copy']} | {tf} |")
    return "\n".join(lines)


def write_results(out: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if out["device"] != "cpu" else "cpu"
    stem = f"kernels_{dev}{'_smoke' if out['smoke'] else ''}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(out, indent=1))
    paths["md"].write_text(markdown(out) + "\n")
    return paths


def add_arguments(p) -> None:
    p.add_argument("--smoke", action="store_true", help="small contexts (2K, batch 1/4); the only size on CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--peak-gbps", type=float, default=None, help="HBM peak for the %% column (default: spec table)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per case (median reported)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated kernels to run (default all: {','.join(KINDS)})")
    p.add_argument("--out", default="bench/results")


def run(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {args.reps}")
    smoke = args.smoke or device == "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA device: running the torch references at smoke size only")
    only = [k.strip() for k in args.only.split(",")] if args.only else None
    bad = [k for k in only or [] if k not in KINDS]
    if bad:
        raise SystemExit(f"--only: unknown kernel(s) {bad}; choose from {list(KINDS)}")
    out = run_kernels(smoke, device, args.peak_gbps, args.reps, only)
    paths = write_results(out, Path(args.out))
    print(markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
