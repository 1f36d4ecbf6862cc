"""`dsv4 serve --compile {auto,on,off}`: a torch.compile'd decode step.

What is compiled: for decode steps (every sequence one token, `model.is_decode`), the whole `Block.forward` —
the mHC mixing (RMS, projection, sigmoids, softmax, the 20-round Sinkhorn on 4x4 matrices), the RMSNorms, the
query / key projections with RoPE, the output projection, the router and the shared expert. On CPU every block
of the step is one compiled frame (`model.run_blocks` as `DecodeStep.stack`, inductor's C++/OpenMP code): dynamo's
guard check and inductor's call wrapper run once per step, not once per layer. On GPU `Block.forward` is one
compiled function per layer kind (`DecodeStep.block`: Triton + CUDA graphs, `mode="reduce-overhead"`), as it is
for CPU decode batches padded to static buckets. What depends on the data cannot be traced:

- On CPU (dynamic shapes), with plain pools: the cache step is traced with static shapes (`_select_in_graph`): the kv
  and compressor-state writes go into the layer's pool tensors (`LayerPools`, graph inputs mutated in place), every
  token computes the entry its compressors would emit (`context.decode_emissions`) and writes it to its row, or to the
  pool's trash row when it completes no group (as do padding tokens without a slot; the HCA entries of a batch > 1
  come from the opaque op `dsv4::completed_group_entries`, no `torch.cond`, which inductor's cache refuses); a CSA
  layer's indexer scores every visible entry and takes the deterministic top-k in the graph (candidates padded to k +
  1 columns). The routed experts of larger batches run through one opaque op, `dsv4::padded_expert_rows` (three
  batched matmuls over rows padded per expert, `layers.padded_rows`; the ranks and the weighted sum around it are
  traced); the gathers through the block tables and the attention over them (`Attention.combine`, the torch reference,
  `_combine_in_graph`) are traced. A decode step is then one graph for every layer, without a graph break. The step's
  index and block tables are padded to >= 2 columns once per step (`DecodeStep.prepare`): the dynamic graph treats 0
  and 1 as special sizes.
- Otherwise (CUDA graphs with static shapes, FP8 rows, the online HCA state, FP4 experts) they are eager islands
  (`torch.compiler.disable`, `ISLANDS`): `Attention.select` (on CPU `_island_select`, rows padded to >= 2),
  `Experts.forward_grouped`, FP8 linears, and the TP / EP modules that call collectives; on CUDA `combine` too
  (the Triton kernels). Each island is one graph break (`graph_breaks()` counts them): a block is two graphs
  (before and after the cache step), three for larger batches. On CPU an island inside `run_blocks`' loop makes
  dynamo skip that frame (it cannot resume mid-loop) and compile each `Block.forward` it calls instead. A small
  batch's experts are gathered and multiplied in the graph (`Experts.gathers`).

On CPU the batch-1 graph's matrix-vector products (every linear, the gathered experts' bmm) are inductor
reductions instead of BLAS calls (`gemv_pass.OneRowProducts`, an inductor post-grad pass): no fixed dispatch cost
per product, and their neighbours fuse into them.

Prefill and mixed steps run eager, except the mHC mixing weights, compiled with `dynamic=True` for every token
count.

Shapes: on CPU the token dimension is dynamic (a graph for batch 1, one for the batches whose experts are gathered,
one for larger batches; no padding). On
CUDA each decode batch is padded with empty sequences (`model.pad_decode_batch`: block tables -1, so they touch no
cache row) to the next of `DECODE_BUCKETS`, as vLLM pads to its CUDA-graph capture sizes: one static graph per
bucket. `setup` compiles before the server reports ready, one progress line per warm-up batch, on empty decode
batches that read and write no cache row.

Guards: dynamo checks, before each compiled frame, that its inputs still match what the graph was traced for —
~20-40 us a frame on CPU (one frame per step there; one or two per layer with islands). Once the warm-up has
compiled every variant a decode step can need (layer kinds x batch-size classes; no decode step recompiles after
it — `tests/test_compiled_decode.py` checks), the decode steps run with
`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`: only the guards that told the warmed graphs apart (layer
kind, batch 1 / gathered / grouped, bucket) are checked; a shape no guard distinguished would run the wrong graph,
which is why it comes after the warm-up only, as vLLM drops dynamo's guards after its own warm-up.
`DSV4_COMPILE_GUARDS=full` keeps every guard (slower; for debugging).

Modes: `off` (default: compiling costs tens of seconds per start on a busy 2-core host — the artefacts are cached
under the project's cache folder, `TORCHINDUCTOR_CACHE_DIR`, so later starts are faster), `on`, and `auto`
(compile, then time compiled vs eager decode on the warm-up batches, keep whichever is faster). A failure to
compile falls back to eager with one warning; the server still starts. In a TP / DP group (`--tp`/`--dp` > 1)
only the mHC mixing weights are compiled: the decode-step graph is for single-process replicas.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from dsv4.kernels.reference import compressor_pool_ref, indexer_scores_ref, topk_from_scores
from dsv4.runtime.config import CSA, HCA
from dsv4.runtime.model import layers
from dsv4.runtime.model.batch import ForwardBatch
from dsv4.runtime.model.context import decode_emissions
from dsv4.runtime.model.kv_pools import LayerPools
from dsv4.runtime.model.layers import MHC
from dsv4.runtime.model.model import Block, DecodeStep, compiled_decode, pad_decode_batch, run_blocks

from dsv4.paths import cache_root

log = logging.getLogger("dsv4.compile")

EAGER: dict[str, Callable[..., Any]] = {"weights": layers.mhc_weights}
# (module, class, method) kept eager inside the compiled decode step: data-dependent shapes, or collectives
ISLANDS: tuple[tuple[str, str, str], ...] = (
    ("dsv4.runtime.model.attention", "Attention", "select"),
    ("dsv4.runtime.model.layers", "Experts", "forward_grouped"),  # small batches: `forward_gathered`, in the graph
    ("dsv4.runtime.model.quantized", "FP8Linear", "forward"),
    ("dsv4.runtime.parallel.shard", "RowParallelLinear", "forward"),
    ("dsv4.runtime.parallel.shard", "ParallelMoE", "forward"),
    ("dsv4.runtime.parallel.ep", "ExpertParallelMoE", "forward"),
)
SELECT, GROUPED = ISLANDS[0], ISLANDS[1]  # attention's cache step, the routed experts of larger batches
COMBINE = ("dsv4.runtime.model.attention", "Attention", "combine")  # in the CPU graph, an island with CUDA graphs
DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # CUDA-graph batch sizes
GUARDS_ENV = "DSV4_COMPILE_GUARDS"  # "full": check every dynamo guard on each decode step (default: trimmed)
TRACED_POOL_ROWS = 8  # batches pool every token's would-be entry in the graph up to this many state rows (CSA)
AUTO_MIN_GAIN = 1.05  # auto keeps compiled code when it is at least this much faster on the warm-up batches
_originals: dict[tuple[str, str, str], Callable[..., Any]] = {}
_compiled: dict[str, Any] = {}  # what `use_compiled` built, swapped back in by `_activate` (no recompilation)


def cache_dir() -> Path:
    return cache_root() / "inductor"


def inductor_cache_dir(current: str | None, torch_default: str) -> str:
    """Where inductor keeps its artefacts: a `TORCHINDUCTOR_CACHE_DIR` the user set, else the project's cache
    folder. torch writes its own default (under /tmp) into the variable the first time it looks, often at
    import, so that value counts as unset."""
    if current and os.path.abspath(current) != os.path.abspath(torch_default):
        return current
    return str(cache_dir())


def _island_owner(module: str, cls: str) -> Any:
    return getattr(importlib.import_module(module), cls)


def use_compiled(device: str = "cpu", decode_step: bool = True, buckets: tuple[int, ...] | None = None) -> None:
    """Swap the compiled functions in (compilation itself happens at their first call). `decode_step=False`:
    the mHC mixing weights only. `buckets`: pad decode batches to these sizes (default: CUDA only)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                                                               default_cache_dir())
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    fx_config.use_duck_shape = False  # a batch size equal to some model dimension must not specialise the graph
    # the model's float attributes (RMSNorm eps, router scale, SwiGLU limit) are constants of the checkpoint:
    # specialised, they are literals in the graph instead of 0-d tensor inputs converted and `.item()`-ed on
    # every call (~30 per block)
    torch._dynamo.config.specialize_float = True
    if not str(device).startswith("cuda"):  # batch-1 GEMVs as inductor reductions, not BLAS calls
        import torch._inductor.config as inductor_config
        from dsv4.runtime.model.gemv_pass import OneRowProducts

        inductor_config.post_grad_custom_pre_pass = OneRowProducts()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(DECODE_BUCKETS))
    _compiled.clear()
    _compiled["weights"] = torch.compile(EAGER["weights"], dynamic=True)
    if decode_step:
        cuda = str(device).startswith("cuda")
        for key in (*ISLANDS, COMBINE):
            _originals.setdefault(key, inspect.getattr_static(_island_owner(*key[:2]), key[2]))
        for key in ISLANDS:
            _compiled[key] = torch.compiler.disable(_originals[key])
        if cuda or buckets is not None:  # static shapes: the attention's row counts (top-k, visible) would recompile
            _compiled[COMBINE] = staticmethod(torch.compiler.disable(_originals[COMBINE].__func__))
        else:  # dynamic shapes: the cache step and attention traced into the block's graph
            _compiled[SELECT] = _select_in_graph
            _compiled[GROUPED] = _grouped_in_graph
            _compiled[COMBINE] = staticmethod(_combine_in_graph)
            _compiled["prepare"] = _ctx_for_the_graph
            _compiled["layer_pools"] = True
        if cuda:
            _compiled["block"] = torch.compile(Block.forward, mode="reduce-overhead", dynamic=False)
        elif buckets is None:  # every block in one frame: one guard check and one call wrapper per step
            _compiled["stack"] = torch.compile(run_blocks, dynamic=True)
        else:
            _compiled["block"] = torch.compile(Block.forward, dynamic=False)
        _compiled["buckets"] = buckets if buckets is not None else (DECODE_BUCKETS if cuda else None)
    _activate()


def _trash_rows(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """`rows` with every -1 sent to `pool`'s trash row (its last, `LayerPools`)."""
    return torch.where(rows >= 0, rows, torch.full_like(rows, pool.shape[0] - 1))


def _write_in_graph(attn: Any, p: dict[str, Any], ctx: Any, lp: LayerPools, inv_freq: torch.Tensor) -> None:
    """`Attention.write` with static shapes, traced into the CPU decode graph: the kv row into the window pool,
    the compressors' [kv | score] into their state row (one write for a CSA layer's two compressors: adjacent
    columns), then every token's would-be entry (`decode_emissions`: E = T) pooled, normalised and rotated as
    `compressor_step` does, and written to its row — or, for a token that completes no group, the trash row."""
    lp.swa.index_put_((_trash_rows(ctx.swa_slot, lp.swa),), p["kv"].to(lp.swa.dtype))
    if not attn.compressed:
        return
    kind = CSA if attn.sparse else HCA
    comps = [(attn.compressor, p["comp"], lp.comp)]
    if attn.sparse:
        comps.append((attn.indexer.compressor, p["index_comp"], lp.idx))
    row = torch.cat([t for _, projected, _ in comps for t in projected], dim=-1)
    lp.state.index_put_((_trash_rows(ctx.state_slot[kind], lp.state),), row.to(lp.state.dtype))
    em = decode_emissions(ctx, kind)
    col = 0
    for comp, (kv, _), out in comps:
        entries = _entries_of_completed_groups(comp, lp.state, em, inv_freq, col, kv.dtype)
        out.index_put_((_trash_rows(em.dest, out),), entries.to(out.dtype))
        col += 2 * kv.shape[1]


def _entries_of_completed_groups(comp: Any, state: torch.Tensor, em: Any, inv_freq: torch.Tensor, col: int,
                                 dtype: torch.dtype) -> torch.Tensor:
    """Every token's would-be entry [T, d] from the state rows `em.state_rows` (`compressor_pool_ref`, as the
    eager `compressor_step`), traced: a CSA entry pools 8 rows, a batch of one pools its one token. An HCA entry
    pools 128 rows and a batch rarely completes one, so larger batches pool through
    `dsv4::completed_group_entries`, which pools only the tokens that complete a group (an opaque op, not
    `torch.cond`: a graph holding a cond is never stored in inductor's cache, so it compiled again at every
    start)."""
    args = (comp.norm.weight, inv_freq, comp.ratio, comp.coff, comp.norm.eps, col, dtype)
    if em.dest.shape[0] == 1 or comp.coff * comp.ratio <= TRACED_POOL_ROWS:
        return _pool_entries(state, em.state_rows, em.entry, *args)
    return torch.ops.dsv4.completed_group_entries(state, em.state_rows, em.entry, em.dest, *args)


def _pool_entries(state: torch.Tensor, state_rows: torch.Tensor, entry: torch.Tensor, norm_weight: torch.Tensor,
                  inv_freq: torch.Tensor, ratio: int, coff: int, eps: float, col: int,
                  dtype: torch.dtype) -> torch.Tensor:
    return compressor_pool_ref(state, state_rows, entry, norm_weight, inv_freq, ratio=ratio, coff=coff, eps=eps,
                               col_offset=col, compute_dtype=dtype)


@torch.library.custom_op("dsv4::completed_group_entries", mutates_args=())
def completed_group_entries(state: torch.Tensor, state_rows: torch.Tensor, entry: torch.Tensor, dest: torch.Tensor,
                            norm_weight: torch.Tensor, inv_freq: torch.Tensor, ratio: int, coff: int, eps: float,
                            col: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, d]: the pooled entry of each token with a destination row (`dest >= 0`), zeros for the others (their
    entries go to the trash row)."""
    out = torch.zeros(dest.shape[0], norm_weight.shape[0], dtype=dtype, device=state.device)
    done = (dest >= 0).nonzero().squeeze(1)
    if done.numel():
        out[done] = _pool_entries(state, state_rows[done], entry[done], norm_weight, inv_freq, ratio, coff, eps,
                                  col, dtype).to(dtype)
    return out


@completed_group_entries.register_fake
def _(state: torch.Tensor, state_rows: torch.Tensor, entry: torch.Tensor, dest: torch.Tensor,
      norm_weight: torch.Tensor, inv_freq: torch.Tensor, ratio: int, coff: int, eps: float, col: int,
      dtype: torch.dtype) -> torch.Tensor:
    return state.new_empty(dest.shape[0], norm_weight.shape[0], dtype=dtype)


def _select_in_graph(self: Any, p: dict[str, Any], ctx: Any, pools: Any, layer: int, inv_freq: torch.Tensor,
                     layer_pools: LayerPools | None = None) -> Any:
    """`Attention.select` traced into the CPU decode graph: the cache writes (`_write_in_graph`), then the
    layer's plain pools with the step's index tables and, for a CSA layer, the indexer's top-k (the torch
    reference: scores over every visible entry, the deterministic selection; the gathers happen in `combine`,
    in the graph). Layers with FP8 rows or the online HCA state keep the eager island."""
    if layer_pools is None or not layer_pools.plain:
        return _island_select(self, p, ctx, pools, layer, inv_freq)
    lp = layer_pools
    _write_in_graph(self, p, ctx, lp, inv_freq)
    if not self.compressed:
        return lp.swa, ctx.swa_idx, None, None
    if not self.sparse:
        return lp.swa, ctx.swa_idx, lp.comp, ctx.visible[HCA]
    cand = ctx.visible[CSA]  # >= k + 1 columns (`_ctx_for_the_graph`): no size guard on the top-k
    top = topk_from_scores(indexer_scores_ref(p["qi"], p["w"], lp.idx, cand), cand, self.indexer.k)
    return lp.swa, ctx.swa_idx, lp.comp, top


@torch.library.custom_op("dsv4::padded_expert_rows", mutates_args=())
def padded_expert_rows(xs: torch.Tensor, e: torch.Tensor, rank: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                       w3: torch.Tensor, limit: float) -> torch.Tensor:
    """`layers.padded_rows` as one opaque op of the compiled decode graph: its buffer's row count (the most pairs
    routed to one expert) depends on the routing, so it cannot be traced; as an op it needs no graph break. The
    ranks before it and the weighted sum after it are traced (`layers.padded_experts`)."""
    return layers.padded_rows(xs, e, rank, w1, w2, w3, limit)


@padded_expert_rows.register_fake
def _(xs: torch.Tensor, e: torch.Tensor, rank: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
      limit: float) -> torch.Tensor:
    return torch.empty_like(xs)


def _grouped_in_graph(self: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`Experts.forward_grouped` in the CPU decode graph: `layers.padded_experts` around the
    `dsv4::padded_expert_rows` op with plain weights, the eager island with FP4 ones."""
    if self.fp4:
        return _island_grouped(self, x, idx, w)
    return layers.padded_experts(x, idx, w, self.w1, self.w2, self.w3, self.limit,
                                 rows_fn=torch.ops.dsv4.padded_expert_rows)


@torch.compiler.disable
def _island_grouped(self: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _originals[GROUPED](self, x, idx, w)


@torch.compiler.disable
def _island_select(self: Any, p: dict[str, Any], ctx: Any, pools: Any, layer: int, inv_freq: torch.Tensor) -> Any:
    """`Attention.select` as an eager island whose row tensors and index columns are never 0 or 1 long (padded
    with unused rows and -1 columns): the dynamic graph after it treats 0 and 1 as special sizes, so a size the
    warm-up never met (one visible HCA entry, one decoded FP8 row) would compile — or, under the trimmed guards,
    reuse a graph traced for another size."""
    swa_kv, swa_idx, comp_kv, comp_idx = _originals[SELECT](self, p, ctx, pools, layer, inv_freq)
    if comp_idx is not None:
        comp_idx = _two_or_more(comp_idx, 1, fill=-1)
    if comp_kv is not None:
        comp_kv = _two_or_more(comp_kv, 0)
    return _two_or_more(swa_kv, 0), swa_idx, comp_kv, comp_idx


def _ctx_for_the_graph(ctx: Any) -> Any:
    """The step's index tables and block tables (which the graph's cache writes read) with >= 2 columns (-1
    padded: no row), for the same reason as `_island_select`'s rows; a CSA layer's candidates with more columns
    than the indexer keeps (k + 1), so the traced top-k never meets fewer (`topk` needs k <= columns)."""
    ctx.swa_idx = _two_or_more(ctx.swa_idx, 1, fill=-1)
    least = {CSA: ctx.cfg.index_topk + 1}
    ctx.visible = {kind: _two_or_more(t, 1, fill=-1, least=least.get(kind, 2)) for kind, t in ctx.visible.items()}
    tables = {name: _two_or_more(t, 1, fill=-1) for name, t in ctx.batch.block_tables.items()}
    ctx.batch = dataclasses.replace(ctx.batch, block_tables=tables)
    return ctx


def _two_or_more(t: torch.Tensor, dim: int, fill: int = 0, least: int = 2) -> torch.Tensor:
    if t.shape[dim] >= least:
        return t
    shape = list(t.shape)
    shape[dim] = least - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)


def _combine_in_graph(q: torch.Tensor, rows: Any, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """`Attention.combine` for the CPU decode graph: the torch reference (what `dispatch` runs for decode-sized
    batches on CPU), traced into the block's graph instead of run as dozens of eager operators."""
    from dsv4.kernels.reference import sparse_attention_ref

    return sparse_attention_ref(q, *rows, sink, scale)


def _activate() -> None:
    MHC.weights = staticmethod(_compiled["weights"])
    for key in (*ISLANDS, COMBINE):
        if key in _compiled:
            setattr(_island_owner(*key[:2]), key[2], _compiled[key])
    DecodeStep.stack = _compiled.get("stack")
    DecodeStep.block = _compiled.get("block")
    DecodeStep.buckets = _compiled.get("buckets")
    DecodeStep.guards = _compiled.get("guards", nullcontext)
    DecodeStep.prepare = _compiled.get("prepare")
    DecodeStep.layer_pools = bool(_compiled.get("layer_pools"))


def reactivate() -> None:
    """Back to what `use_compiled` built, after `use_eager` (no recompilation; the guards as they were)."""
    _activate()


def use_eager() -> None:
    for name, fn in EAGER.items():
        setattr(MHC, name, staticmethod(fn))
    for key, fn in _originals.items():
        setattr(_island_owner(*key[:2]), key[2], fn)
    DecodeStep.stack = None
    DecodeStep.block = None
    DecodeStep.buckets = None
    DecodeStep.guards = nullcontext
    DecodeStep.prepare = None
    DecodeStep.layer_pools = False


def _differentiating_guards() -> AbstractContextManager[Any]:
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def guards_setting() -> str:
    """`DSV4_COMPILE_GUARDS`: "trimmed" (default) or "full"; anything else is an error naming the variable."""
    value = os.environ.get(GUARDS_ENV, "trimmed")
    if value not in ("trimmed", "full"):
        raise ValueError(f"{GUARDS_ENV} must be trimmed or full, got {value!r}")
    return value


def trim_guards() -> bool:
    """After the warm-up compiled every decode variant: check only the guards that tell them apart (see the
    module docstring). False when `DSV4_COMPILE_GUARDS=full` keeps them all."""
    if guards_setting() == "full":
        return False
    _compiled["guards"] = _differentiating_guards
    _activate()
    return True


def is_compiled() -> bool:
    return MHC.weights is not EAGER["weights"]


def decode_step_compiled() -> bool:
    return compiled_decode()


def graph_breaks() -> int:
    """Graph breaks dynamo recorded in this process (each island call site counts once per compiled variant)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def empty_decode_batch(spec: Any, n: int, device: str) -> ForwardBatch:
    """n one-token sequences that read and write no cache row (`pad_decode_batch` of an empty batch: every
    block-table entry -1)."""
    none = torch.zeros(0, dtype=torch.long, device=device)
    tables = {p: torch.zeros(0, 1, dtype=torch.long, device=device) for p in spec.pools if p != "idx"}
    empty = ForwardBatch(none, none, torch.zeros(1, dtype=torch.long, device=device), tables, none, none)
    batch = pad_decode_batch(empty, n)
    batch.logits_indices = torch.arange(n, device=device)
    return batch


def warm_up_sizes(device: str, max_batch: int, model: Any) -> tuple[int, ...]:
    """CUDA: every bucket up to `max_batch`. CPU: batch 1, 2 (the dynamic graph) and the first batch whose routed
    experts run grouped instead of gathered (`Experts.gathers`), so no decode batch compiles while serving."""
    max_batch = max(1, max_batch)
    if str(device).startswith("cuda"):
        return tuple(b for b in DECODE_BUCKETS if b <= max_batch) or (1,)
    cfg = model.cfg
    k = int(cfg.num_experts_per_tok)
    experts = model.layers[0].ffn.experts if hasattr(model.layers[0].ffn, "experts") else None
    grouped = next((t for t in range(1, max_batch + 1) if experts is None or not experts.gathers(t * k)), None)
    return tuple(sorted({t for t in (1, 2, grouped) if t is not None and t <= max_batch}))


def _time_decode(model: Any, pools: Any, batches: list[ForwardBatch], reps: int) -> float:
    sync = torch.cuda.synchronize if pools.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        for b in batches:
            model(b, pools)
    sync()
    return time.perf_counter() - t0


def warm_up(model: Any, pools: Any, device: str, max_batch: int, say: Callable[[str], None] = log.info) -> float:
    """Compile the decode step on every warm-up batch size; returns eager time / compiled time on those batches."""
    sizes = warm_up_sizes(device, max_batch, model)
    batches = [empty_decode_batch(pools.spec, n, device) for n in sizes]
    for i, b in enumerate(batches, 1):
        t0 = time.perf_counter()
        model(b, pools)
        model(b, pools)  # CUDA graphs record on the second call
        say(f"compile warm-up {i}/{len(batches)}: decode batch {sizes[i - 1]}, {time.perf_counter() - t0:.1f} s")
    _time_decode(model, pools, batches, 1)  # sizes in turn: frames compiled for one size may recompile for another
    trim_guards()  # every variant is compiled now
    reps = 5
    compiled = _time_decode(model, pools, batches, reps)
    use_eager()
    try:
        eager = _time_decode(model, pools, batches, reps)
    finally:
        _activate()
    return eager / max(1e-9, compiled)


def _mhc_inputs(cfg: Any, tokens: int, device: str) -> tuple:
    hc = int(cfg.hc_mult)
    g = torch.Generator().manual_seed(tokens)
    mixes = torch.randn(tokens, (2 + hc) * hc, generator=g).to(device)
    base, scale = torch.zeros((2 + hc) * hc, device=device), torch.ones(3, device=device)
    return mixes, base, scale, hc, int(cfg.hc_sinkhorn_iters), float(cfg.hc_eps)


def warm_up_mhc(cfg: Any, device: str, say: Callable[[str], None] = log.info) -> float:
    """The group path: compile the mHC mixing weights on a decode and a prefill shape; eager / compiled time."""
    args = [_mhc_inputs(cfg, t, device) for t in (1, 7, 64)]
    for i, a in enumerate(args, 1):
        t0 = time.perf_counter()
        MHC.weights(*a)
        say(f"compile warm-up {i}/{len(args)}: mHC on {a[0].shape[0]} tokens, {time.perf_counter() - t0:.1f} s")
    reps = 20

    def timed(fn: Callable[..., Any]) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            for a in args:
                fn(*a)
        return time.perf_counter() - t0

    return timed(EAGER["weights"]) / max(1e-9, timed(MHC.weights))


@torch.inference_mode()
def setup(mode: str, model: Any, pools: Any, device: str, say: Callable[[str], None] = log.info,
          decode_step: bool = True, max_batch: int = 256) -> str:
    """Apply `--compile mode` for this process; returns what was decided, for the start-up report.
    `decode_step=False` (TP / DP ranks): the mHC mixing weights only."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {mode!r}")
    guards_setting()  # a bad value is refused before anything compiles
    if mode == "off":
        use_eager()
        return "off"
    what = "decode step compiled" if decode_step else "mHC functions compiled"
    try:
        use_compiled(device, decode_step)
        gain = warm_up(model, pools, device, max_batch, say) if decode_step else warm_up_mhc(model.cfg, device, say)
    except Exception as e:  # inductor missing a compiler, an unsupported op: serve eagerly
        use_eager()
        log.warning("torch.compile failed (%s: %s); serving eagerly", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return f"off (compilation failed: {type(e).__name__})"
    if mode == "auto" and gain < AUTO_MIN_GAIN:
        use_eager()
        return f"off (auto: compiled ran {gain:.2f}x eager's speed in the warm-up, below {AUTO_MIN_GAIN}x)"
    breaks = f", {graph_breaks()} graph breaks" if decode_step else ""
    return f"on ({what}; {gain:.2f}x eager's speed on the warm-up batches{breaks})"
