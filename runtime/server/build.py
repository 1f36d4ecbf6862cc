"""Build a serving engine from a `ServeConfig`: load the checkpoint (creating the built-in tiny one when no
--model is given and it is missing), size the cache (budget or fixed blocks), allocate the pools, wire the
metrics observer, and describe the capacity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsv4.runtime.cache.pools import blocks_of
from dsv4.runtime.server.config import ServeConfig, ServeConfigError
from dsv4.runtime.server.memory_guard import check_cpu_blocks, clamp_cpu_budget, host_available_bytes, pools_bytes

if TYPE_CHECKING:
    from dsv4.runtime.cache.manager import CacheManager
    from dsv4.runtime.cache.spec import CacheSpec
    from dsv4.runtime.config import ModelConfig
    from dsv4.runtime.engine.engine import AsyncEngine

log = logging.getLogger("dsv4.serve")

CPU_DEFAULT_BUDGET_GIB = 0.0625  # 64 MiB: plenty for the tiny model, cheap to allocate
GPU_MEMORY_FRACTION = 0.85  # of the free memory after the weights are loaded


@dataclass
class Built:
    engine: AsyncEngine  # not started
    tokenizer: Any
    model_name: str
    max_model_len: int
    metrics: Any  # EngineMetrics
    report: list[str]  # capacity report lines
    cache: CacheManager
    spec: CacheSpec
    model_config: ModelConfig
    group: Any = None  # dsv4.runtime.parallel.leader.Leader when tp > 1 (close it after the engine stops)


def ensure_tiny_model(path: Any, say: Any = log.info) -> None:
    """Write the deterministic tiny random checkpoint to `path` unless it already has a config.json."""
    from pathlib import Path

    p = Path(path)
    if (p / "config.json").exists():
        return
    from dsv4.runtime.checkpoint.random_init import write_random_checkpoint
    from dsv4.runtime.config import tiny

    say(f"no checkpoint at {p}: writing the built-in tiny model (seed 0)")
    write_random_checkpoint(tiny(), p, seed=0)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ServeConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return name


def expected_context(cfg: ServeConfig, max_position_embeddings: int) -> int:
    """The sequence length the budget split is sized for (the planner writes it into the config)."""
    return cfg.expected_context or min(max_position_embeddings, cfg.max_model_len or 8192)


def cache_spec(cfg: ServeConfig, model_config: ModelConfig, kv_dtype: str) -> CacheSpec:
    """The pools' layout: FP8 KV keeps FP4 indexer keys, the layout the planner (operator/planner.py) and
    `dsv4 bench capacity` size; `hca_state` as configured (the planner writes its choice)."""
    from dsv4.runtime.cache.spec import CacheSpec

    return CacheSpec.from_model(model_config, kv_dtype=kv_dtype, index_dtype="fp4" if kv_dtype == "fp8" else None,
                                hca_state=cfg.hca_state)


def cache_for_budget(cfg: ServeConfig, spec: CacheSpec, budget_bytes: int, context: int) -> CacheManager:
    """Split `budget_bytes` over the pools exactly as the operator's planner does (operator/capacity.py calls
    the same `CacheManager.from_budget` with the same expected context and prefill chunk), so a pod's pools
    match its plan block for block."""
    from dsv4.runtime.cache.manager import CacheManager
    from dsv4.runtime.cache.sizing import largest_prefill_chunk

    # prefill headroom = the scheduler's largest chunk, as the planner sizes it
    chunk = largest_prefill_chunk(cfg.max_num_batched_tokens, cfg.chunked_prefill_size)
    return CacheManager.from_budget(spec, budget_bytes, expected_context=context, split_override=cfg.pool_split,
                                    checkpoint_every=cfg.checkpoint_every, prefill_chunk=chunk,
                                    enable_prefix_caching=cfg.enable_prefix_caching, policy=cfg.cache_policy)


def build_engine(cfg: ServeConfig, say: Any = log.info) -> Built:
    import torch
    from dsv4.runtime.cache.manager import CacheManager
    from dsv4.runtime.engine.engine import AsyncEngine, EngineConfig, LLMEngine
    from dsv4.runtime.engine.scheduler import SchedulerConfig
    from dsv4.runtime.model import KVPools, load_model
    from dsv4.runtime.parallel.group import shard_for
    from dsv4.runtime.server.metrics import EngineMetrics, cache_info_labels

    model_dir = cfg.model_dir
    if cfg.model is None:
        ensure_tiny_model(model_dir, say)
    device = resolve_device(cfg.device)
    on_idle = None
    if device == "cpu":
        from dsv4.runtime.malloc_tuning import keep_freed_memory, trim_free_heap

        keep_freed_memory()  # per-step temporaries reuse freed heap (up to a bound) instead of faulting pages in
        on_idle = trim_free_heap  # an idle server gives the steps' freed heap back
    group = None
    if cfg.tp > 1 or cfg.dp > 1:  # spawn ranks 1..N-1 first: they load the checkpoint while this process does
        from dsv4.runtime.parallel.leader import start_for_serving

        group = start_for_serving(cfg, model_dir, device)
        device = group.info.device
    say(f"loading {model_dir} on {device} (weights {cfg.weights_dtype})")
    # with tp > 1 only rank 0's rows / columns / experts are read, like the other ranks (parallel/worker.py);
    # with dp > 1 (EP) rank 0 reads its share of the routed experts and the rest whole, or its TP group's cut of it
    shard = shard_for(group.info, group.data_parallel) if group is not None else None
    model, mcfg, tok = load_model(str(model_dir), device=device, progress=False, shard=shard,
                                  weights_dtype=cfg.weights_dtype,
                                  with_mtp=False)  # not run: no speculative decoding
    if tok is None:
        raise ServeConfigError(f"{model_dir} has no tokenizer.json; the server needs one")
    if cfg.chat_template is not None:
        from dsv4.runtime.tokenizer import load_chat_template

        try:
            tok = tok.with_chat_template(load_chat_template(cfg.chat_template))
        except (OSError, ValueError) as e:
            raise ServeConfigError(f"chat_template: {e}") from None
    model.eval()
    kv_dtype = cfg.kv_dtype
    if kv_dtype == "auto":
        kv_dtype = "fp32" if device == "cpu" and str(mcfg.torch_dtype) in ("float32", "torch.float32") else "bf16"
    spec = cache_spec(cfg, mcfg, kv_dtype)
    context = None
    # on CPU every TP or DP rank holds full pools of its own (docs/parallel.md): each gets 1/ranks of the host
    host_share = host_available_bytes() // (cfg.tp * cfg.dp) if device == "cpu" else 0
    if cfg.num_blocks is not None:
        num_blocks = {p: int(cfg.num_blocks) for p in spec.pools}
        if device == "cpu" and (err := check_cpu_blocks(pools_bytes(spec, num_blocks), host_share,
                                                        cfg.host_memory_fraction)):
            raise ServeConfigError(err)

        def make_cache() -> CacheManager:
            return CacheManager(spec, num_blocks, policy=cfg.cache_policy, checkpoint_every=cfg.checkpoint_every,
                                enable_prefix_caching=cfg.enable_prefix_caching)
    else:
        if cfg.cache_budget_gib is not None:
            budget = int(cfg.cache_budget_gib * 2**30)
        elif device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(device))
            budget = int(free * GPU_MEMORY_FRACTION)
        else:
            budget = int(CPU_DEFAULT_BUDGET_GIB * 2**30)
        if device == "cpu":  # host-RAM guard: never more cache than the machine has (memory_guard.py)
            budget, warning = clamp_cpu_budget(budget, host_share, cfg.host_memory_fraction)
            if warning:
                log.warning(warning)
        context = expected_context(cfg, int(mcfg.max_position_embeddings))

        def make_cache() -> CacheManager:
            return cache_for_budget(cfg, spec, budget, context)
    cache = make_cache()
    num_blocks = dict(cache.num_blocks)
    try:
        pools = KVPools.for_model(mcfg, spec, num_blocks, device=device)
    except (RuntimeError, MemoryError) as e:  # torch's allocator: out of host or device memory
        raise ServeConfigError(f"cannot allocate the KV cache pools ({pools_bytes(spec, num_blocks) / 2**30:.2f} "
                               f"GiB on {device}): {e}; lower cache_budget_gib or num_blocks") from None
    from dsv4.runtime.model.compiled import setup as setup_compile

    # every rank decides the same way (auto is resolved to on in a group: replicated parts must match bitwise);
    # a group compiles the mHC functions only (`compiled.py`), a single-process replica the decode step
    compile_mode = "on" if cfg.compile == "auto" and group is not None else cfg.compile
    if group is not None:
        group.setup_workers(spec, num_blocks)  # the workers compile while this process does
    compile_state = setup_compile(compile_mode, model, pools, device, say, decode_step=group is None,
                                  max_batch=cfg.max_num_seqs)
    if group is not None:
        if not group.data_parallel:
            model = group.wrap(model)
    cache_limit = int(cache.max_request_tokens())
    max_len = min(int(mcfg.max_position_embeddings), cache_limit)
    if cfg.max_model_len is not None:
        if cfg.max_model_len > max_len:
            raise ServeConfigError(
                f"max_model_len {cfg.max_model_len} exceeds what this replica can hold: {max_len} tokens "
                f"(model positions {mcfg.max_position_embeddings}, cache {cache_limit})")
        max_len = cfg.max_model_len
    name = cfg.served_model_name or model_dir.name
    metrics = EngineMetrics(name, cache_info_labels(spec, num_blocks, cfg.cache_policy, cfg.enable_prefix_caching))
    sched = SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                            batching_delay_s=cfg.batching_delay_ms / 1000.0,
                            chunked_prefill_size=cfg.chunked_prefill_size)
    engine_cfg = EngineConfig(sched, max_len, cfg.max_queue)
    llm: Any = LLMEngine(model, mcfg, tok, cache, pools, engine_cfg, device, metrics)
    if group is not None and group.data_parallel:  # rank k's scheduler + cache here, its pools in process k
        from dsv4.runtime.engine.data_parallel import DataParallelEngine

        ranks = [llm] + [LLMEngine(model, mcfg, tok, make_cache(), None, engine_cfg, device)
                         for _ in range(1, cfg.dp)]
        metrics.data_parallel = True

        def step_all(batches: list[Any], _model: Any = model, _pools: Any = pools) -> list[Any]:
            return group.step_all(_model, batches, _pools)

        llm = DataParallelEngine(ranks, step_all, metrics)
    metrics.init_ranks(cfg.dp, cache.stats())
    metrics.update_cache(llm.stats_snapshot())
    report = capacity_report(spec, cache, num_blocks, max_len, kv_dtype, cfg) + [f"compile: {compile_state}"]
    if group is not None:
        from dsv4.runtime.parallel.leader import capacity_lines

        report += capacity_lines(group, mcfg, cache, context or max_len)
    return Built(AsyncEngine(llm, on_idle), tok, name, max_len, metrics, report, cache, spec, mcfg, group)


def capacity_report(spec: CacheSpec, cache: CacheManager, num_blocks: dict[str, int], max_len: int, kv_dtype: str,
                    cfg: ServeConfig) -> list[str]:
    lines = [f"cache: kv_dtype {kv_dtype}, block_size {spec.block_size} tokens (swa blocks {spec.swa_block_size}), "
             f"window {spec.window}, policy {cfg.cache_policy}, prefix caching "
             f"{'on' if cfg.enable_prefix_caching else 'off'}"]
    total = 0
    for name, ps in spec.pools.items():
        nb = int(blocks_of(num_blocks, name, 0))
        b = nb * ps.bytes_per_block
        total += b
        lines.append(f"  pool {name:<9} {nb:>7} blocks x {ps.bytes_per_block:>9} B = {b / 2**20:9.2f} MiB, "
                     f"{ps.tokens_per_block} tokens/block, {len(ps.layers)} layers -> {nb * ps.tokens_per_block} "
                     f"token positions")
    lines.append(f"  total {total / 2**20:.2f} MiB; largest request {cache.max_request_tokens()} tokens; "
                 f"max_model_len {max_len}")
    lines.append(cache.format_capacity_report())
    lines.append(f"scheduler: max_num_batched_tokens {cfg.max_num_batched_tokens}, max_num_seqs {cfg.max_num_seqs}, "
                 f"batching delay {cfg.batching_delay_ms:g} ms, max_queue {cfg.max_queue}")
    return lines
