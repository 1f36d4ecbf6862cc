"""`dsv4 serve --compile {auto,on,off}`: torch.compile the decode step's operator-bound hot spots.

What is compiled: the mHC mixing weights (`layers.mhc_weights`: sigmoids, softmax and the 20-round Sinkhorn
on 4x4 matrices — ~120 tiny aten operators per call, two calls per layer, the bulk of `hc_pre`'s 25 % of a
batch-1 decode step) with `dynamic=True`, so one graph serves every token count (inductor's C++ code on CPU,
Triton on GPU). It is a pure tensor function of the token batch: no paged-cache reads, no graph breaks, no
recompilation per batch size or context. The GEMVs around it (`hc_pre`'s mixing projection, `hc_post`'s
combine) stay eager: compiled with them, the engine's decode step got slower on CPU (32 -> 39 ms at batch 1, 1K)
although the functions alone ran 2.1x faster in isolation — inductor's own GEMV loops lose to MKL.

What is not (yet): the whole paged forward. Compiling each `Block.forward` as is recompiles on the
data-dependent chunk loops of the sparse-attention path (`kernels/prefix_gemm.py`) and hit the recompile limit:
measured 470 s of compilation and a slower step (94 ms vs 52 ms at batch 16); a whole-step graph needs static
per-bucket buffers for block tables and positions (CUDA graphs on GPU), which is the rest of issue 22.

Modes: `off` (default: compiling costs ~45 s per start on a busy 2-core host — the artefacts are cached under
the project's cache folder, `TORCHINDUCTOR_CACHE_DIR`, so later starts are faster), `on`, and `auto` (compile,
time compiled vs eager on the warm-up shapes, keep whichever is faster). A failure to compile falls back to eager
with one warning; the server still starts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from dsv4.runtime.model import layers
from dsv4.runtime.model.layers import MHC

from dsv4.paths import cache_root

log = logging.getLogger("dsv4.compile")

EAGER: dict[str, Callable[..., Any]] = {"weights": layers.mhc_weights}
WARM_UP_TOKENS = (1, 7, 64)  # decode batches and a prefill chunk: the shapes dynamic=True must cover
AUTO_MIN_GAIN = 1.05  # auto keeps compiled code when it is at least this much faster on the warm-up shapes


def cache_dir() -> Path:
    return cache_root() / "inductor"


def use_compiled() -> None:
    """Swap the compiled mHC functions in (compilation itself happens at their first call)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    for name, fn in EAGER.items():
        setattr(MHC, name, staticmethod(torch.compile(fn, dynamic=True)))


def use_eager() -> None:
    for name, fn in EAGER.items():
        setattr(MHC, name, staticmethod(fn))


def is_compiled() -> bool:
    return MHC.weights is not EAGER["weights"]


def _inputs(cfg: Any, tokens: int, device: str) -> dict[str, tuple]:
    hc = int(cfg.hc_mult)
    g = torch.Generator().manual_seed(tokens)
    mixes = torch.randn(tokens, (2 + hc) * hc, generator=g).to(device)
    base, scale = torch.zeros((2 + hc) * hc, device=device), torch.ones(3, device=device)
    return {"weights": (mixes, base, scale, hc, int(cfg.hc_sinkhorn_iters), float(cfg.hc_eps))}


def _time(fns: dict[str, Callable[..., Any]], args: list[dict[str, tuple]], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        for a in args:
            for name, fn in fns.items():
                fn(*a[name])
    return time.perf_counter() - t0


@torch.inference_mode()
def warm_up(cfg: Any, device: str, say: Callable[[str], None] = log.info) -> float:
    """Compile (first calls) on every warm-up shape; returns eager time / compiled time on those shapes."""
    args = [_inputs(cfg, t, device) for t in WARM_UP_TOKENS]
    compiled = {name: getattr(MHC, name) for name in EAGER}
    for i, a in enumerate(args, 1):
        t0 = time.perf_counter()
        for name, fn in compiled.items():
            fn(*a[name])
        say(f"compile warm-up {i}/{len(args)}: {WARM_UP_TOKENS[i - 1]} tokens, {time.perf_counter() - t0:.1f} s")
    reps = 20
    return _time(EAGER, args, reps) / max(1e-9, _time(compiled, args, reps))


def setup(mode: str, cfg: Any, device: str, say: Callable[[str], None] = log.info) -> str:
    """Apply `--compile mode` for this process; returns what was decided, for the start-up report."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {mode!r}")
    if mode == "off":
        use_eager()
        return "off"
    use_compiled()
    try:
        gain = warm_up(cfg, device, say)
    except Exception as e:  # inductor missing a compiler, an unsupported op: serve eagerly
        use_eager()
        log.warning("torch.compile failed (%s: %s); serving with eager mHC functions", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return f"off (compilation failed: {type(e).__name__})"
    if mode == "auto" and gain < AUTO_MIN_GAIN:
        use_eager()
        return f"off (auto: compiled mHC ran {gain:.2f}x eager's speed in the warm-up, below {AUTO_MIN_GAIN}x)"
    return f"on (mHC functions compiled; {gain:.2f}x eager's speed on the warm-up shapes)"
