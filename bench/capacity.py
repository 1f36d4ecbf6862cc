"""`dsv4 bench capacity`: how much live context one node holds under each SWA storage policy.

The real allocator (`CacheManager`, metadata-only) replays two workloads on the Flash or Pro cache
layout (FP8 KV, FP4 indexer keys):

- agent: N sessions share a P-token prefix (system prompt + tools); each turn appends U tokens
  (user / tool output) and generates G tokens; at most R sessions run at once, the others sit idle
  between turns (their history stays cached or gets evicted) until every session has reached L tokens.
- chat: short conversations (shared system prompt, a few turns of short messages), R at once.

The node budget (default one 8xH200 node: 8 x 141 GB minus FP8/FP4 weights, `bench/weights.py`)
is split over `ranks` data-parallel attention ranks (one per GPU: the single KV head is not sharded
by tensor parallelism, so each rank owns a separate cache); one rank is replayed and its results are
multiplied by `ranks` (sessions are routed to ranks, ranks share nothing).

The replay's budget is the ideal split (every byte of weights stored once on the node). The `layouts` section
gives what a replica of `--gpus` GPUs (`--gpu`, default 8 x H200) really holds in each layout the runtime serves,
per GPU exactly as the operator's planner computes it (`planner.gpu_memory`: usable = 90 % of memory, minus the
rank's weights and the step reserve) and sized by the same allocator (`capacity()` = `CacheSizing.from_budget`,
recompute policy, each workload's length and chunk):

- TP N: one KV cache (the single K=V head is not split: every rank holds all of it), weights split over N ranks;
- DP N + EP: N caches, one per attention rank, each GPU holding 1/N of the routed experts and every other tensor
  whole;
- DP d x TP t + EP (d * t = N, d, t >= 2, every t the model splits into): d caches, one per attention rank of t
  GPUs; each GPU holds 1/N of the routed experts, 1/t of the heads, output projections, shared expert and vocab,
  the rest whole (`weight_bytes_per_gpu_dp_tp`).

Sessions = caches x the sessions of `length` tokens one cache holds; tokens = sessions x length. Per workload the
section also names the layout holding the most tokens and its ratio to TP N.

Reported per policy: context tokens held (sum over sessions of the compressed history a session can
continue from without recomputing it, shared prefix counted per session), unique tokens held
(physical compressed history), sessions fully resident, recompute tokens paid on hits; plus the
physical bound `(budget - R*ranks*fixed) / slope` (fixed = window + compressor tails of a running
request, slope = compressed bytes per token) and the dense V3.2-style baseline `budget / (788 B x 61)`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dsv4.bench.results_io import write_triplet

from dsv4.settings_enums import CACHE_POLICIES, HCA_STATES

GB = 10**9
GIB = 2**30
V32_BYTES_PER_TOKEN = 788 * 61  # MLA 656 B + FP8 indexer 132 B per layer, 61 layers


@dataclass
class Workload:
    name: str
    sessions: int  # per rank
    length: int  # L: tokens per session at the end
    prefix: int  # P: shared prefix
    turn_tokens: int  # U: appended per turn (user / tool)
    gen_tokens: int  # G: generated per turn
    running: int  # R: sessions running at once per rank
    chunk: int = 2048  # prefill chunk
    decode_step: int = 64  # tokens per allocate/commit while decoding (metadata granularity)


def _tokens(s: int, n: int, prefix: int) -> list[int]:
    """Session s's first n tokens: the shared prefix, then session-private ids (grows by appending)."""
    head = list(range(1, min(n, prefix) + 1))
    base = 1_000_000 + s * 10_000_000
    return head + list(range(base, base + max(0, n - prefix)))


def _extend(toks: list[int], s: int, n: int, prefix: int) -> list[int]:
    """Grow session s's token list in place to its first n tokens (= `_tokens(s, n, prefix)`, without the copy)."""
    k = len(toks)
    if k < min(n, prefix):
        toks.extend(range(k + 1, min(n, prefix) + 1))
        k = len(toks)
    base = 1_000_000 + s * 10_000_000
    toks.extend(range(base + k - prefix, base + n - prefix))
    return toks


def replay(spec, budget: int, policy: str, w: Workload, checkpoint_every: int = 4) -> dict:
    """Replay workload `w` on one rank with `budget` bytes; returns the measurements."""
    from dsv4.runtime.cache.manager import CacheManager

    m = CacheManager.from_budget(spec, budget, expected_context=w.length, policy=policy, prefill_chunk=w.chunk,
                                 max_running=w.running, checkpoint_every=checkpoint_every)
    B = spec.block_size
    first = min(w.length, w.prefix + w.turn_tokens)
    length = [first] * w.sessions  # history length before the session's next turn (prompt of turn 1)
    done = [False] * w.sessions
    n_done = 0
    turns = recomputed = preempted = computed = 0
    nxt = 0
    peak_running_tokens = 0
    rounds = 0
    while n_done < w.sessions:
        rounds += 1
        if rounds > 100 * w.sessions * max(1, w.length // max(1, w.turn_tokens + w.gen_tokens)):
            raise RuntimeError(f"replay of {w.name} under {policy} makes no progress (preempted {preempted} times)")
        # round robin over the sessions not done yet (done ones are skipped; a batch never repeats a session)
        batch: list[int] = []
        in_batch: set[int] = set()
        while len(batch) < min(w.running, w.sessions - n_done):
            s = nxt % w.sessions
            nxt += 1
            if not done[s] and s not in in_batch:
                batch.append(s)
                in_batch.add(s)
        # start every session of the batch (prefix lookup), then prefill and decode them together
        state = {}
        for s in batch:
            toks = _tokens(s, length[s], w.prefix)
            hit = m.start(f"s{s}", toks)
            recomputed += hit.cached_tokens - hit.recompute_from
            state[s] = (toks, hit.recompute_from)
        target = {s: len(state[s][0]) + min(w.gen_tokens, w.length - length[s]) for s in batch}
        alive = set(batch)
        progress = True
        while progress:
            progress = False
            for s in list(alive):
                toks, n = state[s]
                if n >= target[s]:
                    continue
                step = w.chunk if n < len(toks) else w.decode_step
                n2 = min(n + step, len(toks)) if n < len(toks) else min(target[s], n + step)
                if not m.allocate(f"s{s}", n2):
                    m.free(f"s{s}")  # preempt and requeue: the turn is retried in a later round
                    alive.discard(s)
                    preempted += 1
                    continue
                full = _extend(toks, s, n2, w.prefix) if n2 > len(toks) else toks
                m.commit(f"s{s}", full, n2)
                computed += n2 - n
                state[s] = (full, n2)
                progress = True
            peak_running_tokens = max(peak_running_tokens, sum(state[s][1] for s in alive))
        for s in alive:
            toks, n = state[s]
            m.free(f"s{s}")
            turns += 1
            length[s] = min(w.length, n + w.turn_tokens)
            if n >= w.length and not done[s]:
                done[s] = True
                n_done += 1
    # measurement: every session idle; what can each continue from?
    held = resident = 0
    for s in range(w.sessions):
        toks = _tokens(s, w.length, w.prefix)
        hit = m.peek(toks)
        held += hit.cached_tokens
        if hit.cached_tokens >= ((w.length - 1) // B) * B:
            resident += 1
    st = m.stats()
    return {
        "policy": policy, "context_tokens_held": held, "unique_tokens_held": st.pools["csa"].tokens_held
        if "csa" in st.pools else st.pools["hca"].tokens_held,
        "sessions_resident": resident, "turns": turns, "tokens_computed": computed, "recompute_tokens": recomputed,
        "preemptions": preempted, "swa_checkpoints_kept": st.swa_checkpoints_kept,
        "bytes_used": st.bytes_used, "bytes_allocated": st.bytes_allocated,
        "pool_blocks": dict(m.num_blocks), "evictions": {p: v.evictions for p, v in st.pools.items()},
        "peak_running_tokens": peak_running_tokens,
    }


def node_budget(cfg, gpus: int = 8, gpu_gb: float = 141.0) -> tuple[int, int]:
    from dsv4.bench.weights import weight_bytes

    w = weight_bytes(cfg).bytes
    return int(gpus * gpu_gb * GB) - w, w


def workloads(smoke: bool, rank_bound_tokens: int) -> list[Workload]:
    """Session counts oversubscribe the physical bound of one rank by 10% in *unique* tokens (the shared prefix
    is stored once, so a session adds `length - prefix`), so capacity binds for every policy."""
    def n(length: int, prefix: int) -> int:
        return max(2, int(1.1 * rank_bound_tokens / (length - prefix)) + 1)

    if smoke:
        return [Workload("agent", n(8192, 1024), 8192, 1024, 1024, 256, running=4, chunk=512),
                Workload("chat", n(2048, 512), 2048, 512, 512, 256, running=8, chunk=512)]
    return [Workload("agent", n(131072, 16384), 131072, 16384, 8192, 512, running=32),
            Workload("chat", n(4096, 1024), 4096, 1024, 768, 256, running=128)]


def replica_layouts(cfg, gpus: int) -> list:
    """TP `gpus`, DP `gpus` + EP, and every DP d x TP t + EP with d * t = gpus, d, t >= 2, t a TP size the model
    splits into (`check_tp`) and `gpus` dividing the routed experts."""
    from dsv4.operator.planner import Parallelism
    from dsv4.runtime.parallel.ownership import TPConfigError, check_tp

    def splits(t: int) -> bool:
        try:
            check_tp(cfg, t)
        except TPConfigError:
            return False
        return True

    out = [Parallelism.tensor(gpus)] if splits(gpus) else []
    if gpus >= 2 and cfg.n_routed_experts % gpus == 0:
        out += [Parallelism.data(gpus // t, t) for t in range(1, gpus // 2 + 1) if gpus % t == 0 and splits(t)]
    return out


def layouts(model: str, ws: list[Workload], gpu: str = "H200", gpus: int = 8, hca_state: str = "raw") -> dict:
    """TP `gpus`, DP `gpus` + EP and DP d x TP t + EP on one replica of `gpus` x `gpu`: per-GPU memory, caches,
    sessions and tokens of each workload's length (module docstring)."""
    from dsv4.operator.capacity import capacity
    from dsv4.operator.hardware import accelerator
    from dsv4.operator.planner import gpu_memory, step_token_budget
    from dsv4.runtime.cache.spec import CacheSpec
    from dsv4.runtime.config import preset

    cfg, acc = preset(model), accelerator(gpu)
    # the planner's cache layout (fp8 KV, fp4 indexer keys, state blocks of the runtime's default size)
    spec = CacheSpec.from_model(cfg, "fp8", index_dtype="fp4", hca_state=hca_state)
    tp_label, dp_label = f"TP{gpus}", f"DP{gpus}+EP"
    out: dict = {"accelerator": gpu, "gpus": gpus, "quantization": "fp8-fp4", "policy": "recompute", "rows": [],
                 "dp_ep_vs_tp_tokens": {}, "best": {}}
    for w in ws:
        tokens = {}
        for par in replica_layouts(cfg, gpus):
            mem = gpu_memory(cfg, acc, par, "fp8-fp4", step_token_budget(w.chunk))
            caches = par.dp  # a TP group shares one cache
            row = {"workload": w.name, "length": w.length, "layout": par.label, "dp": par.dp, "tp": par.tp,
                   "caches": caches, "weights_per_gpu": mem.weights, "reserve_per_gpu": mem.reserve,
                   "usable_per_gpu": mem.usable, "cache_bytes_per_gpu": max(0, mem.cache), "fits": mem.cache > 0}
            cap = None if mem.cache <= 0 else capacity(
                spec, mem.cache, expected_context=w.length, policy="recompute",
                max_context_limit=cfg.max_position_embeddings, prefill_chunk=w.chunk)
            row["sessions_per_cache"] = cap.sessions if cap else 0
            row["sessions"] = caches * row["sessions_per_cache"]
            row["tokens"] = row["sessions"] * w.length
            row["longest_request"] = cap.max_request_tokens if cap else 0
            tokens[par.label] = row["tokens"]
            out["rows"].append(row)
        tp = tokens.get(tp_label, 0)
        out["dp_ep_vs_tp_tokens"][w.name] = tokens[dp_label] / tp if tp and dp_label in tokens else None
        best = max(tokens, key=lambda k: tokens[k])
        out["best"][w.name] = {"layout": best if tokens[best] else None, "tokens": tokens[best],
                               "vs_tp": tokens[best] / tp if tp else None}
    if model == "pro":  # issue 20's target
        out["targets"] = {"DP+EP >= 7x TP tokens (agent)": (out["dp_ep_vs_tp_tokens"].get("agent") or 0) >= 7}
    return out


def run_capacity(model: str = "flash", budget_gib: float | None = None, smoke: bool = False, ranks: int = 8,
                 checkpoint_every: int = 16, state_block_size: int | None = 4,
                 only: tuple[str, ...] = ("agent", "chat"), hca_state: str = "raw", layout_gpu: str = "H200",
                 layouts_only: bool = False) -> dict:
    from dsv4.runtime.cache.spec import CacheSpec
    from dsv4.runtime.config import preset

    cfg = preset(model)
    spec = CacheSpec.from_model(cfg, "fp8", index_dtype="fp4", state_block_size=state_block_size, hca_state=hca_state)
    default_budget, wbytes = node_budget(cfg)
    budget = int(budget_gib * GIB) if budget_gib else default_budget
    if smoke and not budget_gib:
        budget = 6 * GIB  # a few seconds; the full run uses the node budget
        ranks = 8
    if budget <= 0:
        raise ValueError(f"budget {budget} bytes <= 0: the weights ({wbytes / GB:.0f} GB) exceed the node")
    rank_budget = budget // ranks
    slope, fixed = spec.slope_bytes_per_token(), spec.fixed_bytes_per_request()
    out = {"model": model, "kv": "fp8 + fp4 indexer", "budget_bytes": budget, "weight_bytes": wbytes,
           "ranks": ranks, "block_size": spec.block_size, "swa_block_size": spec.swa_block_size,
           "state_block_size": spec.pools["csa_state"].tokens_per_block if "csa_state" in spec.pools else None,
           "slope_bytes_per_token": slope, "fixed_bytes_per_request": fixed, "smoke": smoke,
           "checkpoint_every": checkpoint_every, "selected_workloads": list(only), "hca_state": hca_state,
           "workloads": []}
    ws = [w for w in workloads(smoke, int((rank_budget - 8 * fixed) / slope)) if w.name in only]
    out["layouts"] = layouts(model, ws, layout_gpu, hca_state=hca_state)
    out["layouts_only"] = layouts_only
    for w in [] if layouts_only else ws:
        t0 = time.time()
        bound_tokens = int((budget - w.running * ranks * fixed) / slope)
        res = {"workload": asdict(w), "physical_bound_tokens": bound_tokens,
               "physical_bound_sessions": bound_tokens // w.length,
               "dense_v32_tokens": budget // V32_BYTES_PER_TOKEN,
               "dense_v32_sessions": budget // V32_BYTES_PER_TOKEN // w.length, "policies": {}}
        for pol in CACHE_POLICIES:
            r = replay(spec, rank_budget, pol, w, checkpoint_every)
            for k in ("context_tokens_held", "unique_tokens_held", "sessions_resident", "turns", "tokens_computed",
                      "recompute_tokens", "preemptions", "swa_checkpoints_kept", "bytes_used", "bytes_allocated",
                      "peak_running_tokens"):
                r[k] *= ranks
            r["fraction_of_bound"] = r["unique_tokens_held"] / bound_tokens
            res["policies"][pol] = r
        best = max(CACHE_POLICIES, key=lambda p: res["policies"][p]["unique_tokens_held"])
        full = res["policies"]["full"]["unique_tokens_held"] or 1
        res["best_policy"] = best
        res["best_vs_full"] = res["policies"][best]["unique_tokens_held"] / full
        # issue 4 sets the targets for the agent workload only
        res["targets"] = {"best >= 95% of bound": res["policies"][best]["fraction_of_bound"] >= 0.95,
                          "best >= 3x full": res["best_vs_full"] >= 3.0} if w.name == "agent" else {}
        res["seconds"] = round(time.time() - t0, 2)
        out["workloads"].append(res)
    return out


def markdown(out: dict) -> str:
    lines = [f"### {out['model']} — budget {out['budget_bytes'] / GB:.0f} GB "
             f"(weights {out['weight_bytes'] / GB:.0f} GB), {out['ranks']} ranks, "
             f"slope {out['slope_bytes_per_token']:.1f} B/token, fixed {out['fixed_bytes_per_request'] / 2**20:.1f} MiB"
             f"/running request, blocks {out['block_size']}/{out['swa_block_size']}/{out['state_block_size']} "
             f"(logical/swa/state), checkpoint K={out['checkpoint_every']}"
             f"{', online HCA state' if out.get('hca_state') == 'online' else ''}{' (smoke)' if out['smoke'] else ''}",
             ""]
    for res in out["workloads"]:
        w = res["workload"]
        lines += [f"**{w['name']}**: {w['sessions'] * out['ranks']} sessions x {w['length']} tokens, shared prefix "
                  f"{w['prefix']}, +{w['turn_tokens']}/+{w['gen_tokens']} per turn, {w['running'] * out['ranks']} "
                  f"running", "",
                  "| policy | unique tokens held | context tokens held | sessions resident | % of bound | "
                  "recompute tokens | checkpoints |", "|---|---|---|---|---|---|---|"]
        for pol, r in res["policies"].items():
            lines.append(f"| {pol} | {r['unique_tokens_held']:,} | {r['context_tokens_held']:,} | "
                         f"{r['sessions_resident']:,} | {100 * r['fraction_of_bound']:.1f}% | "
                         f"{r['recompute_tokens']:,} | {r['swa_checkpoints_kept']:,} |")
        lines.append(f"| physical bound | {res['physical_bound_tokens']:,} | | {res['physical_bound_sessions']:,} "
                     f"| 100% | | |")
        lines.append(f"| dense V3.2 (788 B x 61) | {res['dense_v32_tokens']:,} | | {res['dense_v32_sessions']:,} | "
                     f"{100 * res['dense_v32_tokens'] / res['physical_bound_tokens']:.1f}% | | |")
        t = res["targets"]
        verdict = ("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in t.items()) if t
                   else "no target for this workload (issue 4 sets them for agent)")
        frac = res["policies"][res["best_policy"]]["fraction_of_bound"]
        lines += ["", f"best policy `{res['best_policy']}`: {res['best_vs_full']:.1f}x `full`, {100 * frac:.1f}% of "
                  f"the bound; {verdict}", ""]
    if "layouts" in out:
        lines += layouts_markdown(out["layouts"])
    return "\n".join(lines)


def layouts_markdown(lay: dict) -> list[str]:
    gb = GB
    lines = [f"**Layouts of one replica on {lay['gpus']} x {lay['accelerator']}** ({lay['quantization']} weights, "
             f"{lay['policy']} policy, per GPU as the planner computes it)", "",
             "| workload | layout | KV caches | weights/GPU | reserve/GPU | cache/GPU | sessions | tokens | "
             "longest request |", "|---|---|---|---|---|---|---|---|---|"]
    for r in lay["rows"]:
        cache = (f"{r['cache_bytes_per_gpu'] / gb:.1f} GB" if r["fits"] else
                 f"does not fit ({r['usable_per_gpu'] / gb:.1f} GB usable)")
        lines.append(f"| {r['workload']} ({r['length']:,}) | {r['layout']} | {r['caches']} | "
                     f"{r['weights_per_gpu'] / gb:.1f} GB | {r['reserve_per_gpu'] / gb:.1f} GB | {cache} | "
                     f"{r['sessions']:,} | {r['tokens']:,} | {r['longest_request']:,} |")
    n = lay["gpus"]
    ratios = ", ".join(f"{k}: {'-' if v is None else f'{v:.2f}x'}" for k, v in lay["dp_ep_vs_tp_tokens"].items())
    lines += ["", f"DP{n}+EP / TP{n} tokens: {ratios}"]
    if lay.get("targets"):
        lines[-1] += "; " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in lay["targets"].items())
    best = [f"{name}: " + (f"{b['layout']}, {b['tokens']:,} tokens" + ("" if b["vs_tp"] is None else
                                                                          f" ({b['vs_tp']:.2f}x TP{n})")
                            if b["layout"] else "no layout fits") for name, b in lay.get("best", {}).items()]
    if best:
        lines += ["", "Most tokens: " + "; ".join(best)]
    return lines + [""]


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not out["workloads"]:  # --layouts-only: tokens per layout and workload
        lay = out["layouts"]
        fig, ax = plt.subplots(figsize=(6, 4))
        palette = ["#447", "#4a4", "#c84", "#a4a", "#4aa", "#777"]
        labels = list(dict.fromkeys(r["layout"] for r in lay["rows"]))
        fig.set_size_inches(max(6, 0.9 * len(lay["rows"])), 4)
        ax.bar([f"{r['workload']}\n{r['layout']}" for r in lay["rows"]], [r["tokens"] / 1e6 for r in lay["rows"]],
               color=[palette[labels.index(r["layout"]) % len(palette)] for r in lay["rows"]])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{out['model']}: one replica on {lay['gpus']} x {lay['accelerator']}")
        ax.set_ylabel("tokens held (M)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(out["workloads"]), figsize=(6 * len(out["workloads"]), 4))
    if len(out["workloads"]) == 1:
        axes = [axes]
    for ax, res in zip(axes, out["workloads"], strict=True):
        names = list(res["policies"]) + ["bound", "V3.2"]
        vals = [r["unique_tokens_held"] for r in res["policies"].values()]
        vals += [res["physical_bound_tokens"], res["dense_v32_tokens"]]
        ax.bar(names, [v / 1e6 for v in vals], color=["#c44", "#e93", "#4a4", "#777", "#447"])
        ax.set_title(f"{out['model']} / {res['workload']['name']}")
        ax.set_ylabel("unique tokens held (M)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: dict, out_dir: Path) -> dict[str, Path]:
    sel = out.get("selected_workloads", ["agent", "chat"])
    part = f"_{sel[0]}" if len(sel) == 1 else ""  # `--workload chat` must not overwrite the full results
    part += "_hca_online" if out.get("hca_state") == "online" else ""
    gpu = out.get("layouts", {}).get("accelerator", "H200")
    part += f"_{gpu}" if gpu != "H200" else ""
    part += "_layouts" if out.get("layouts_only") else ""
    return write_triplet(out, out_dir, f"capacity_{out['model']}{part}", markdown, plot)


def add_arguments(p) -> None:
    p.add_argument("--model", choices=["flash", "pro"], default="flash")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="KV budget of the node in GiB (default: 8 x 141 GB minus FP8/FP4 weights)")
    p.add_argument("--ranks", type=int, default=8, help="data-parallel attention ranks sharing the budget")
    p.add_argument("--checkpoint-every", type=int, default=16,
                   help="K of the checkpoint policy in logical blocks (0 = only each session's tail checkpoint)")
    p.add_argument("--state-block-size", type=int, default=4,
                   help="tokens per csa_state/hca_state block (the runtime default is swa_block_size = 64)")
    p.add_argument("--smoke", action="store_true", help="small budget and workloads; finishes in seconds")
    p.add_argument("--workload", choices=["agent", "chat", "all"], default="all")
    p.add_argument("--hca-state", choices=HCA_STATES, default="raw",
                   help="HCA compressor tail: raw rows (default) or the online-softmax single slot per group")
    p.add_argument("--layout-gpu", choices=["H100", "H200", "B200", "B200-192"], default="H200",
                   help="accelerator of the layouts section (TP 8, DP 8 + EP and DP x TP + EP on 8 of them)")
    p.add_argument("--layouts-only", action="store_true",
                   help="only the layouts section (TP vs DP (x TP) + EP, seconds), not the policy replay")
    p.add_argument("--out", default="bench/results")


def run(args) -> int:
    if args.ranks < 1:
        raise SystemExit(f"--ranks must be >= 1, got {args.ranks}")
    out = run_capacity(args.model, args.budget_gib, args.smoke, args.ranks, args.checkpoint_every,
                       args.state_block_size, ("agent", "chat") if args.workload == "all" else (args.workload,),
                       args.hca_state, args.layout_gpu, args.layouts_only)
    paths = write_results(out, Path(args.out))
    print(markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
