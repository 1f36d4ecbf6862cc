"""`dsv4 bench serving`: guidellm against a live `dsv4 serve` on the tiny model.

For each batching delay (default 0 and 20 ms, the `--batching-delay-ms` knob of the serving profiles) a real
`dsv4 serve` subprocess is started on the tiny checkpoint (`~/.cache/dsv4/models/tiny`, built by `make
setup`), and guidellm (PyPI, pinned, in its own venv: `bench/guidellm_env.py`) runs one scenario per prompt
mix against its OpenAI endpoint (`/v1/completions`, streaming):

    mixes        short: 128 prompt tokens -> 64 output tokens;  long: 2,048 -> 64
                 (guidellm `synthetic_text` data, exact token counts with the model's own tokenizer;
                 `ignore_eos`, so every request generates its output length)
    profile      `concurrent` with N streams (closed loop: N requests in flight), swept over N
    per point    max(16, 2 N) requests (max_requests constraint), at most 120 s
    memory       the server's peak RSS per mix (`bench/rss_watch.py`: VmHWM reset at the mix's start + sampling);
                 `--heap both` runs every point against a server with the retained-heap bound and one without
                 (`DSV4_RETAINED_HEAP_MIB=unbounded`, runtime/malloc_tuning.py) and reports the ratios

From guidellm's JSON report (`benchmarks[].metrics`) each point keeps: requests/s and output tokens/s (totals of
successful requests over the benchmark's duration), TTFT and ITL p50/p99 in ms, the mean prompt/output tokens
the server reported (usage), and errored/incomplete counts. Results: `bench/results/serving[_smoke].{json,md,png}`
plus guidellm's scenarios, raw reports and logs under `--raw` (a temporary folder by default).

The tiny model makes the server's Python/HTTP path, the scheduler and batching the cost, not the network: the
figures compare configurations on one host, they are not a capacity claim for a real model.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsv4.bench.results_io import write_triplet
from dsv4.bench.rss_watch import RssWatch

from dsv4.paths import cache_root

DEFAULT_MODEL = cache_root() / "models" / "tiny"


@dataclass(frozen=True)
class Mix:
    name: str
    prompt_tokens: int
    output_tokens: int
    streams: tuple[int, ...]  # concurrency sweep


@dataclass(frozen=True)
class Plan:
    delays_ms: tuple[float, ...]
    mixes: tuple[Mix, ...]
    min_requests: int  # per point: max(min_requests, 2 * streams)
    max_seconds: float  # per point


PLANS = {
    "full": Plan(delays_ms=(0.0, 20.0),
                 mixes=(Mix("short", 128, 64, (1, 4, 16, 64)), Mix("long", 2048, 64, (1, 4, 16))),
                 min_requests=16, max_seconds=120.0),
    "smoke": Plan(delays_ms=(0.0,), mixes=(Mix("short", 32, 8, (2,)),), min_requests=4, max_seconds=30.0),
}


# selectable with --mixes, not in the default sweep: the long-prompt memory check of docs/benchmarks.md
EXTRA_MIXES = (Mix("long4k", 4096, 16, (4,)),)
HEAPS = {"bounded": {}, "unbounded": {"DSV4_RETAINED_HEAP_MIB": "unbounded"}}


def validate_plan(plan: Plan, max_model_len: int | None = None) -> None:
    """Clear errors naming the field and limit; `max_model_len` is the server's, when known."""
    if not plan.delays_ms:
        raise ValueError("--delays must name at least one batching delay")
    for d in plan.delays_ms:
        if not 0 <= d <= 10_000:
            raise ValueError(f"--delays entries must be in [0, 10000] ms, got {d:g}")
    if plan.min_requests < 1:
        raise ValueError(f"--requests must be >= 1, got {plan.min_requests}")
    for m in plan.mixes:
        if m.prompt_tokens < 1 or m.output_tokens < 1:
            raise ValueError(f"mix {m.name}: prompt and output tokens must be >= 1, got {m.prompt_tokens}, "
                             f"{m.output_tokens}")
        if max_model_len is not None and m.prompt_tokens + m.output_tokens > max_model_len:
            raise ValueError(f"mix {m.name}: prompt + output = {m.prompt_tokens + m.output_tokens} tokens exceeds "
                             f"the server's max_model_len {max_model_len}")
        if not m.streams:
            raise ValueError(f"--streams: mix {m.name} needs at least one concurrency")
        for n in m.streams:
            if not 1 <= n <= 1024:
                raise ValueError(f"--streams entries must be in [1, 1024], got {n}")


def requests_for(plan: Plan, streams: int) -> int:
    return max(plan.min_requests, 2 * streams)


def scenario(target: str, model_name: str, tokenizer_dir: str, mix: Mix, plan: Plan, report: Path) -> dict:
    """A guidellm 0.8.1 scenario file (`guidellm run -c FILE`): one benchmark per concurrency of the sweep.

    `max_requests` takes one count per benchmark (it grows with the streams); each point also stops at
    `max_seconds`."""
    return {
        "metadata": {"name": f"dsv4-{mix.name}", "description": "dsv4 bench serving (generated)"},
        "spec": {
            "backend": {"kind": "openai_http", "target": target, "model": model_name,
                        "request_format": "/v1/completions", "stream": True},
            "profile": {"kind": "concurrent", "streams": mix.streams[0]},
            "tokenizer": {"kind": "huggingface_auto", "model": tokenizer_dir},
            "data": [{"kind": "synthetic_text", "prompt_tokens": mix.prompt_tokens,
                      "output_tokens": mix.output_tokens}],
            "constraints": [{"kind": "max_requests", "count": [requests_for(plan, n) for n in mix.streams]},
                            {"kind": "max_duration", "seconds": plan.max_seconds}],
            "seed": {"kind": "static", "value": 42},
            "outputs": [{"kind": "json", "path": str(report)}],
        },
        "benchmarks": [{"profile.streams": n} for n in mix.streams],
    }


def _dist(metrics: dict, key: str) -> dict:
    return metrics[key]["successful"]


def parse_report(report: dict) -> list[dict]:
    """One row per guidellm benchmark (concurrency point) of a guidellm JSON report."""
    rows = []
    for b in report["benchmarks"]:
        m = b["metrics"]
        totals = m["request_totals"]
        dur = float(b["duration"])
        out_tok = float(_dist(m, "output_token_count")["total_sum"])
        all_tok = out_tok + float(_dist(m, "prompt_token_count")["total_sum"])
        ttft, itl = _dist(m, "time_to_first_token_ms"), _dist(m, "inter_token_latency_ms")
        ok = int(totals["successful"])
        rows.append({
            "streams": int(b["config"]["strategy"]["streams"]),
            "successful": ok, "errored": int(totals["errored"]), "incomplete": int(totals["incomplete"]),
            "duration_s": dur,
            "requests_per_s": ok / dur if dur > 0 else 0.0,
            "output_tokens_per_s": out_tok / dur if dur > 0 else 0.0,
            "tokens_per_s": all_tok / dur if dur > 0 else 0.0,  # prompt + output: long prompts' throughput
            "ttft_ms_p50": float(ttft["percentiles"]["p50"]) if ok else None,
            "ttft_ms_p99": float(ttft["percentiles"]["p99"]) if ok else None,
            "itl_ms_p50": float(itl["percentiles"]["p50"]) if ok else None,
            "itl_ms_p99": float(itl["percentiles"]["p99"]) if ok else None,
            "prompt_tokens_mean": float(_dist(m, "prompt_token_count")["mean"]) if ok else None,
            "output_tokens_mean": float(_dist(m, "output_token_count")["mean"]) if ok else None,
            "concurrency_mean": float(_dist(m, "request_concurrency")["mean"]) if ok else None,
        })
    return rows


def delay_effect(runs: list[dict]) -> list[dict]:
    """For each mix and concurrency measured at the first delay and another: the other's figures / the first's."""
    return [{"mix": e["mix"], "streams": e["streams"], "delay_ms": e["value"], "vs_delay_ms": e["vs"],
             **{k: e[k] for k in ("throughput_ratio", "ttft_p50_ratio", "itl_p50_ratio")}}
            for e in effect(runs, "delay_ms") if e["heap"] == e["vs_heap"]]


def heap_effect(runs: list[dict]) -> list[dict]:
    """Same mix, delay and concurrency with the retained-heap bound against without it (bounded / unbounded):
    throughput, latency and the mix's peak RSS."""
    return [{"mix": e["mix"], "streams": e["streams"], "delay_ms": e["delay_ms"], **{k: e[k] for k in (
        "throughput_ratio", "tokens_ratio", "ttft_p50_ratio", "itl_p50_ratio", "peak_rss_ratio")}}
            for e in effect(runs, "heap", base="unbounded")]


def effect(runs: list[dict], field: str, base: Any = None) -> list[dict]:
    """Ratios of every point to the same point (mix, streams, the other run keys) at `base` (default: the
    smallest value of `field`)."""
    values = sorted({r.get(field, "bounded") for r in runs})
    base = values[0] if base is None else base
    if len(values) < 2 or base not in values:
        return []
    key = ("mix", "delay_ms", "heap")

    def ident(r: dict) -> tuple:
        return tuple(r.get(k, "bounded") for k in key if k != field)

    by = {(ident(r), r.get(field, "bounded"), p["streams"]): (r, p) for r in runs for p in r["points"]}
    out = []
    for (rid, v, n), (r, p) in sorted(by.items(), key=lambda kv: str(kv[0])):
        found = by.get((rid, base, n))
        if v == base or found is None or not found[1]["successful"] or not p["successful"]:
            continue
        br, b = found
        peak, bpeak = r.get("peak_rss_bytes"), br.get("peak_rss_bytes")
        out.append({"mix": r["mix"], "streams": n, "delay_ms": r["delay_ms"], "heap": r.get("heap", "bounded"),
                    "vs_heap": br.get("heap", "bounded"), "value": v, "vs": base,
                    "throughput_ratio": p["output_tokens_per_s"] / b["output_tokens_per_s"],
                    "tokens_ratio": (p["tokens_per_s"] / b["tokens_per_s"] if b.get("tokens_per_s") else None),
                    "ttft_p50_ratio": p["ttft_ms_p50"] / b["ttft_ms_p50"],
                    "itl_p50_ratio": p["itl_ms_p50"] / b["itl_ms_p50"],
                    "peak_rss_ratio": peak / bpeak if peak and bpeak else None})
    return out


# ---- processes ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


class Server:
    """`dsv4 serve` as a subprocess on a free port; `stop()` sends SIGTERM (drain) then waits."""

    def __init__(self, model_dir: Path, delay_ms: float, log: Path, extra: list[str] | None = None,
                 startup_s: float = 120.0, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "dsv4.cli", "serve", "--model", str(model_dir), "--device", "cpu",
               "--port", str(self.port), "--batching-delay-ms", f"{delay_ms:g}", "--grace-period-s", "5",
               "--log-level", "warning", *(extra or [])]
        self.cmd = cmd
        self._f = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        deadline = time.time() + startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsv4 serve exited {self.proc.returncode} at startup:\n{self.tail()}")
            ready = _get_json(self.url + "/ready")
            if ready and ready.get("ready"):
                models = _get_json(self.url + "/v1/models") or {}
                data = models.get("data") or [{}]
                self.model_name = str(data[0].get("id", model_dir.name))
                self.max_model_len = data[0].get("max_model_len")
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"dsv4 serve not ready within {startup_s:g} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        self._f.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()


def run_guidellm(exe: Path, scenario_path: Path, log: Path, timeout_s: float) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "w") as f:
        try:
            r = subprocess.run([str(exe), "run", "-c", str(scenario_path), "--disable-progress"],
                               stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"guidellm ran past {timeout_s:g} s; log: {log}") from None
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"guidellm exited {r.returncode}; log {log}:\n{tail}")


def run_serving(plan: Plan, smoke: bool, model_dir: Path, raw_dir: Path,
                say: Any = print, serve_args: list[str] | None = None, heaps: tuple[str, ...] = ("bounded",)) -> dict:
    from dsv4.bench import guidellm_env

    validate_plan(plan)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"--model {model_dir}: no config.json (run `make setup` to build the tiny model)")
    if not (model_dir / "tokenizer.json").exists():
        raise ValueError(f"--model {model_dir}: no tokenizer.json (guidellm needs the model's tokenizer)")
    exe = guidellm_env.ensure(say=say)
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    raw_dir.mkdir(parents=True)
    t0 = time.time()
    runs = []
    for heap, delay in [(h, d) for h in heaps for d in plan.delays_ms]:
        name = f"delay{delay:g}" + ("" if heaps == ("bounded",) else f"_{heap}")
        say(f"[serving] dsv4 serve --batching-delay-ms {delay:g} {' '.join(serve_args or [])} (heap {heap}) ...")
        server = Server(model_dir, delay, raw_dir / f"serve_{name}.log", extra=serve_args, env=HEAPS[heap])
        try:
            validate_plan(plan, server.max_model_len)
            for mix in plan.mixes:
                tag = f"{mix.name}_{name}"
                report_path = raw_dir / f"guidellm_{tag}.json"
                scen = scenario(server.url, server.model_name, str(model_dir), mix, plan, report_path)
                scen_path = raw_dir / f"scenario_{tag}.json"
                scen_path.write_text(json.dumps(scen, indent=1))
                say(f"[serving]   guidellm: mix {mix.name} ({mix.prompt_tokens} -> {mix.output_tokens} tokens), "
                    f"streams {','.join(map(str, mix.streams))}")
                t1 = time.time()
                watch = RssWatch(server.proc.pid)
                try:
                    run_guidellm(exe, scen_path, raw_dir / f"guidellm_{tag}.log",
                                 timeout_s=60 + len(mix.streams) * (plan.max_seconds + 30))
                finally:
                    peak = watch.stop()
                points = parse_report(json.loads(report_path.read_text()))
                if not any(p["successful"] for p in points):
                    raise RuntimeError(f"guidellm: no successful request for mix {mix.name} at delay {delay:g} ms "
                                       f"(see {raw_dir}); server log:\n{server.tail()}")
                runs.append({"delay_ms": delay, "heap": heap, "mix": mix.name, "prompt_tokens": mix.prompt_tokens,
                             "output_tokens": mix.output_tokens, "seconds": round(time.time() - t1, 1),
                             "start_rss_bytes": watch.start_rss, "peak_rss_bytes": peak, "points": points})
        finally:
            server.stop()
    import torch

    return {"bench": "serving", "smoke": smoke, "model": str(model_dir), "client": "guidellm",
            "guidellm_version": guidellm_env.GUIDELLM_VERSION, "endpoint": "/v1/completions (streaming)",
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
            "load_average": list(os.getloadavg()),
            "plan": {"delays_ms": list(plan.delays_ms), "mixes": [asdict(m) for m in plan.mixes],
                     "min_requests": plan.min_requests, "max_seconds": plan.max_seconds},
            "serve_args": list(serve_args or []), "runs": runs, "delay_effect": delay_effect(runs),
            "heap_effect": heap_effect(runs), "seconds": round(time.time() - t0, 1)}


# ---- outputs ------------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = ".1f") -> str:
    return "—" if v is None else format(v, fmt)


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def markdown(out: dict) -> str:
    lines = [f"### serving{' (smoke)' if out['smoke'] else ''} — guidellm {out['guidellm_version']} against "
             f"`dsv4 serve` ({Path(out['model']).name} model, CPU, {out['machine']}), {out['endpoint']}", "",
             "| mix (prompt -> output) | batching delay | streams | requests ok / err | req/s | output tok/s "
             "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | server RSS start / peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        heap = "" if r.get("heap", "bounded") == "bounded" else f", heap {r['heap']}"
        for p in r["points"]:
            lines.append(
                f"| {r['mix']} ({r['prompt_tokens']} -> {r['output_tokens']}) | {r['delay_ms']:g} ms{heap} "
                f"| {p['streams']} | {p['successful']} / {p['errored'] + p['incomplete']} | {p['requests_per_s']:.2f} "
                f"| {p['output_tokens_per_s']:.1f} | {_f(p['ttft_ms_p50'])} | {_f(p['ttft_ms_p99'])} "
                f"| {_f(p['itl_ms_p50'])} | {_f(p['itl_ms_p99'])} | {_gib(r.get('start_rss_bytes'))} / "
                f"{_gib(r.get('peak_rss_bytes'))} |")
    if out["delay_effect"]:
        lines += ["", "Batching delay, same mix and streams (ratio = delayed / undelayed):", "",
                  "| mix | streams | delay | output tok/s ratio | TTFT p50 ratio | ITL p50 ratio |",
                  "|---|---|---|---|---|---|"]
        for e in out["delay_effect"]:
            lines.append(f"| {e['mix']} | {e['streams']} | {e['delay_ms']:g} vs {e['vs_delay_ms']:g} ms "
                         f"| {e['throughput_ratio']:.2f} | {e['ttft_p50_ratio']:.2f} | {e['itl_p50_ratio']:.2f} |")
    if out.get("heap_effect"):
        lines += ["", "Retained-heap bound, same mix, delay and streams (ratio = bounded / unbounded; the peak RSS "
                  "is the mix's, over all its streams):", "",
                  "| mix | delay | streams | output tok/s ratio | prompt + output tok/s ratio | TTFT p50 ratio "
                  "| ITL p50 ratio | peak RSS ratio |", "|---|---|---|---|---|---|---|---|"]
        for e in out["heap_effect"]:
            lines.append(f"| {e['mix']} | {e['delay_ms']:g} ms | {e['streams']} | {e['throughput_ratio']:.2f} "
                         f"| {_f(e['tokens_ratio'], '.2f')} | {e['ttft_p50_ratio']:.2f} | {e['itl_p50_ratio']:.2f} "
                         f"| {_f(e['peak_rss_ratio'], '.2f')} |")
    lines.append(f"\nWall time {out['seconds']:g} s.")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in out["runs"]:
        pts = [p for p in r["points"] if p["successful"]]
        label = f"{r['mix']} ({r['prompt_tokens']}->{r['output_tokens']}), delay {r['delay_ms']:g} ms"
        style = "-o" if r["delay_ms"] == 0 else "--s"
        xs = [p["streams"] for p in pts]
        a1.plot(xs, [p["output_tokens_per_s"] for p in pts], style, label=label)
        a2.plot(xs, [p["ttft_ms_p50"] for p in pts], style, label=label)
    for ax, title, ylabel in ((a1, "throughput", "output tokens/s"), (a2, "time to first token", "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
    a2.set_yscale("log")
    fig.suptitle("guidellm vs dsv4 serve (tiny model, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: dict, out_dir: Path) -> dict[str, Path]:
    return write_triplet(out, out_dir, "serving", markdown, plot)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def plan_from_args(args: Any) -> Plan:
    base = PLANS["smoke" if args.smoke else "full"]
    delays = base.delays_ms
    if args.delays:
        try:
            delays = tuple(float(x) for x in args.delays.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--delays must be comma-separated numbers (ms), got {args.delays!r}") from None
    mixes = base.mixes
    if args.streams:
        streams = _ints(args.streams, "--streams")
        mixes = tuple(Mix(m.name, m.prompt_tokens, m.output_tokens, streams) for m in mixes)
    if args.mixes:
        names = [x.strip() for x in args.mixes.split(",") if x.strip()]
        known = {m.name: m for m in PLANS["full"].mixes + EXTRA_MIXES} | {m.name: m for m in mixes}
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"--mixes: unknown {bad}; known: {sorted(known)}")
        mixes = tuple(known[n] for n in names)
    max_s = getattr(args, "max_seconds", None) or base.max_seconds
    plan = Plan(delays, mixes, args.requests if args.requests is not None else base.min_requests, max_s)
    validate_plan(plan)
    return plan


def add_arguments(p) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder with tokenizer.json "
                   "(default: the tiny model built by `make setup`)")
    p.add_argument("--delays", default=None, help="batching delays in ms, comma-separated (default 0,20; smoke 0)")
    p.add_argument("--mixes", default=None, help="prompt mixes: short (128->64), long (2048->64) (default both); "
                   "long4k (4096->16, 4 streams: the memory check)")
    p.add_argument("--serve-args", default="", help="extra `dsv4 serve` flags, one string (e.g. "
                   "'--cache-budget-gib 1')")
    p.add_argument("--heap", choices=("bounded", "unbounded", "both"), default="bounded",
                   help="the servers' retained-heap bound (runtime/malloc_tuning.py); both: each point with and "
                   "without it, and their ratios (default bounded)")
    p.add_argument("--streams", default=None,
                   help="concurrency sweep for every mix (default short 1,4,16,64; long 1,4,16; smoke 2)")
    p.add_argument("--requests", type=int, default=None, help="least requests per point (default 16; smoke 4)")
    p.add_argument("--max-seconds", type=float, default=None, help="longest a point may run (default 120; smoke 30)")
    p.add_argument("--smoke", action="store_true", help="one server (delay 0), short 32->8 mix, 2 streams: ~20 s")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--raw", default=None, help="folder for guidellm's scenarios, reports and logs and the server "
                   "logs (default: $TMPDIR/dsv4-bench-serving[-smoke]; replaced on each run)")


def run(args) -> int:
    try:
        plan = plan_from_args(args)
        out_dir = Path(args.out)
        stem = f"dsv4-bench-serving{'-smoke' if args.smoke else ''}"
        raw = Path(args.raw) if args.raw else Path(tempfile.gettempdir()) / stem
        heaps = ("bounded", "unbounded") if args.heap == "both" else (args.heap,)
        out = run_serving(plan, args.smoke, Path(args.model).expanduser(), raw,
                          serve_args=shlex.split(args.serve_args or ""), heaps=heaps)
    except (ValueError, RuntimeError) as e:  # bad flags; server, guidellm or its install failing (message says)
        raise SystemExit(f"dsv4 bench serving: {e}") from e
    paths = write_results(out, out_dir)
    print(markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
