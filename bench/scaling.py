"""`dsv4 bench scaling`: our runtime versus transformers' `DeepseekV4ForCausalLM` on one random checkpoint.

One checkpoint (`write_random_checkpoint`: transformers' `save_pretrained` names, `config.json` that
`DeepseekV4Config` reads) is loaded twice in one process:

- **ours**: `load_model` + `CacheManager` (policy `full`, fp32 KV) + `LLMEngine` — the real serving path
  (scheduler, chunked prefill, paged pools, sampler). Prefill: one request of L prompt tokens,
  `max_tokens=1`; cost = wall time to the first token / L. Decode at batch b: b requests with the same
  L-token prompt (prefix hit on the first request's blocks, so only the last partial block is computed),
  `ignore_eos`, sampled with distinct seeds; decode tokens/s = tokens generated in the steps where all b
  sequences decode / the time of those steps.
- **reference**: `DeepseekV4ForCausalLM.from_pretrained` with its own `DynamicCache` (sliding window +
  compressor buffers). Prefill in chunks of `--chunk` tokens through `model(input_ids, cache=...)`; a
  deadline (`--ref-limit-s`) stops a context that does not finish in time (recorded as
  "skipped: > N s"). Decode: the cache is repeated to batch b (`reorder_cache`) and b tokens are fed
  per step (greedy), the model's forward alone — no `generate()` overhead is charged to it.

Both see the same token ids (uniform random, seed 0). At the smallest context the first-token logits of
both are compared (max |diff|) so that the two are known to compute the same model.

Targets (ratios in the same run): decode tok/s at 8K >= 10x the reference; our decode at 64K >= 50 % of
ours at 1K; our prefill cost per token grows <= 1.5x from 8K to 64K.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsv4.bench.results_io import write_triplet

from dsv4.paths import cache_root

FULL_CONTEXTS = (1024, 8192, 32768, 65536)
FULL_BATCHES = (1, 16)
SMOKE_CONTEXTS = (256, 512)
SMOKE_BATCHES = (1, 2)


def scaling_config(hidden: int = 256, smoke: bool = False):
    """A random model bigger than tiny, with V4's real ratios: CSA 4, HCA 128, window 128.

    6 layers (2 sliding, 2 CSA, 2 HCA; 2 hash-MoE then learned routing), 8 heads x 128, 8 experts top-2,
    indexer 8 heads x 32, top-k 128. `smoke` shrinks the hidden size and experts to run in seconds.
    """
    from dsv4.runtime.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig

    if hidden < 64 or hidden % 64:
        raise ValueError(f"hidden must be a multiple of 64 and >= 64, got {hidden}")
    return ModelConfig(
        vocab_size=1024, hidden_size=hidden, num_hidden_layers=6, num_attention_heads=8 if not smoke else 4,
        head_dim=128, qk_rope_head_dim=32, q_lora_rank=hidden // 2, o_groups=2, o_lora_rank=hidden // 2,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=hidden,
        layer_types=[SLIDING, SLIDING, CSA, HCA, CSA, HCA],
        mlp_layer_types=[HASH_MOE, HASH_MOE, MOE, MOE, MOE, MOE],
        compress_rates={CSA: 4, HCA: 128}, sliding_window=128, index_n_heads=8, index_head_dim=32,
        index_topk=128, hc_mult=4, max_position_embeddings=131072, torch_dtype="float32",
        num_nextn_predict_layers=1,
    )


def checkpoint_dir(hidden: int, smoke: bool) -> Path:
    return cache_root() / "models" / f"scaling-h{hidden}{'-smoke' if smoke else ''}"


def ensure_checkpoint(path: Path, cfg) -> Path:
    """Write the random checkpoint once (config.json is written last: its presence marks completion)."""
    if not (path / "config.json").exists():
        from dsv4.runtime.checkpoint.random_init import write_random_checkpoint

        write_random_checkpoint(cfg, path, seed=0)
    return path


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()  # ids 0/1 are BOS/EOS


# ---------------------------------------------------------------------------------------------------
@dataclass
class Measure:
    """One (implementation, context) row. Times in seconds; None = not measured (see `note`)."""

    impl: str
    context: int
    prefill_s: float | None = None
    prefill_s_per_token: float | None = None  # prefill_s / context (average over the prompt)
    prefill_chunk_s_per_token: float | None = None  # marginal: the chunk that ends at `context`
    decode_tok_s: dict[int, float | None] = field(default_factory=dict)  # batch -> tokens/s
    decode_step_s: dict[int, float | None] = field(default_factory=dict)  # batch -> seconds per step
    note: str = ""


class Ours:
    """The serving path: LLMEngine over a CacheManager with the `full` policy (prefix hits keep the window)."""

    def __init__(self, model_dir: Path, max_context: int, max_batch: int, chunk: int, decode_steps: int,
                 device: str = "cpu"):
        from dsv4.runtime.cache.manager import CacheManager
        from dsv4.runtime.cache.sizing import seq_blocks
        from dsv4.runtime.cache.spec import CacheSpec
        from dsv4.runtime.engine.engine import EngineConfig, LLMEngine
        from dsv4.runtime.engine.scheduler import SchedulerConfig
        from dsv4.runtime.model import KVPools, load_model

        self.model, self.cfg, tok = load_model(str(model_dir), device=device, progress=False)
        self.model.eval()
        spec = CacheSpec.from_model(self.cfg, kv_dtype="fp32")
        self.extra = decode_steps + 8 * max_batch + 8  # tokens generated per decode request (aborted early)
        total = max_context + self.extra + spec.block_size
        # pools sized explicitly: two full contexts (the prefilled prompt + slack for hits) and, per decoding
        # sequence, its own tail (last partial block, window, compressor state) plus a prefill chunk of headroom
        full = seq_blocks(spec, total, "full")
        tail = seq_blocks(spec, 2 * spec.block_size + self.extra, "full")
        nb = {p: int(2 * full[p] + (max_batch + 1) * tail[p] + 2 * chunk // spec.block_size + 8) for p in full}
        cache = CacheManager(spec, nb, policy="full")
        self.cache = cache
        self.budget = sum(nb[p] * spec.block_bytes(p) for p in nb)
        pools = KVPools.for_model(self.cfg, spec, cache.num_blocks, device=device)
        sched = SchedulerConfig(max_num_batched_tokens=chunk, max_num_seqs=max_batch + 1)
        self.engine = LLMEngine(self.model, self.cfg, tok, cache, pools, EngineConfig(sched, total + 16, 4096),
                                device)
        self.decode_steps = decode_steps
        self._n = 0

    def _request(self, prompt: list[int], max_tokens: int, seed: int, greedy: bool = False):
        from dsv4.runtime.engine.request import Request, SamplingParams

        self._n += 1
        p = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, seed=seed, ignore_eos=True)
        return Request(f"r{self._n}", list(prompt), p)

    def _drain(self) -> None:
        while self.engine.has_work:
            self.engine.step()

    def prefill_trace(self, prompt: list[int]) -> list[tuple[int, float]]:
        """Prefill one request of len(prompt) tokens (chunked by the token budget); returns (tokens computed,
        seconds since admission) after every step. The time to reach L tokens is the prefill time of an
        L-token prompt: chunked prefill computes the same chunks whether or not more prompt follows."""
        self.cache.clear_cached()
        req = self._request(prompt, 1, 0, greedy=True)
        seq = req.sequences[0]
        trace = []
        t0 = time.perf_counter()
        self.engine.add(req)
        while self.engine.has_work:
            self.engine.step()
            trace.append((seq.num_computed if seq.num_computed else len(prompt), time.perf_counter() - t0))
        return trace

    def first_logits(self, prompt: list[int]) -> Any:
        """Logits of the last prompt token (a greedy max_tokens=1 request; earlier blocks are prefix hits)."""
        captured: dict[str, Any] = {}
        runner = self.engine.runner
        orig = runner.execute

        def spy(scheduled):
            out = orig(scheduled)
            r0, r1 = out.rows[0]
            if scheduled[0].sample and r1 > r0:
                captured["logits"] = out.logits[r1 - 1].clone()
            return out

        runner.execute = spy
        try:
            self.engine.add(self._request(prompt, 1, 0, greedy=True))
            self._drain()
        finally:
            runner.execute = orig
        return captured.get("logits")

    def decode(self, prompt: list[int], batch: int) -> tuple[float, float]:
        """(tokens/s, seconds/step) over the steps in which all `batch` sequences decode. The prompt's blocks
        are cached by the preceding prefill (prefix hit), so each request computes its last block only."""
        eng = self.engine
        reqs = [self._request(prompt, self.extra, 1000 + i) for i in range(batch)]
        for r in reqs:
            eng.add(r)
        # warm-up: admit everything and finish the partial last blocks (prefill of <= block_size tokens each)
        while any(s.in_prefill for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        running = len(eng.scheduler.running)
        if running != batch:
            raise RuntimeError(f"decode at batch {batch}: only {running} sequences running (cache too small?)")
        eng.step()  # one decode step untimed (first use of the batch shapes)
        steps = 0
        t0 = time.perf_counter()
        while steps < self.decode_steps and len(eng.scheduler.running) == batch:
            eng.step()
            steps += 1
        dt = time.perf_counter() - t0
        for r in reqs:
            eng.abort(r.request_id)
        self._drain()
        return steps * batch / dt, dt / max(1, steps)


class Reference:
    """transformers' DeepseekV4ForCausalLM with its own DynamicCache; forward calls only."""

    def __init__(self, model_dir: Path, chunk: int, decode_steps: int):
        import torch
        from transformers import DeepseekV4ForCausalLM

        torch.manual_seed(0)
        self.model = DeepseekV4ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.chunk = chunk
        self.decode_steps = decode_steps

    def run(self, prompt: list[int], contexts: tuple[int, ...], batches: tuple[int, ...], limit_s: float,
            rows: dict[int, Measure]) -> dict[int, Any]:
        """Prefill `prompt` chunk by chunk; at each context L of `contexts` record the prefill time so far and
        measure decode at every batch on a copy of the cache. Stops when the prefill time passes `limit_s`.
        Returns the last-token logits at each context reached."""
        import copy

        import torch
        from transformers import DynamicCache

        with torch.inference_mode():  # warm-up (first calls), not measured
            self.model(input_ids=torch.tensor([prompt[:self.chunk]]), cache=DynamicCache(config=self.model.config),
                       use_cache=True, logits_to_keep=1)
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt])
        logits_at: dict[int, Any] = {}
        spent = 0.0
        done = 0
        marks = [c for c in contexts if c <= len(prompt)]
        with torch.inference_mode():
            while done < len(prompt) and marks:
                n = min(self.chunk, marks[0] - done)
                t0 = time.perf_counter()
                out = self.model(input_ids=ids[:, done:done + n], position_ids=torch.arange(done, done + n)[None],
                                 cache=cache, use_cache=True, logits_to_keep=1)
                spent += time.perf_counter() - t0
                done += n
                if done == marks[0]:
                    L = marks.pop(0)
                    m = rows[L]
                    m.prefill_s, m.prefill_s_per_token = spent, spent / L
                    m.prefill_chunk_s_per_token = (time.perf_counter() - t0) / n
                    logits_at[L] = out.logits[0, -1].clone()
                    for b in batches:
                        m.decode_tok_s[b], m.decode_step_s[b] = self.decode(copy.deepcopy(cache), L, b, limit_s)
                if spent > limit_s and marks:
                    for L in marks:
                        rows[L].note = f"skipped: prefill > {limit_s:g} s (stopped at {done:,} tokens)"
                    break
        return logits_at

    def decode(self, cache: Any, context: int, batch: int, limit_s: float) -> tuple[float, float]:
        """Greedy decode at batch b from the prefilled cache repeated b times; forward calls only."""
        import torch

        if batch > 1:
            cache.reorder_cache(torch.zeros(batch, dtype=torch.long))
        tok = torch.full((batch, 1), 2, dtype=torch.long)
        out = self.model(input_ids=tok, position_ids=torch.full((batch, 1), context), cache=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)  # first step untimed, like ours
        steps = 0
        t0 = time.perf_counter()
        while steps < self.decode_steps:
            pos = torch.full((batch, 1), context + 1 + steps, dtype=torch.long)
            out = self.model(input_ids=tok, position_ids=pos, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            steps += 1
            if time.perf_counter() - t0 > limit_s:
                break
        dt = time.perf_counter() - t0
        return steps * batch / dt, dt / steps


# ---------------------------------------------------------------------------------------------------
def _median_round(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    """(tokens/s, s/step) of the round with the median step time."""
    return sorted(rounds, key=lambda r: r[1])[len(rounds) // 2]


def run_scaling(contexts: tuple[int, ...], batches: tuple[int, ...], hidden: int = 256, smoke: bool = False,
                chunk: int = 512, decode_steps: int = 16, ref_limit_s: float = 120.0,
                skip_reference: bool = False, threads: int = 1, compile_mode: str = "off",
                device: str = "cpu") -> dict:
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if device != "cpu" and not skip_reference:
        raise ValueError("--device cuda measures ours only: add --no-reference")
    torch.set_num_threads(threads)
    from dsv4.runtime.malloc_tuning import keep_freed_memory

    malloc_keeps_freed = keep_freed_memory()  # as `dsv4 serve` on CPU does; ours and the reference alike
    for c in contexts:
        if c < 2:
            raise ValueError(f"--contexts entries must be >= 2, got {c}")
        if c % chunk:
            raise ValueError(f"--contexts entries must be multiples of --chunk {chunk}, got {c}")
    for b in batches:
        if not 1 <= b <= 256:
            raise ValueError(f"--batches entries must be in [1, 256], got {b}")
    contexts = tuple(sorted(set(contexts)))
    batches = tuple(sorted(set(batches)))
    cfg = scaling_config(hidden, smoke)
    t_start = time.time()
    path = ensure_checkpoint(checkpoint_dir(hidden, smoke), cfg)
    prompt = prompt_ids(max(contexts), cfg.vocab_size)
    parity: dict[str, Any] = {}

    # ours: one prefill of the longest context, timed per step, then decode at every context on prefix hits
    ours = Ours(path, max(contexts), max(batches), chunk, decode_steps, device)
    n_params = sum(p.numel() for p in ours.model.parameters())
    ours.prefill_trace(prompt_ids(chunk + 1, cfg.vocab_size, seed=1))  # warm-up (first calls), not measured
    trace = ours.prefill_trace(prompt)
    mine = {c: Measure("ours", c) for c in contexts}
    for c in contexts:
        i = next(k for k, (n, _) in enumerate(trace) if n >= c)
        m = mine[c]
        m.prefill_s = trace[i][1]
        m.prefill_s_per_token = m.prefill_s / c
        prev_n, prev_t = trace[i - 1] if i else (0, 0.0)
        m.prefill_chunk_s_per_token = (trace[i][1] - prev_t) / max(1, trace[i][0] - prev_n)
    our_logits = ours.first_logits(prompt[:contexts[0]])
    compiled_rows: dict[int, Measure] = {}
    compile_state = "off"
    if compile_mode == "both":  # the same engine and cache: eager and compiled decode in alternating rounds
        from dsv4.runtime.model import compiled

        compile_state = compiled.setup("on", ours.model, ours.engine.runner.pools, device, say=lambda *_: None,
                                       max_batch=max(batches))
        for c in contexts:
            compiled_rows[c] = Measure(COMPILED, c, note=f"decode only; median of {AB_ROUNDS} rounds alternating "
                                                         f"with eager; {compile_state}")
            mine[c].note = f"decode: median of {AB_ROUNDS} rounds alternating with --compile on"
            for b in batches:
                eager, comp = [], []
                for _ in range(AB_ROUNDS):  # interleaved: a slow spell of the machine hits both alike
                    compiled.use_eager()
                    eager.append(ours.decode(prompt[:c], b))
                    compiled.reactivate()
                    comp.append(ours.decode(prompt[:c], b))
                mine[c].decode_tok_s[b], mine[c].decode_step_s[b] = _median_round(eager)
                compiled_rows[c].decode_tok_s[b], compiled_rows[c].decode_step_s[b] = _median_round(comp)
        compiled.use_eager()
    else:
        for c in contexts:
            for b in batches:
                mine[c].decode_tok_s[b], mine[c].decode_step_s[b] = ours.decode(prompt[:c], b)
    budget = ours.budget
    del ours

    theirs = {c: Measure("reference", c) for c in contexts}
    if skip_reference:
        for m in theirs.values():
            m.note = "skipped: --no-reference"
    else:
        ref = Reference(path, chunk, decode_steps)
        ref_logits = ref.run(prompt, contexts, batches, ref_limit_s, theirs).get(contexts[0])
        if ref_logits is not None and our_logits is not None:
            parity = {"context": contexts[0],
                      "max_abs_logit_diff": float((our_logits.float() - ref_logits.float()).abs().max()),
                      "same_argmax": bool(our_logits.argmax() == ref_logits.argmax())}
        del ref
    rows = [m for c in contexts for m in (mine[c], *([compiled_rows[c]] if compiled_rows else []), theirs[c])]
    out = {
        "bench": "scaling", "smoke": smoke, "hidden": hidden, "parameters": n_params,
        "config": {k: v for k, v in cfg.to_dict().items() if k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "layer_types", "compress_rates",
            "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
            "num_experts_per_tok", "moe_intermediate_size", "vocab_size")},
        "contexts": list(contexts), "batches": list(batches), "chunk": chunk, "decode_steps": decode_steps,
        "ref_limit_s": ref_limit_s, "cache_budget_bytes": budget, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
        "load_average": list(os.getloadavg()), "malloc_keeps_freed_memory": malloc_keeps_freed,
        "parity": parity, "rows": [asdict(r) for r in rows], "compile": compile_state, "device": device,
    }
    out["targets"] = targets(out)
    out["seconds"] = round(time.time() - t_start, 1)
    return out


def _row(out: dict, impl: str, ctx: int) -> dict | None:
    return next((r for r in out["rows"] if r["impl"] == impl and r["context"] == ctx), None)


def _get(d: dict | None, key: str, b: int | None = None) -> float | None:
    if d is None:
        return None
    v = d.get(key)
    if b is not None and isinstance(v, dict):
        v = v.get(b, v.get(str(b)))
    return v


COMPILED = "ours --compile on"
AB_ROUNDS = 5  # --compile both: eager / compiled decode rounds per (context, batch), alternating


def targets(out: dict) -> dict:
    """The three scaling targets, each with the measured ratio (None when a side was not measured)."""
    cs = out["contexts"]
    hi, lo = max(cs), min(cs)
    mid = 8192 if 8192 in cs else (sorted(cs)[len(cs) // 2] if len(cs) > 2 else lo)
    res: dict[str, Any] = {}
    for b in out["batches"]:
        ours = _get(_row(out, "ours", mid), "decode_tok_s", b)
        ref = _get(_row(out, "reference", mid), "decode_tok_s", b)
        ratio = ours / ref if ours and ref else None
        res[f"decode at {mid} vs reference, batch {b} (>= 10x)"] = {
            "ratio": ratio, "met": None if ratio is None else ratio >= 10.0}
        a, z = _get(_row(out, "ours", lo), "decode_tok_s", b), _get(_row(out, "ours", hi), "decode_tok_s", b)
        ratio = z / a if a and z else None
        res[f"our decode at {hi} / at {lo}, batch {b} (>= 0.5)"] = {
            "ratio": ratio, "met": None if ratio is None else ratio >= 0.5}
    a, z = _get(_row(out, "ours", mid), "prefill_s_per_token"), _get(_row(out, "ours", hi), "prefill_s_per_token")
    ratio = z / a if a and z and hi != mid else None
    res[f"our prefill s/token at {hi} / at {mid} (<= 1.5)"] = {
        "ratio": ratio, "met": None if ratio is None else ratio <= 1.5}
    if _row(out, COMPILED, lo) is not None:  # issue 22: the compiled decode step
        for b in out["batches"]:
            goal = 3.0 if b == 1 else 10.0
            ours = _get(_row(out, COMPILED, mid), "decode_tok_s", b)
            ref = _get(_row(out, "reference", mid), "decode_tok_s", b)
            ratio = ours / ref if ours and ref else None
            res[f"compiled decode at {mid} vs reference, batch {b} (>= {goal:g}x)"] = {
                "ratio": ratio, "met": None if ratio is None else ratio >= goal}
        comp, eager = _get(_row(out, COMPILED, lo), "decode_step_s", 1), _get(_row(out, "ours", lo), "decode_step_s", 1)
        ratio = comp / eager if comp and eager else None
        res[f"compiled decode step at {lo} / eager step, batch 1 (<= 0.5)"] = {
            "ratio": ratio, "met": None if ratio is None else ratio <= 0.5}
    return res


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(out: dict) -> str:
    c = out["config"]
    lines = [
        f"### scaling — ours vs transformers `DeepseekV4ForCausalLM`{' (smoke)' if out['smoke'] else ''}", "",
        f"Random checkpoint: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers {c['layer_types']}, "
        f"{c['num_attention_heads']} heads x {c['head_dim']}, ratios {list(c['compress_rates'].values())}, "
        f"window {c['sliding_window']}, indexer {c['index_n_heads']}x{c['index_head_dim']} top-{c['index_topk']}, "
        f"{c['n_routed_experts']} experts top-{c['num_experts_per_tok']}; {out['parameters'] / 1e6:.1f} M params, "
        f"fp32, {out['threads']} threads ({out['machine']}), device {out.get('device', 'cpu')}, torch "
        f"{out['torch']}. Prefill chunk {out['chunk']}, "
        f"{out['decode_steps']} decode steps, reference limit {out['ref_limit_s']:g} s.", "",
    ]
    head = "| impl | context | prefill s | prefill ms/token (avg) | ms/token (last chunk) | " + " | ".join(
        f"decode tok/s b={b} | ms/step b={b}" for b in out["batches"]) + " | note |"
    lines += [head, "|" + "---|" * (6 + 2 * len(out["batches"]))]
    for r in out["rows"]:
        cells = [r["impl"], f"{r['context']:,}", _fmt(r["prefill_s"], ".2f"),
                 _fmt(None if r["prefill_s_per_token"] is None else 1e3 * r["prefill_s_per_token"], ".3f"),
                 _fmt(None if r["prefill_chunk_s_per_token"] is None else 1e3 * r["prefill_chunk_s_per_token"],
                      ".3f")]
        for b in out["batches"]:
            t = _get(r, "decode_tok_s", b)
            s = _get(r, "decode_step_s", b)
            cells += [_fmt(t, ".1f"), _fmt(None if s is None else 1e3 * s, ".1f")]
        cells.append(r["note"])
        lines.append("| " + " | ".join(cells) + " |")
    p = out.get("parity") or {}
    if p:
        lines += ["", f"Same model check at {p['context']:,} tokens: first-token logits max |diff| "
                      f"{p['max_abs_logit_diff']:.2e}, same argmax: {p['same_argmax']}."]
    lines += ["", "Targets:"]
    for k, v in out["targets"].items():
        state = "not measured" if v["met"] is None else ("met" if v["met"] else "MISSED")
        lines.append(f"- {k}: {_fmt(v['ratio'], '.2f')} — {state}")
    lines.append(f"\nWall time {out['seconds']:g} s.")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the GPU image of bench/gpu_check.sh has no matplotlib: json + md only
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(out["batches"]), figsize=(5 * (1 + len(out["batches"])), 4))
    style = {"ours": ("#2a7", "o-"), "reference": ("#c44", "s--")}
    for impl, (color, fmt) in style.items():
        rows = [r for r in out["rows"] if r["impl"] == impl and r["prefill_s_per_token"] is not None]
        if rows:
            axes[0].plot([r["context"] for r in rows], [1e3 * r["prefill_s_per_token"] for r in rows], fmt,
                         color=color, label=impl)
        for ax, b in zip(axes[1:], out["batches"], strict=True):
            pts = [(r["context"], 1e3 * _get(r, "decode_step_s", b)) for r in out["rows"]
                   if r["impl"] == impl and _get(r, "decode_step_s", b)]
            if pts:
                ax.plot(*zip(*pts, strict=True), fmt, color=color, label=impl)
    axes[0].set_title("prefill cost")
    axes[0].set_ylabel("ms per prompt token")
    for ax, b in zip(axes[1:], out["batches"], strict=True):
        ax.set_title(f"decode step, batch {b}")
        ax.set_ylabel("ms per step")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: dict, out_dir: Path, name: str = "scaling") -> dict[str, Path]:
    if out.get("device", "cpu") != "cpu":
        name += "_" + out["device"].split(":")[0]
    paths = write_triplet(out, out_dir, name, markdown, plot)
    return {k: p for k, p in paths.items() if p.exists()}


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(_tok(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise SystemExit(f"expected a comma-separated list of integers (K suffix allowed), got {text!r}") from e
    if not vals:
        raise SystemExit(f"expected at least one value, got {text!r}")
    return vals


def _tok(x: str) -> int:
    x = x.strip().lower()
    return int(x[:-1]) * 1024 if x.endswith("k") else int(x)


def add_arguments(p) -> None:
    p.add_argument("--contexts", default=None, help="comma-separated contexts, K suffix allowed "
                   "(default 1K,8K,32K,64K; smoke 256,512)")
    p.add_argument("--batches", default=None, help="comma-separated decode batch sizes (default 1,16; smoke 1,2)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random model (multiple of 64)")
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill chunk (ours: token budget per step); default 512, smoke 128")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decode steps measured per (context, batch); default 16, smoke 4")
    p.add_argument("--ref-limit-s", type=float, default=120.0,
                   help="the reference's prefill / decode of one context stops after this many seconds")
    p.add_argument("--no-reference", action="store_true", help="measure our runtime only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared CPU, OpenMP spin-waits make 2 threads ~25x slower)")
    p.add_argument("--compile", choices=("off", "both"), default="off",
                   help="both: decode with and without the torch.compile'd decode step (`dsv4 serve --compile "
                        "on`), same engine and cache, in alternating rounds (medians): one run, ratios")
    p.add_argument("--device", default="cpu", help="cpu, or cuda with --no-reference (bench/gpu_check.sh: the "
                                                   "compiled decode step with CUDA graphs)")
    p.add_argument("--smoke", action="store_true",
                   help="hidden 64, contexts 256/512, batches 1/2, 4 decode steps: seconds")
    p.add_argument("--out", default="bench/results")


def run(args) -> int:
    chunk = args.chunk if args.chunk is not None else (128 if args.smoke else 512)
    if chunk < 1:
        raise SystemExit(f"--chunk must be >= 1, got {chunk}")
    steps = args.decode_steps if args.decode_steps is not None else (4 if args.smoke else 16)
    if steps < 1:
        raise SystemExit(f"--decode-steps must be >= 1, got {steps}")
    if args.ref_limit_s <= 0:
        raise SystemExit(f"--ref-limit-s must be > 0, got {args.ref_limit_s}")
    contexts = _ints(args.contexts) if args.contexts else (SMOKE_CONTEXTS if args.smoke else FULL_CONTEXTS)
    batches = _ints(args.batches) if args.batches else (SMOKE_BATCHES if args.smoke else FULL_BATCHES)
    hidden = 64 if args.smoke and args.hidden == 256 else args.hidden
    try:
        out = run_scaling(contexts, batches, hidden, args.smoke, chunk, steps, args.ref_limit_s,
                          args.no_reference, args.threads, args.compile, args.device)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    paths = write_results(out, Path(args.out))
    print(markdown(out))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

