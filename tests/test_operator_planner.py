"""The planner: Flash and Pro x H100/H200/B200 x every profile, infeasible specs, overrides, and a
cross-check of the planned capacity against the runtime's own block allocator."""

from __future__ import annotations

import math
from typing import Any

import pytest
from dsv4.operator import api
from dsv4.operator import weights as W
from dsv4.operator.api import DSV4EndpointSpec
from dsv4.operator.hardware import GIB, accelerator
from dsv4.operator.planner import GPU_MEMORY_UTILIZATION, PlanError, model_config, plan
from dsv4.operator.profiles import NAMED
from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import flash, pro
from dsv4.runtime.parallel.ownership import check_tp

from dsv4.settings_enums import PROFILE_NAMES

REASON_KEYS = {"layout", "tensorParallelSize", "dataParallelSize",
               "batchingDelayMs", "maxNumBatchedTokens", "chunkedPrefillSize", "cachePolicy",
               "hcaState", "poolSplit", "maxServableContext", "maxModelLen", "sessionsPerReplica", "initialReplicas"}


def spec(variant: str = "flash", gpu: str = "H200", profile: str | dict = "short-chat", **extra: Any
         ) -> DSV4EndpointSpec:
    prof = {"name": profile} if isinstance(profile, str) else {"name": "custom", "custom": profile}
    d = {"model": {"variant": variant, "weights": {"hostPath": {"path": "/models"}}}, "profile": prof,
         "accelerator": {"type": gpu}}
    for k, v in extra.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) and k in d else d.__setitem__(k, v)
    return DSV4EndpointSpec.model_validate(d)


def test_weight_sizes_match_the_published_models() -> None:
    f, p = W.param_counts(flash()), W.param_counts(pro())
    assert f.total == pytest.approx(284e9, rel=0.05)  # "284B total"
    assert p.total == pytest.approx(1.6e12, rel=0.05)  # "1.6T total"
    assert W.active_params_per_token(flash()) == pytest.approx(13e9, rel=0.1)
    assert W.active_params_per_token(pro()) == pytest.approx(49e9, rel=0.1)
    assert W.weight_bytes(pro(), "fp8-fp4") == pytest.approx(850e9, rel=0.05)  # ~850 GB staged on NVMe
    for cfg in (flash(), pro()):
        sizes = [W.weight_bytes(cfg, q) for q in ("fp8-fp4", "fp8", "bf16")]
        assert sizes == sorted(sizes) and sizes[2] == pytest.approx(2 * W.param_counts(cfg).total, rel=1e-6)
    with pytest.raises(ValueError, match="quantization"):
        W.weight_bytes(flash(), "int3")


CASES = [(v, g, p) for v in ("flash", "pro") for g in ("H100", "H200", "B200") for p in PROFILE_NAMES]


@pytest.mark.parametrize(("variant", "gpu", "profile"), CASES)
def test_plan_table(variant: str, gpu: str, profile: str) -> None:
    s = spec(variant, gpu, profile)
    cfg, acc, wl = model_config(s), accelerator(gpu), NAMED[profile]
    wbytes = W.weight_bytes(cfg, "fp8-fp4")
    usable = acc.memory_bytes * GPU_MEMORY_UTILIZATION
    if variant == "pro" and gpu == "H100":
        # 8 x 80 GB (~620 GB usable) cannot hold ~860 GB of weights: precise, actionable error
        with pytest.raises(PlanError) as err:
            plan(s)
        assert err.value.reason == "WeightsDoNotFit"
        assert "need more GPUs per replica than given" in err.value.message
        assert "H100" in err.value.message and "gpusPerNode=8" in err.value.message
        assert math.ceil(wbytes / usable) > 8
        return
    p = plan(s)
    tp, dp = p.tensor_parallel_size, p.data_parallel_size
    check_tp(cfg, tp)  # the runtime can split the model over each rank's TP group
    assert p.gpus_per_replica == tp * dp <= 8 and cfg.n_routed_experts % (tp * dp) == 0
    assert p.layout == ("dp-ep" if dp > 1 else "tp")
    # memory adds up: the GPU's weights (experts / (dp x tp) + the other TP-split parts / tp + the replicated parts
    # whole) + cache within one GPU
    held = W.weight_bytes_per_gpu_dp_tp(cfg, dp, tp, "fp8-fp4")
    assert p.weight_bytes_per_gpu == held and held + p.cache_bytes_per_gpu < usable
    assert p.cache_bytes_per_gpu > 1 * GIB
    # TP1 is chosen whenever the weights leave room for a cache on one GPU and it holds as many per GPU
    if tp * dp > 1 and wbytes + 3 * GIB > usable:
        assert "TP1: no" in p.reasons["tensorParallelSize"] + p.reasons["dataParallelSize"]
    assert p.max_servable_context >= wl.context_max and p.max_model_len == wl.context_max
    assert p.context_length_range == f"0-{wl.context_max}"
    # each DP rank has its own scheduler: max_num_seqs is one rank's share of the replica's sessions
    assert p.sessions_per_replica % dp == 0
    assert 1 <= p.sessions_per_replica <= 256 * dp and p.max_num_seqs == min(256, p.sessions_per_replica // dp)
    assert p.initial_replicas == max(1, math.ceil(wl.concurrency / p.sessions_per_replica))
    assert p.decode_step_ms <= wl.itl_target_ms
    assert p.chunked_prefill_size <= p.max_num_batched_tokens
    assert p.batching_delay_ms <= 20 and p.batching_delay_ms <= wl.itl_target_ms * 0.1
    assert p.cache_policy in ("full", "checkpoint", "recompute")
    if wl.prefix_reuse_ratio < 0.2:
        assert p.cache_policy == "recompute"
    assert sum(p.pool_split.values()) == pytest.approx(1.0)
    assert set(p.pool_split) == set(CacheSpec.from_model(cfg, "fp8", index_dtype="fp4").block_pools)
    assert p.hca_state in ("raw", "online")
    assert REASON_KEYS <= set(p.reasons) and all(p.reasons[k].strip() for k in REASON_KEYS)
    st = p.to_status().wire()
    assert st["tensorParallelSize"] == tp and st["dataParallelSize"] == dp and st["layout"] == p.layout
    assert st["parallelism"] == (f"TP{tp}" if dp == 1 else f"DP{dp}+EP" if tp == 1 else f"DP{dp}xTP{tp}+EP")
    assert st["reasons"]["cachePolicy"] == p.reasons["cachePolicy"]


def test_more_memory_never_gives_fewer_sessions_per_gpu() -> None:
    for variant in ("flash", "pro"):
        per_gpu = []
        for gpu in ("H200", "B200", "B200-192"):
            p = plan(spec(variant, gpu, "coding-agent", overrides={"cachePolicy": "recompute"}))
            per_gpu.append(p.sessions_per_replica / p.gpus_per_replica)
        assert per_gpu == sorted(per_gpu), (variant, per_gpu)


def test_long_context_needs_more_than_chat() -> None:
    chat, agent = plan(spec("flash", "H200", "short-chat")), plan(spec("flash", "H200", "long-context-agent"))
    assert agent.max_model_len > chat.max_model_len
    assert agent.sessions_per_replica < chat.sessions_per_replica
    assert agent.expected_context > chat.expected_context
    # the compressed pools take a larger share of the budget for long contexts
    assert agent.pool_split["csa"] > chat.pool_split["csa"]


def test_overrides_are_respected_and_explained() -> None:
    s = spec("flash", "H200", "coding-agent", overrides={"tensorParallelSize": 4, "batchingDelayMs": 7.5,
                                                         "cachePolicy": "checkpoint", "maxNumBatchedTokens": 4096})
    p = plan(s)
    assert (p.tensor_parallel_size, p.batching_delay_ms, p.cache_policy, p.max_num_batched_tokens) == \
        (4, 7.5, "checkpoint", 4096)
    for k in ("tensorParallelSize", "batchingDelayMs", "cachePolicy", "maxNumBatchedTokens"):
        assert "overrides" in p.reasons[k]


def test_hca_state_is_online_only_when_the_cache_bounds_the_raw_layout() -> None:
    # Flash short-chat on H200 without window reuse: the raw layout holds more sessions than the batch allows
    h200 = plan(spec("flash", "H200", "short-chat", overrides={"cachePolicy": "recompute"}))
    assert h200.hca_state == "raw" and "raw keeps the fused compressor kernel" in h200.reasons["hcaState"]
    # on B200 (DP2+EP) the cache bounds each rank's sessions: online holds more, and more than the raw state forced
    # on the same layout
    b200 = plan(spec("flash", "B200", "short-chat"))
    dp = b200.data_parallel_size
    same_layout = ({"dataParallelSize": dp} if dp > 1 else {}) | {"tensorParallelSize": b200.tensor_parallel_size}
    raw = plan(spec("flash", "B200", "short-chat", overrides={"hcaState": "raw", **same_layout}))
    assert b200.hca_state == "online" and raw.hca_state == "raw" and raw.data_parallel_size == dp
    assert b200.sessions_per_replica > raw.sessions_per_replica
    per_rank = f"{b200.sessions_per_replica // dp} sessions (raw {raw.sessions_per_replica // dp})"
    assert per_rank in b200.reasons["hcaState"]
    assert b200.to_status().wire()["hcaState"] == "online"
    forced = plan(spec("flash", "H200", "short-chat", overrides={"cachePolicy": "recompute", "hcaState": "online"}))
    assert forced.hca_state == "online" and "overrides.hcaState" in forced.reasons["hcaState"]


def test_tp_override_too_small_for_the_weights() -> None:
    with pytest.raises(PlanError) as err:
        plan(spec("pro", "H200", "short-chat", overrides={"tensorParallelSize": 4}))
    assert err.value.reason == "WeightsDoNotFit"
    assert "tensorParallelSize=4" in err.value.message and "at least" in err.value.message


def test_tp_override_must_divide_heads_and_experts() -> None:
    with pytest.raises(PlanError) as err:
        plan(spec("flash", "H200", "short-chat", overrides={"tensorParallelSize": 3}))
    assert err.value.reason == "InvalidTensorParallel" and "must divide" in err.value.message


def test_context_that_cannot_fit_is_rejected_with_the_numbers() -> None:
    beyond_model = {"contextP50": 100_000, "contextP95": 1_000_000, "contextMax": 2_000_000, "concurrency": 4}
    with pytest.raises(PlanError) as err:
        plan(spec("pro", "H200", beyond_model))
    assert err.value.reason == "ContextDoesNotFit" and "2000000" in err.value.message
    assert "1048576" in err.value.message
    # fits the model, not the cache of a small custom GPU
    small = {"contextP50": 100_000, "contextP95": 500_000, "contextMax": 1_000_000, "concurrency": 4}
    s = DSV4EndpointSpec.model_validate({"model": {"variant": "flash", "weights": {"hostPath": {"path": "/m"}}},
                                         "profile": {"name": "custom", "custom": small},
                                         "accelerator": {"type": "custom", "memoryGiB": 86, "gpusPerNode": 2}})
    with pytest.raises(PlanError) as err:
        plan(s)
    assert err.value.reason == "ContextDoesNotFit" and "longest servable context" in err.value.message
    # an explicit maxModelLen caps the profile instead
    capped = s.model_copy(update={"overrides": api.Overrides(max_model_len=65536)})
    assert plan(capped).max_model_len == 65536


def test_unreachable_itl_target() -> None:
    wl = {"contextP50": 1000, "contextP95": 2000, "contextMax": 4000, "itlTargetMs": 1}
    with pytest.raises(PlanError) as err:
        plan(spec("pro", "H200", wl))
    assert err.value.reason == "LatencyTargetUnreachable" and "ITL target 1 ms" in err.value.message


def test_custom_model_config_is_planned_from_its_shapes() -> None:
    cfg = flash().to_dict()
    cfg["n_routed_experts"] = 64  # a quarter of the experts: a much smaller checkpoint
    s = DSV4EndpointSpec.model_validate({"model": {"variant": "custom", "config": cfg,
                                                   "weights": {"pvc": {"claimName": "w"}}},
                                         "profile": {"name": "short-chat"}, "accelerator": {"type": "H100"}})
    p = plan(s)
    assert p.weight_bytes < W.weight_bytes(flash()) / 2
    assert p.gpus_per_replica < plan(spec("flash", "H100", "short-chat")).gpus_per_replica
    bad = DSV4EndpointSpec.model_validate({"model": {"variant": "custom", "config": {"num_hidden_layers": 2},
                                                     "weights": {"pvc": {"claimName": "w"}}},
                                           "profile": {"name": "short-chat"}})
    with pytest.raises(PlanError) as err:
        plan(bad)
    assert err.value.reason == "InvalidModelConfig" and "model.config" in err.value.message


def test_autoscaling_bounds_clamp_initial_replicas() -> None:
    d = {"model": {"variant": "flash", "weights": {"hostPath": {"path": "/m"}}},
         "profile": {"name": "long-context-agent", "concurrency": 1000}, "accelerator": {"type": "H200"},
         "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 3}}
    s = DSV4EndpointSpec.model_validate(d)
    p = plan(s)
    assert p.initial_replicas == 3 and "clamped to [2, 3]" in p.reasons["initialReplicas"]
    d["profile"]["concurrency"] = 1
    assert plan(DSV4EndpointSpec.model_validate(d)).initial_replicas == 2


def test_planned_sessions_really_fit_in_the_runtime_allocator() -> None:
    """Build the runtime's CacheManager with the plan's blocks and prefill `sessions_per_replica`
    requests of the expected context chunk by chunk: all fit, and one more does not."""
    wl = {"contextP50": 16000, "contextP95": 32000, "contextMax": 65536, "outputTokens": 768,
          "prefixReuseRatio": 0.0, "concurrency": 64, "itlTargetMs": 200}
    s = DSV4EndpointSpec.model_validate({"model": {"variant": "flash", "weights": {"hostPath": {"path": "/m"}}},
                                         "profile": {"name": "custom", "custom": wl},
                                         "accelerator": {"type": "custom", "memoryGiB": 90, "gpusPerNode": 2}})
    p = plan(s)
    assert "bound by cache" in p.reasons["sessionsPerReplica"]
    assert p.hca_state == "online"  # cache-bound: the online HCA slot holds more (test_hca_state_choice)
    mgr = CacheManager(CacheSpec.from_model(model_config(s), kv_dtype="fp8", index_dtype="fp4", hca_state="online"),
                       p.num_blocks, policy=p.cache_policy)
    assert all(prefill(mgr, i, p.expected_context, p.chunked_prefill_size) for i in range(p.sessions_per_replica))
    assert not prefill(mgr, p.sessions_per_replica, p.expected_context, p.chunked_prefill_size)


def prefill(mgr: CacheManager, i: int, context: int, chunk: int) -> bool:
    """Prefill request i of `context` distinct tokens chunk by chunk; False when a chunk does not fit."""
    toks = [(i * 7919 + j) % 120_000 for j in range(context)]
    mgr.start(f"r{i}", toks)
    n = 0
    while n < context:
        n2 = min(context, n + chunk)
        if not mgr.allocate(f"r{i}", n2):
            return False
        mgr.commit(f"r{i}", toks, n2)
        n = n2
    return True


@pytest.mark.parametrize(("gpu", "layout"), [("B200", "tp"), ("B200", "dp-ep"), ("H200", None)])
def test_sessions_per_replica_equal_what_each_rank_allocator_admits(gpu: str, layout: str | None) -> None:
    """Pro long-context-agent on 8 x B200 in both layouts, and on 8 x H200 as planned (DP ranks with TP inside:
    test_pro_on_h200_takes_tp_inside_dp_ranks_when_that_holds_more): every rank builds the pools its pod's config
    gives (the runtime's `cache_for_budget`: a TP group's one cache, or each DP rank's own); ranks with a cache x the
    requests one admits == sessionsPerReplica, and one more request does not fit."""
    from dsv4.operator import manifests
    from dsv4.runtime.server.build import cache_for_budget, cache_spec, expected_context
    from dsv4.runtime.server.config import ServeConfig

    s = spec("pro", gpu, "long-context-agent", overrides={"layout": layout} if layout else {})
    p = plan(s)
    assert p.layout == (layout or "dp-ep") and "bound by cache" in p.reasons["sessionsPerReplica"]
    values = manifests.runtime_config(manifests.EndpointRef("agents", "ns", "uid"), s, p)
    cfg = ServeConfig.checked(**values)  # `dsv4 serve` accepts every layout the planner writes (TP in DP too)
    want = (p.tensor_parallel_size, 1, False) if p.layout == "tp" else (p.tensor_parallel_size, p.data_parallel_size,
                                                                          True)
    assert (cfg.tp, cfg.dp, cfg.ep) == want and cfg.tp * cfg.dp == p.gpus_per_replica == 8
    mcfg = model_config(s)
    context = expected_context(cfg, int(mcfg.max_position_embeddings))
    assert context == p.expected_context
    mgr = cache_for_budget(cfg, cache_spec(cfg, mcfg, values["kv_dtype"]), int(cfg.cache_budget_gib * 2**30), context)
    chunk = min(cfg.chunked_prefill_size or cfg.max_num_batched_tokens, cfg.max_num_batched_tokens)
    admitted = 0
    while prefill(mgr, admitted, context, chunk):
        admitted += 1
    assert cfg.dp * admitted == p.sessions_per_replica
    assert admitted == cfg.max_num_seqs  # each rank's scheduler runs as many as its cache holds


def test_pro_on_b200_chooses_dp_ep_and_says_why() -> None:
    p = plan(spec("pro", "B200", "long-context-agent"))
    tp8 = plan(spec("pro", "B200", "long-context-agent", overrides={"layout": "tp"}))
    assert (p.parallelism.label, tp8.parallelism.label) == ("DP8+EP", "TP8")
    assert p.sessions_per_replica > 4 * tp8.sessions_per_replica
    why = p.reasons["layout"]
    assert why.startswith(f"DP8+EP: 8 caches of {p.sessions_per_replica // 8} sessions = {p.sessions_per_replica} ")
    assert f"vs TP8: one cache of {tp8.sessions_per_replica} sessions" in why
    assert "overrides" in tp8.reasons["layout"] and "overrides" not in why


def test_pro_dp8_ep_on_h200_leaves_too_little_cache() -> None:
    """EP alone keeps attention, the shared expert, embedding and head whole on every rank: 131.5 GB of Pro per
    GPU next to an H200's 135.7 GB usable, so each rank's cache holds few long sessions; the planner takes a layout
    with TP inside the DP ranks instead (it splits those parts)."""
    dp8 = plan(spec("pro", "H200", "coding-agent", overrides={"dataParallelSize": 8}))
    assert dp8.weight_bytes_per_gpu == W.weight_bytes_per_gpu_ep(pro(), 8)
    chosen = plan(spec("pro", "H200", "coding-agent"))
    assert chosen.tensor_parallel_size > 1 and chosen.sessions_per_replica > dp8.sessions_per_replica


def eight_gpu_layouts(cfg: Any) -> dict[str, dict[str, Any]]:
    """Every layout of at most 8 GPUs as overrides, by label: TP t, and DP d x TP t + EP (d >= 2, d*t | E)."""
    out: dict[str, dict[str, Any]] = {}
    for t in (1, 2, 4, 8):
        try:
            check_tp(cfg, t)
        except ValueError:
            continue
        out[f"TP{t}"] = {"layout": "tp", "tensorParallelSize": t}
        for d in range(2, 8 // t + 1):
            if cfg.n_routed_experts % (d * t) == 0:
                out[f"DP{d}+EP" if t == 1 else f"DP{d}xTP{t}+EP"] = {"dataParallelSize": d, "tensorParallelSize": t}
    return out


@pytest.mark.parametrize("profile", ["coding-agent", "short-chat"])
def test_pro_on_h200_takes_tp_inside_dp_ranks_when_that_holds_more(profile: str) -> None:
    """Pro on 8 x H200: each layout planned on its own (overrides, recompute policy: the policy the layouts are
    compared under); the planner's choice is the one holding the most sessions per GPU (ties: fewer GPUs), and when
    that is DP ranks with TP inside it holds more sessions than TP8 and the reason says so."""
    cfg = pro()
    per_gpu: dict[str, tuple[float, int, int]] = {}
    for label, overrides in eight_gpu_layouts(cfg).items():
        try:
            q = plan(spec("pro", "H200", profile, overrides={**overrides, "cachePolicy": "recompute"}))
        except PlanError:
            continue
        assert q.parallelism.label == label
        assert q.weight_bytes_per_gpu == W.weight_bytes_per_gpu_dp_tp(cfg, q.data_parallel_size,
                                                                     q.tensor_parallel_size)
        per_gpu[label] = (q.sessions_per_replica / q.gpus_per_replica, -q.gpus_per_replica, q.sessions_per_replica)
    assert "TP8" in per_gpu and per_gpu["DP8+EP"][2] < per_gpu["TP8"][2]  # EP alone: least room for a cache
    best = max(per_gpu, key=lambda k: per_gpu[k][:2])
    p = plan(spec("pro", "H200", profile, overrides={"cachePolicy": "recompute"}))
    assert p.parallelism.label == best
    assert p.to_status().wire()["parallelism"] == best
    if p.data_parallel_size > 1 and p.tensor_parallel_size > 1:
        assert p.sessions_per_replica > per_gpu["TP8"][2]
        assert p.reasons["layout"].startswith(f"{best}: {p.data_parallel_size} caches of ")
        assert f"vs TP8: one cache of {per_gpu['TP8'][2]} sessions" in p.reasons["layout"]
        assert p.reasons["tensorParallelSize"].startswith(
            f"{p.tensor_parallel_size}: each of the {p.data_parallel_size} data-parallel ranks is a "
            f"TP{p.tensor_parallel_size} group")


def test_dp_and_tp_overrides_together() -> None:
    both = plan(spec("pro", "H200", "coding-agent", overrides={"dataParallelSize": 2, "tensorParallelSize": 4}))
    assert (both.layout, both.data_parallel_size, both.tensor_parallel_size) == ("dp-ep", 2, 4)
    assert both.reasons["layout"].startswith(
        "set by overrides.dataParallelSize and overrides.tensorParallelSize: DP2xTP4+EP: 2 caches of ")
    # layout dp-ep with a TP size: the planner picks the DP size (here the only one: 2 x 4 = 8 GPUs)
    inner = plan(spec("pro", "H200", "coding-agent", overrides={"layout": "dp-ep", "tensorParallelSize": 4}))
    assert inner.parallelism.label == "DP2xTP4+EP"
    with pytest.raises(PlanError) as err:
        plan(spec("pro", "H200", "coding-agent", overrides={"layout": "dp-ep", "tensorParallelSize": 8}))
    assert err.value.reason == "InvalidDataParallel" and "gpusPerNode=8" in err.value.message
    with pytest.raises(PlanError) as err:
        plan(spec("flash", "H200", "coding-agent", overrides={"dataParallelSize": 2, "tensorParallelSize": 3}))
    assert err.value.reason == "InvalidTensorParallel" and "num_attention_heads (64)" in err.value.message


def test_layout_overrides() -> None:
    forced = plan(spec("flash", "H200", "coding-agent", overrides={"dataParallelSize": 4}))
    assert (forced.layout, forced.data_parallel_size, forced.tensor_parallel_size) == ("dp-ep", 4, 1)
    assert forced.reasons["dataParallelSize"] == "set by overrides.dataParallelSize"
    assert forced.reasons["layout"].startswith("set by overrides.dataParallelSize: DP4+EP: 4 caches of ")
    tp = plan(spec("flash", "H200", "coding-agent", overrides={"layout": "tp"}))
    assert tp.layout == "tp" and tp.data_parallel_size == 1 and "DP" not in tp.reasons["tensorParallelSize"]
    dp = plan(spec("flash", "H200", "coding-agent", overrides={"layout": "dp-ep"}))
    assert dp.layout == "dp-ep" and dp.data_parallel_size > 1
    with pytest.raises(PlanError) as err:
        plan(spec("flash", "H200", "coding-agent", overrides={"dataParallelSize": 3}))
    assert err.value.reason == "InvalidDataParallel" and "n_routed_experts (256)" in err.value.message


def test_ties_go_to_the_fewest_gpus_and_are_explained() -> None:
    # Flash short-chat on H200: every DP size holds 256 sessions per GPU (each rank's batch is capped at 256)
    p = plan(spec("flash", "H200", "short-chat"))
    assert p.parallelism.label == "DP2+EP"
    assert "tied with DP4+EP, DP8+EP at 256.0/GPU: the fewest GPUs per replica wins" in p.reasons["layout"]
    # the tiny model on a CPU: the experts are too small for EP to free memory, TP1 ties with DP and wins
    tiny = plan(DSV4EndpointSpec.model_validate({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                                                 "accelerator": {"type": "cpu"}}))
    assert tiny.parallelism.label == "TP1"


def test_dp_decode_step_charges_the_token_exchange() -> None:
    """decode step = (the rank's dense weights + its experts touched by all ranks' tokens + b x kv_read) / (hbm x MBU)
    + layers x 2 x (dp - 1) x b x hidden x 2 B / interconnect (module docstring of planner.py)."""
    from dsv4.operator.hardware import MBU
    from dsv4.operator.planner import kv_read_bytes

    s = spec("flash", "H200", "coding-agent", overrides={"dataParallelSize": 8, "cachePolicy": "recompute"})
    p, cfg, acc, wl = plan(s), flash(), accelerator("H200"), NAMED["coding-agent"]
    b = p.sessions_per_replica // 8
    kv = kv_read_bytes(cfg, CacheSpec.from_model(cfg, kv_dtype="fp8", index_dtype="fp4", hca_state="raw"),
                       wl.context_p95)
    hbm = (W.decode_weight_bytes_ep(cfg, "fp8-fp4", 8, b) + b * kv) / (acc.hbm_bytes_per_s * MBU)
    exchange = cfg.num_hidden_layers * 2 * 7 * b * cfg.hidden_size * 2 / acc.interconnect_bytes_per_s
    assert exchange > 0 and p.decode_step_ms == pytest.approx((hbm + exchange) * 1000, abs=1e-3)


@pytest.mark.parametrize(("overrides", "dp", "tp", "rows_per_b"), [
    ({"layout": "tp", "tensorParallelSize": 8}, 1, 8, 2 * 2 * 7 / 8),  # TP8: two ring all-reduces per layer
    # DP2 x TP4: attention all-reduce 2 x 3/4, gather of the other rank's b, ring reduce-scatter of 2b over 8 GPUs
    # 7/8 x 2, all-gather of the rank's slices inside TP4 3/4
    ({"dataParallelSize": 2, "tensorParallelSize": 4}, 2, 4, 2 * 3 / 4 + 1 + 7 / 8 * 2 + 3 / 4),
])
def test_decode_step_charges_tp_all_reduces_and_the_ep_exchange(overrides: dict[str, Any], dp: int, tp: int,
                                                                 rows_per_b: float) -> None:
    """decode step = (dense / tp + routed / (dp x tp) x touched(dp x b) + b x kv_read) / (hbm x MBU)
    + layers x exchange rows x hidden x 2 B / interconnect (module docstring of planner.py)."""
    from dsv4.operator.hardware import MBU
    from dsv4.operator.planner import kv_read_bytes

    p = plan(spec("pro", "H200", "coding-agent", overrides={**overrides, "cachePolicy": "recompute"}))
    cfg, acc, wl = pro(), accelerator("H200"), NAMED["coding-agent"]
    assert (p.data_parallel_size, p.tensor_parallel_size) == (dp, tp)
    b = p.sessions_per_replica // dp
    bpp = W.bytes_per_param("fp8-fp4")
    c = W.param_counts(cfg)
    dense = (c.attention * bpp["attention"] + c.shared * bpp["shared"] + c.router * bpp["router"]
             + cfg.vocab_size * cfg.hidden_size * bpp["embeddings"])
    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** (dp * b)
    weights = dense / tp + c.routed * bpp["routed"] / (dp * tp) * touched
    kv = kv_read_bytes(cfg, CacheSpec.from_model(cfg, kv_dtype="fp8", index_dtype="fp4", hca_state="raw"),
                       wl.context_p95)
    hbm = (weights + b * kv) / (acc.hbm_bytes_per_s * MBU)
    exchange = cfg.num_hidden_layers * rows_per_b * b * cfg.hidden_size * 2 / acc.interconnect_bytes_per_s
    assert p.decode_step_ms == pytest.approx((hbm + exchange) * 1000, abs=1e-3)  # the plan rounds to 1 us


def test_replicated_weights_do_not_divide_over_the_group() -> None:
    # Flash over 2 GPUs of 82 GiB (79.2 GB usable): half the served weights (78.0 GB) would fit, but every rank
    # also holds the replicated K=V head, compressors, indexer, norms and router (78.7 GB per rank) + the reserve
    cfg = flash()
    one = W.weight_bytes_per_gpu(cfg, 1)
    assert one / 2 < W.weight_bytes_per_gpu(cfg, 2) < one / 2 + 3e9
    s = DSV4EndpointSpec.model_validate({"model": {"variant": "flash", "weights": {"hostPath": {"path": "/m"}}},
                                         "profile": {"name": "short-chat"},
                                         "accelerator": {"type": "custom", "memoryGiB": 82, "gpusPerNode": 2}})
    with pytest.raises(PlanError) as err:
        plan(s)
    assert err.value.reason == "WeightsDoNotFit"
    assert "at least 4 x custom" in err.value.message  # the smallest group whose per-GPU weights fit
