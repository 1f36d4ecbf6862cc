"""The capacity planner: model shapes x accelerator x workload profile -> runtime settings, each with a reason.

Pure functions; `plan(spec)` is what the operator, `dsv4 plan -f endpoint.yaml` and the tests call.

Per GPU of a TP group of size t (layout tp; one pod per replica, the group's GPUs in that pod):

    usable      = memory * GPU_MEMORY_UTILIZATION
    weights/GPU = weight_bytes_per_gpu(quantization, t)     (what one rank holds after loading: the split
                  tensors / t — query heads, output projections, experts, vocab rows — plus the replicated
                  ones whole: K=V head, compressors, indexer, norms, mHC, router, MTP block)
    reserve     = 2 GiB (256 MiB on cpu) + max_num_batched_tokens * hidden * 2 B * 24 + max_num_seqs * vocab * 4 B
    cache       = usable - weights/GPU - reserve

The KV cache is *not* sharded by TP: DeepSeek-V4 has one shared K=V head, so every rank of the
group holds every request's rows (as MLA engines do); a replica holds `cache` bytes of KV, and a
larger group only helps by freeing weight memory per GPU.

Data-parallel attention with expert parallelism (layout dp-ep, `dsv4 serve --dp d --tp t --ep`): d >= 2 ranks,
each a TP group of t GPUs (t = 1: one GPU per rank) with its own requests, scheduler and KV cache (the full per-GPU
budget, sized by the same `capacity()` call as a TP t replica); the routed experts split over all d*t GPUs
(E/(d*t) each); query heads, output projections, shared expert, embed and head split over the rank's t GPUs; the
rest whole on every GPU. Per GPU:

    weights/GPU    = weight_bytes_per_gpu_dp_tp(quantization, d, t)
                   = routed / (d*t) + tp_split / t + whole                    (a TP group: d = 1)
    reserve        = as above + 2 * d * max_num_batched_tokens * hidden * 2 B  (the MoE's gathered input and its
                     output before the reduce-scatter: every rank's tokens)
    cache          = usable - weights/GPU - reserve
    sessions       = d * min(cache holds, ITL batch, max_num_seqs)           (the replica: d independent caches)

Latency estimates (documented, deliberately simple), for b sequences per scheduler (the TP group's, or one DP
rank's; a TP layout is d = 1):

    prefill rate   = d * t * fp8_flops * MFU / (2 * active_params)           tokens/s (d prefills side by side)
    decode step(b) = (decode_weight_bytes_dp_tp(d, t, b) + b * kv_read(p95)) / (hbm_bw * MBU)
                     + layers * exchange(d, t, b) * hidden * 2 B / interconnect
    decode_weight_bytes_dp_tp = (dense + routed / d * (1 - (1 - k/E)^(d*b))) / t
    exchange(d, t, b) = 2 (t-1)/t b                   attention output all-reduce in the TP group (ring)
                      + (d-1) b                       all-gather of the other ranks' tokens to this GPU's experts
                      + (d t - 1)/(d t) d b           reduce-scatter of the d*b tokens' partial expert (and shared
                                                      expert) outputs, each GPU getting b/t of its rank's tokens
                      + (t-1)/t b                     all-gather of those slices inside the TP group

rows of `hidden` bf16 values received per GPU per layer (every V4 layer is an MoE layer). d = 1 gives TP's two
all-reduces per layer, 4 (t-1)/t b; t = 1 gives DP+EP's 2 (d-1) b. decode_weight_bytes_dp_tp counts the expected
fraction of routed experts the d*b gathered tokens touch (k experts per token); kv_read is what one decode token
reads from the cache at the p95 context (all indexer keys, top-k CSA entries, all HCA entries, the window).
Collective latency is ignored, and the replicated tensors' reads are charged / t, which leans towards larger t.

Layout choice: TP sizes t the model splits into (`ownership.check_tp`: heads, routed experts, expert width,
vocab, o_groups) and DP sizes d >= 2 with d*t dividing the routed experts, d*t <= gpusPerNode; those where the
weights fit, the longest context is servable and one decode step meets the ITL target; the one holding the most
sessions per GPU wins (ties: fewer GPUs per replica, then the faster decode step). Sessions are compared under the
recompute policy (the most any policy holds) so the later, reuse-driven policy choice does not bias the layout.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dsv4.operator import weights as W
from dsv4.operator.api import DSV4EndpointSpec, Layout, PlanStatus
from dsv4.operator.capacity import Capacity, capacity
from dsv4.operator.hardware import MBU, MFU, Accelerator, accelerator
from dsv4.operator.profiles import Workload, resolve
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import CSA, HCA, ConfigError, ModelConfig, preset
from dsv4.runtime.parallel.ownership import TPConfigError, check_tp

from dsv4.settings_enums import CACHE_POLICIES, HCA_STATES, CachePolicy, HcaState, ProfileName

GPU_MEMORY_UTILIZATION = 0.90
MAX_NUM_SEQS = 256
ACTIVATION_FACTOR = 24
REUSE_FOR_PREFIX_CACHE = 0.2
_GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64)  # TP sizes the planner considers
MAX_GROUP = _GROUP_SIZES[-1]
MIN_CHUNK, MAX_CHUNK = 256, 16384
EXCHANGE_BYTES = 2  # bf16 hidden states in the DP+EP token exchange


class PlanError(ValueError):
    """An endpoint that cannot be served as specified. `reason` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Parallelism:
    """How one replica uses its GPUs: one tensor-parallel group of `tp` ranks sharing one KV cache (layout tp,
    dp = 1), or `dp` >= 2 data-parallel attention ranks, each a TP group of `tp` GPUs with its own KV cache, the
    routed experts split over all dp x tp GPUs (layout dp-ep)."""

    layout: Layout
    dp: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.dp < 1 or (self.layout == "tp") != (self.dp == 1):
            raise ValueError(f"Parallelism({self.layout!r}, dp={self.dp}, tp={self.tp}): layout tp has dp 1, "
                             "layout dp-ep has dp >= 2, tp >= 1")

    @classmethod
    def tensor(cls, tp: int) -> Parallelism:
        return cls("tp", 1, tp)

    @classmethod
    def data(cls, dp: int, tp: int = 1) -> Parallelism:
        return cls("dp-ep", dp, tp)

    @property
    def size(self) -> int:
        """GPUs per replica."""
        return self.dp * self.tp

    @property
    def label(self) -> str:
        if self.layout == "tp":
            return f"TP{self.tp}"
        return f"DP{self.dp}+EP" if self.tp == 1 else f"DP{self.dp}xTP{self.tp}+EP"


@dataclass(frozen=True)
class Plan:
    model: str
    accelerator: str
    profile: ProfileName | Literal["custom"]
    layout: Layout
    tensor_parallel_size: int
    data_parallel_size: int
    batching_delay_ms: float
    max_num_batched_tokens: int
    chunked_prefill_size: int
    max_num_seqs: int
    cache_policy: CachePolicy
    hca_state: HcaState
    expected_context: int
    kv_dtype: str
    pool_split: dict[str, float]
    num_blocks: dict[str, int]
    cache_bytes_per_gpu: int
    max_servable_context: int
    max_model_len: int
    sessions_per_replica: int
    initial_replicas: int
    weight_bytes: int
    weight_bytes_per_gpu: int
    decode_step_ms: float
    prefill_tokens_per_s: float
    reasons: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    @property
    def context_length_range(self) -> str:
        return f"0-{self.max_model_len}"

    @property
    def parallelism(self) -> Parallelism:
        return Parallelism(self.layout, self.data_parallel_size, self.tensor_parallel_size)

    @property
    def gpus_per_replica(self) -> int:
        return self.parallelism.size

    def to_status(self) -> PlanStatus:
        return PlanStatus(
            layout=self.layout, parallelism=self.parallelism.label, tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_size=self.data_parallel_size, batching_delay_ms=self.batching_delay_ms,
            max_num_batched_tokens=self.max_num_batched_tokens, chunked_prefill_size=self.chunked_prefill_size,
            cache_policy=self.cache_policy, hca_state=self.hca_state,
            pool_split={k: round(v, 4) for k, v in self.pool_split.items()},
            cache_bytes_per_gpu=self.cache_bytes_per_gpu, max_servable_context=self.max_servable_context,
            max_model_len=self.max_model_len,
            sessions_per_replica=self.sessions_per_replica, initial_replicas=self.initial_replicas,
            weight_bytes=self.weight_bytes, context_length_range=self.context_length_range, reasons=dict(self.reasons))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["context_length_range"] = self.context_length_range
        d["parallelism"] = self.parallelism.label
        return d


# ---------------------------------------------------------------------------------------------
def model_config(spec: DSV4EndpointSpec) -> ModelConfig:
    m = spec.model
    try:
        return ModelConfig.from_dict(m.config or {}) if m.variant == "custom" else preset(m.variant)
    except ConfigError as e:
        raise PlanError("InvalidModelConfig", f"model.config: {e}") from e


def kv_read_bytes(cfg: ModelConfig, cache: CacheSpec, context: int) -> int:
    """Cache bytes one decode token reads at `context`: every indexer key, top-k CSA entries,
    every HCA entry and the sliding window, over all layers."""
    p = cache.pools
    n_csa, n_hca = len(cfg.layers_of(CSA)), len(cfg.layers_of(HCA))
    csa_entries = context // cache.csa_ratio
    total = cache.window * p["swa"].bytes_per_row * cfg.num_hidden_layers
    if "idx" in p:
        total += csa_entries * p["idx"].bytes_per_row * n_csa
    if "csa" in p:
        total += min(cfg.index_topk, csa_entries) * p["csa"].bytes_per_row * n_csa
    if "hca" in p:
        total += (context // cache.hca_ratio) * p["hca"].bytes_per_row * n_hca
    return int(total)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


@dataclass(frozen=True)
class _Rejected:
    """Why a layout does not work: in words, as one short figure, and the kind of limit."""

    why: str
    short: str
    kind: Literal["weights", "latency", "context", "sessions"]

    def __str__(self) -> str:
        return self.why


_DETAIL_CHARS = 600  # longest list of rejections a PlanError gives in full


@dataclass(frozen=True)
class _Candidate:
    par: Parallelism
    weights_per_gpu: int
    cache_bytes: int
    cap: Capacity
    policy: CachePolicy
    policy_reason: str
    chunk: int
    mnbt: int
    prefill_rate: float
    itl_batch: int
    step_ms: float
    sessions_per_rank: int  # one scheduler's (a TP group's or a DP rank's) sessions
    sessions: int  # the replica's: dp x sessions_per_rank
    max_context: int
    rank: int  # the replica's sessions under the recompute policy (the most it can hold): compares layouts fairly
    hca_state: HcaState = "raw"
    hca_state_reason: str = ""


def hca_state_choice(override: str | None, choose: Callable[[str], tuple[str, str, Capacity]], need_ctx: int,
                     batch_limit: int) -> tuple[str, str, tuple[str, str, Capacity]]:
    """raw or online HCA compressor state (same outputs, docs/cache.md), with the cache choice `choose(state)`
    gives for it. Online keeps one 6 KiB slot per HCA layer and running request instead of up to 127 raw rows
    (512 KiB), so it holds more sessions and longer requests; raw keeps the fused Triton compressor step on
    CUDA. Online is chosen only when the cache, not the ITL batch or max_num_seqs (`batch_limit`), bounds what
    raw holds and online holds more; it is sized only then."""
    if override:
        return override, "set by overrides.hcaState", choose(override)
    raw_choice = choose("raw")
    raw = raw_choice[2]
    raw_fits = raw.max_request_tokens >= need_ctx
    if raw_fits and raw.sessions >= batch_limit:
        return "raw", (f"the cache holds {raw.sessions} sessions with the raw tail, at least the {batch_limit} "
                       "the batch allows: raw keeps the fused compressor kernel"), raw_choice
    online_choice = choose("online")
    online = online_choice[2]
    online_fits = online.max_request_tokens >= need_ctx
    if (online_fits and not raw_fits) or (online_fits == raw_fits and online.sessions > raw.sessions):
        return "online", (f"one online-softmax slot per HCA layer instead of the raw tail: {online.sessions} "
                          f"sessions (raw {raw.sessions}), longest request {online.max_request_tokens} "
                          f"(raw {raw.max_request_tokens})"), online_choice
    return "raw", (f"the online state holds no more ({online.sessions} vs {raw.sessions} sessions): raw keeps "
                   "the fused compressor kernel"), raw_choice


def exchange_bytes_per_layer(par: Parallelism, batch: int, hidden: int) -> float:
    """Bytes one GPU receives per layer in a decode step of `batch` sequences per DP rank (module docstring):
    the TP group's attention all-reduce, the MoE's all-gather of the other ranks' tokens, the reduce-scatter of
    the experts' partial outputs to their ranks, and the all-gather of the rank's tokens inside its TP group."""
    d, t, b = par.dp, par.tp, batch
    rows = (2 * (t - 1) / t * b              # all-reduce of the attention output inside the TP group (ring)
            + (d - 1) * b                    # all-gather: every other DP rank's b tokens, to this GPU's experts
            + (d * t - 1) / (d * t) * d * b  # reduce-scatter of the partial outputs of the d*b tokens (ring)
            + (t - 1) / t * b)               # all-gather of the rank's b tokens inside its TP group
    return rows * hidden * EXCHANGE_BYTES


def _decode_step_s(cfg: ModelConfig, quant: str, acc: Accelerator, par: Parallelism, batch: int,
                   kv_read: int) -> float:
    """One decode step of `batch` sequences per scheduler (the TP group's, or each DP rank's): module docstring."""
    hbm = acc.hbm_bytes_per_s * MBU
    weights = W.decode_weight_bytes_dp_tp(cfg, quant, par.dp, par.tp, batch)
    exchange = cfg.num_hidden_layers * exchange_bytes_per_layer(par, batch, cfg.hidden_size)
    return (weights + batch * kv_read) / hbm + exchange / acc.interconnect_bytes_per_s


def step_token_budget(chunk: int) -> int:
    """max_num_batched_tokens for a prefill chunk: the chunk + MAX_NUM_SEQS decode slots, rounded up to 256."""
    return int(math.ceil((chunk + MAX_NUM_SEQS) / 256) * 256)


@dataclass(frozen=True)
class GpuMemory:
    """One GPU of a layout: usable bytes, the rank's weights, the reserve and what is left for its KV cache (a
    TP group shares one cache; each DP rank has its own). `cache` <= 0: the layout does not fit."""

    usable: int
    weights: int
    reserve: int

    @property
    def cache(self) -> int:
        return self.usable - self.weights - self.reserve


def gpu_memory(cfg: ModelConfig, acc: Accelerator, par: Parallelism, quant: str, max_num_batched_tokens: int
               ) -> GpuMemory:
    """The per-GPU memory split of the module docstring (also `dsv4 bench capacity`'s layouts section)."""
    mnbt = max_num_batched_tokens
    reserve = acc.reserve_bytes + mnbt * cfg.hidden_size * 2 * ACTIVATION_FACTOR + MAX_NUM_SEQS * cfg.vocab_size * 4
    if par.dp > 1:
        reserve += 2 * par.dp * mnbt * cfg.hidden_size * EXCHANGE_BYTES
    weights = W.weight_bytes_per_gpu_dp_tp(cfg, par.dp, par.tp, quant)
    return GpuMemory(int(acc.memory_bytes * GPU_MEMORY_UTILIZATION), weights, int(reserve))


def _evaluate(spec: DSV4EndpointSpec, cfg: ModelConfig, caches: dict[str, CacheSpec], acc: Accelerator,
              wl: Workload, par: Parallelism) -> _Candidate | _Rejected:
    """A candidate layout, or why it does not work."""
    ov = spec.overrides
    quant = spec.model.quantization
    name = par.label
    per_gpu_rate = acc.fp8_flops * MFU / (2 * W.active_params_per_token(cfg))
    prefill_rate = par.size * per_gpu_rate  # a TP group splits each prefill; DP ranks prefill side by side
    # a prefill chunk shares a step with the decodes: keep it within half the ITL target (one scheduler's chunk:
    # a TP group's or one DP rank's)
    step_rate = par.tp * per_gpu_rate
    chunk = min(MAX_CHUNK, max(MIN_CHUNK, _pow2_floor(step_rate * wl.itl_target_ms / 1000 * 0.5)))
    mnbt = step_token_budget(chunk)
    if ov and ov.max_num_batched_tokens:
        mnbt = ov.max_num_batched_tokens
        chunk = min(chunk, mnbt)
    mem = gpu_memory(cfg, acc, par, quant, mnbt)
    per_gpu, cache_bytes = mem.weights, mem.cache
    if cache_bytes <= 0:
        return _Rejected(f"{name}: weights {per_gpu / 1e9:.1f} GB/GPU + reserve {mem.reserve / 1e9:.1f} GB exceed "
                         f"{mem.usable / 1e9:.1f} GB usable",
                         f"{name} {(per_gpu + mem.reserve) / 1e9:.1f}", "weights")
    limit = cfg.max_position_embeddings
    if ov and ov.max_model_len:
        limit = min(limit, ov.max_model_len)
    expected = min(limit, wl.context_p95 + wl.output_tokens)
    kv_read = kv_read_bytes(cfg, caches["raw"], wl.context_p95)
    step1 = _decode_step_s(cfg, quant, acc, par, 1, kv_read)
    if step1 * 1000 > wl.itl_target_ms:
        return _Rejected(f"{name}: one decode step takes ~{step1 * 1000:.1f} ms > ITL target {wl.itl_target_ms} ms",
                         f"{name} {step1 * 1000:.1f}", "latency")
    itl_batch = 1
    for b in range(2, MAX_NUM_SEQS + 1):
        if _decode_step_s(cfg, quant, acc, par, b, kv_read) * 1000 > wl.itl_target_ms:
            break
        itl_batch = b
    def cap_for(policy: str, state: str) -> Capacity:
        return capacity(caches[state], cache_bytes, expected_context=expected, policy=policy,
                        max_context_limit=limit, prefill_chunk=chunk)

    need_ctx = min(ov.max_model_len, wl.context_max) if ov and ov.max_model_len else wl.context_max
    want = min(wl.concurrency, itl_batch)

    def choose_policy(state: str) -> tuple[str, str, Capacity]:
        if ov and ov.cache_policy:
            return ov.cache_policy, "set by overrides.cachePolicy", cap_for(ov.cache_policy, state)
        if wl.prefix_reuse_ratio < REUSE_FOR_PREFIX_CACHE:
            return "recompute", (f"prefix reuse {wl.prefix_reuse_ratio:.0%} < {REUSE_FOR_PREFIX_CACHE:.0%}: keep "
                                 "only the live window, recompute it on the rare hit"), cap_for("recompute", state)
        # most reuse first: full (every window row kept), checkpoint (a window every 4 blocks), recompute
        caps = {p: cap_for(p, state) for p in CACHE_POLICIES}
        fits = [p for p, c in caps.items() if c.max_request_tokens >= need_ctx]
        enough = [p for p in fits if caps[p].sessions >= want]
        if enough:
            policy = enough[0]
        elif fits:
            policy = max(fits, key=lambda p: caps[p].sessions)
        else:
            policy = "recompute"
        tried = ", ".join(f"{p}: {c.sessions} sessions, max {c.max_request_tokens}" for p, c in caps.items())
        return policy, (f"prefix reuse {wl.prefix_reuse_ratio:.0%}: {policy} keeps the most reusable state that "
                        f"still holds {want} sessions of {expected} tokens and a {need_ctx}-token request ({tried})"
                        ), caps[policy]

    state, state_why, (policy, why, cap) = hca_state_choice(
        ov.hca_state if ov else None, choose_policy, need_ctx, min(itl_batch, MAX_NUM_SEQS))
    max_context = min(cap.max_request_tokens, limit)
    if max_context < need_ctx:
        return _Rejected(f"{name}: the longest servable context is {max_context} tokens < the profile's contextMax "
                         f"{wl.context_max} ({cache_bytes / 1e9:.1f} GB of cache per GPU)",
                         f"{name} {max_context}", "context")
    sessions = max(0, min(cap.sessions, itl_batch, MAX_NUM_SEQS))
    if sessions < 1:
        return _Rejected(f"{name}: not one session of {expected} tokens fits in {cache_bytes / 1e9:.1f} GB of cache",
                         f"{name}: no session fits", "sessions")
    step_ms = _decode_step_s(cfg, quant, acc, par, sessions, kv_read) * 1000
    rank_cap = cap if policy == "recompute" else cap_for("recompute", state)
    rank = par.dp * max(0, min(rank_cap.sessions, itl_batch, MAX_NUM_SEQS))
    return _Candidate(par, per_gpu, cache_bytes, cap, policy, why, chunk, mnbt, prefill_rate, itl_batch, step_ms,
                      sessions, par.dp * sessions, max_context, rank, state, state_why)


def _tp_splits(cfg: ModelConfig, tp: int) -> bool:
    try:
        check_tp(cfg, tp)
    except TPConfigError:
        return False
    return True


def _tp_options(cfg: ModelConfig, gpus_per_node: int) -> list[Parallelism]:
    return [Parallelism.tensor(t) for t in _GROUP_SIZES if t <= gpus_per_node and _tp_splits(cfg, t)]


def _dp_options(cfg: ModelConfig, gpus_per_node: int, tp: int | None = None) -> list[Parallelism]:
    """DP d x TP t + EP with d >= 2, d*t <= gpus_per_node, t a TP size the model splits into (`check_tp`) and d*t
    dividing the routed experts (each GPU owns E/(d*t)); t fixed when given."""
    sizes = [tp] if tp else [t for t in _GROUP_SIZES if _tp_splits(cfg, t)]
    return [Parallelism.data(d, t) for t in sizes for d in range(2, gpus_per_node // t + 1)
            if cfg.n_routed_experts % (d * t) == 0]


def _options(cfg: ModelConfig, spec: DSV4EndpointSpec) -> list[Parallelism]:
    """The layouts to evaluate: every TP and DP x TP + EP size that fits the node, or what the overrides fix.
    overrides.tensorParallelSize alone fixes a TP layout; with layout dp-ep it fixes the TP size inside each DP
    rank; overrides.dataParallelSize fixes the DP ranks (TP inside: tensorParallelSize, default 1)."""
    ov = spec.overrides
    gpn = spec.accelerator.gpus_per_node
    tp = ov.tensor_parallel_size if ov else None
    if tp:
        try:
            check_tp(cfg, tp)
        except TPConfigError as e:
            raise PlanError("InvalidTensorParallel", f"overrides.tensorParallelSize={tp}: {e}") from e
        if tp > gpn:
            raise PlanError("InvalidTensorParallel",
                            f"overrides.tensorParallelSize={tp} exceeds accelerator.gpusPerNode={gpn}")
    if ov and ov.data_parallel_size:
        dp, inner = ov.data_parallel_size, tp or 1
        if cfg.n_routed_experts % (dp * inner):
            raise PlanError("InvalidDataParallel",
                            f"overrides.dataParallelSize={dp} x tensorParallelSize={inner} must divide "
                            f"n_routed_experts ({cfg.n_routed_experts}): each GPU owns E/{dp * inner} experts")
        if dp * inner > gpn:
            raise PlanError("InvalidDataParallel", f"overrides.dataParallelSize={dp} x tensorParallelSize={inner} "
                                                   f"exceeds accelerator.gpusPerNode={gpn} (one pod per replica)")
        return [Parallelism.data(dp, inner)]
    if ov and ov.layout == "dp-ep":
        options = _dp_options(cfg, gpn, tp)
        if not options:
            raise PlanError("InvalidDataParallel",
                            f"layout dp-ep with tensorParallelSize={tp}: no data-parallel size d >= 2 with d x {tp} "
                            f"<= accelerator.gpusPerNode={gpn} dividing n_routed_experts ({cfg.n_routed_experts})")
        return options
    if tp:
        return [Parallelism.tensor(tp)]
    if ov and ov.layout == "tp":
        return _tp_options(cfg, gpn)
    return _tp_options(cfg, gpn) + _dp_options(cfg, gpn)


def _per_gpu(c: _Candidate) -> float:
    return c.rank / c.par.size


def _best(good: list[_Candidate]) -> _Candidate:
    """Most sessions per GPU; ties: fewer GPUs per replica, then the faster decode step (less exchanged)."""
    return max(good, key=lambda c: (_per_gpu(c), -c.par.size, -c.step_ms))


def _gpus_needed(cfg: ModelConfig, quant: str, usable: float) -> int | None:
    """The smallest group size whose per-GPU weights fit in `usable` bytes (None: none up to MAX_GROUP does, the
    replicated weights alone are too large)."""
    return next((t for t in _GROUP_SIZES if W.weight_bytes_per_gpu(cfg, t, quant) <= usable), None)


_PLAN_CACHE: OrderedDict[str, Plan | PlanError] = OrderedDict()
_PLAN_CACHE_SIZE = 256


def plan_cached(spec: DSV4EndpointSpec) -> Plan:
    """`plan(spec)` memoised on the spec's JSON (plans are pure). The operator re-plans on every timer
    tick; sizing a large budget for a small model (the tiny model on an H200: millions of blocks) takes
    tens of seconds, which must not block every tick. Errors are memoised and re-raised too."""
    if spec.autoscaling and spec.autoscaling.enabled:  # spec.replicas mirrors the autoscaler: not a plan input
        spec = spec.model_copy(update={"replicas": None})
    key = spec.model_dump_json()
    hit = _PLAN_CACHE.get(key)
    if hit is None:
        try:
            hit = plan(spec)
        except PlanError as e:
            hit = e
        _PLAN_CACHE[key] = hit
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    if isinstance(hit, PlanError):
        raise PlanError(hit.reason, hit.message)  # a fresh object: re-raising one instance grows its traceback
    return hit


def plan(spec: DSV4EndpointSpec) -> Plan:
    """Plan an endpoint; raises PlanError (with a condition reason) when it cannot be served."""
    cfg = model_config(spec)
    wl = resolve(spec.profile)
    acc = accelerator(spec.accelerator.type, spec.accelerator.memory_gi_b)
    quant = spec.model.quantization
    caches = {s: CacheSpec.from_model(cfg, kv_dtype=spec.model.kv_dtype, hca_state=s,
                                      index_dtype="fp4" if spec.model.kv_dtype == "fp8" else None)
              for s in HCA_STATES}
    wbytes = W.weight_bytes(cfg, quant)
    ov = spec.overrides
    options = _options(cfg, spec)
    if wl.context_max > cfg.max_position_embeddings and not (ov and ov.max_model_len):
        raise PlanError("ContextDoesNotFit",
                        f"the profile's contextMax ({wl.context_max}) exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings}); lower it or set overrides.maxModelLen")
    results = {par: _evaluate(spec, cfg, caches, acc, wl, par) for par in options}
    good = [c for c in results.values() if isinstance(c, _Candidate)]
    if not good:
        raise _infeasible(spec, cfg, acc, wl, wbytes, results)
    return _finish(spec, cfg, acc, wl, wbytes, _best(good), results)


def _infeasible(spec: DSV4EndpointSpec, cfg: ModelConfig, acc: Accelerator, wl: Workload, wbytes: int,
                results: dict[Parallelism, _Candidate | _Rejected]) -> PlanError:
    name = f"V4-{spec.model.variant.capitalize()}" if spec.model.variant in ("flash", "pro") else spec.model.variant
    usable = acc.memory_bytes * GPU_MEMORY_UTILIZATION - acc.reserve_bytes
    need = _gpus_needed(cfg, spec.model.quantization, usable)
    at_least = f"at least {need}" if need else f"more than {MAX_GROUP}"
    tp_max = max(par.size for par in results)
    failed = [r for r in results.values() if isinstance(r, _Rejected)]
    usable_gb = acc.memory_bytes * GPU_MEMORY_UTILIZATION / 1e9
    if all(r.kind == "weights" for r in failed):
        return PlanError(
            "WeightsDoNotFit",
            f"{name} {spec.model.quantization} weights ({wbytes / 1e9:.0f} GB) need more GPUs per replica than given: "
            f"{at_least} x {acc.name} ({acc.memory_bytes / 1e9:.0f} GB each, {GPU_MEMORY_UTILIZATION:.0%} usable) "
            f"but one replica is one pod of at most {tp_max} GPUs (accelerator.gpusPerNode="
            f"{spec.accelerator.gpus_per_node}, overrides.tensorParallelSize="
            f"{spec.overrides.tensor_parallel_size if spec.overrides else None}); "
            + _rejections(failed, f"weights + reserve per GPU (GB; {usable_gb:.1f} usable)"))
    if any(r.kind == "latency" for r in failed) and not any(r.kind == "context" for r in failed):
        return PlanError("LatencyTargetUnreachable",
                         f"no layout meets the ITL target {wl.itl_target_ms} ms on {acc.name}: "
                         + _rejections(failed, "decode step of one sequence (ms)"))
    return PlanError("ContextDoesNotFit",
                     f"profile context up to {wl.context_max} tokens cannot be served by {name} on {acc.name}: "
                     + _rejections(failed, "longest servable context (tokens)"))


def _rejections(failed: list[_Rejected], measure: str) -> str:
    """Why each layout failed: in full when that stays short, else one figure per layout (a condition message is
    cut at 1024 characters)."""
    full = "; ".join(r.why for r in failed)
    if len(full) <= _DETAIL_CHARS:
        return full
    return f"{measure}: " + ", ".join(r.short for r in failed)


def _describe(c: _Candidate) -> str:
    """One layout's capacity in words, for the layout reason."""
    gb = 1e9
    if c.par.layout == "tp":
        what = f"one cache of {c.sessions} sessions"
    else:
        what = f"{c.par.dp} caches of {c.sessions_per_rank} sessions = {c.sessions}"
    return (f"{c.par.label}: {what} ({c.cache_bytes / gb:.1f} GB cache/GPU after {c.weights_per_gpu / gb:.1f} GB of "
            f"weights/GPU, decode step ~{c.step_ms:.1f} ms) on {c.par.size} GPUs, {_per_gpu(c):.1f}/GPU")


def _layout_reasons(spec: DSV4EndpointSpec, wbytes: int, c: _Candidate,
                    results: dict[Parallelism, _Candidate | _Rejected]) -> dict[str, str]:
    ov = spec.overrides
    reasons: dict[str, str] = {}
    others = ", ".join(f"{par.label}: {_per_gpu(r):.1f}" if isinstance(r, _Candidate) else f"{par.label}: no"
                       for par, r in results.items())
    fixed = [f"overrides.{k}" for k, v in (("dataParallelSize", ov and ov.data_parallel_size),
                                           ("tensorParallelSize", ov and ov.tensor_parallel_size),
                                           ("layout", ov and ov.layout)) if v]
    forced = f"set by {' and '.join(fixed)}" if fixed else None
    if forced:
        reasons["layout"] = f"{forced}: {_describe(c)}"
    else:
        # the best candidate of the other layout, or why none of it works
        other = "dp-ep" if c.par.layout == "tp" else "tp"
        rivals = [r for par, r in results.items() if par.layout == other and isinstance(r, _Candidate)]
        if rivals:
            rival = _describe(_best(rivals))
        else:
            why = [str(r) for par, r in results.items() if par.layout == other]
            rival = "; ".join(why) if why else f"no {other} size fits accelerator.gpusPerNode"
        tied = [par.label for par, r in results.items()
                if isinstance(r, _Candidate) and par != c.par and _per_gpu(r) == _per_gpu(c)]
        tie = (f"; tied with {', '.join(tied)} at {_per_gpu(c):.1f}/GPU: the fewest GPUs per replica wins, then the "
               "faster decode step") if tied else ""
        reasons["layout"] = (f"{_describe(c)}; vs {rival} (sessions per GPU compared under the recompute policy)"
                             f"{tie}")
    if ov and ov.tensor_parallel_size:
        reasons["tensorParallelSize"] = f"set by overrides.tensorParallelSize ({c.cache_bytes / 1e9:.1f} GB cache/GPU)"
    elif c.par.layout == "dp-ep" and c.par.tp == 1:
        reasons["tensorParallelSize"] = "1: each data-parallel rank runs the whole attention (layout dp-ep)"
    elif c.par.layout == "dp-ep":
        reasons["tensorParallelSize"] = (
            f"{c.par.tp}: each of the {c.par.dp} data-parallel ranks is a TP{c.par.tp} group (query heads, output "
            f"projections, shared expert and vocab split over {c.par.tp} GPUs), {c.weights_per_gpu / 1e9:.1f} GB of "
            f"weights/GPU; sessions per GPU: {others}")
    else:
        reasons["tensorParallelSize"] = (
            f"{wbytes / 1e9:.0f} GB of {spec.model.quantization} weights; TP{c.par.tp} holds the most sessions per "
            f"GPU ({others})")
    if ov and ov.data_parallel_size:
        reasons["dataParallelSize"] = "set by overrides.dataParallelSize"
    elif c.par.layout == "dp-ep":
        reasons["dataParallelSize"] = (f"{c.par.label} holds the most sessions per GPU ({others}); each of the "
                                       f"{c.par.dp} ranks owns its requests and cache, each GPU 1/{c.par.size} of the "
                                       "routed experts")
    else:
        reasons["dataParallelSize"] = "1 (layout tp)"
    return reasons


def _finish(spec: DSV4EndpointSpec, cfg: ModelConfig, acc: Accelerator, wl: Workload, wbytes: int, c: _Candidate,
            results: dict[Parallelism, _Candidate | _Rejected]) -> Plan:
    ov = spec.overrides
    reasons = _layout_reasons(spec, wbytes, c, results)
    warnings: list[str] = []
    if ov and ov.batching_delay_ms is not None:
        delay, reasons["batchingDelayMs"] = ov.batching_delay_ms, "set by overrides.batchingDelayMs"
    else:
        delay = round(min(0.1 * wl.itl_target_ms, 0.01 * wl.ttft_target_ms, 20.0) * 2) / 2
        reasons["batchingDelayMs"] = (f"min(10% of ITL target {wl.itl_target_ms} ms, 1% of TTFT target "
                                      f"{wl.ttft_target_ms} ms, 20 ms): groups prefills without eating the budget")
    scheduler = (f"at TP{c.par.tp}" if c.par.layout == "tp" else
                 "per rank" if c.par.tp == 1 else f"per rank (TP{c.par.tp})")
    reasons["chunkedPrefillSize"] = (f"prefill ~{c.prefill_rate / c.par.dp:,.0f} tokens/s {scheduler}: a "
                                     f"{c.chunk}-token chunk stays within half the {wl.itl_target_ms} ms ITL target")
    reasons["maxNumBatchedTokens"] = ("set by overrides.maxNumBatchedTokens" if ov and ov.max_num_batched_tokens
                                      else f"one prefill chunk ({c.chunk}) + {MAX_NUM_SEQS} decode slots")
    reasons["cachePolicy"] = c.policy_reason
    reasons["hcaState"] = c.hca_state_reason
    reasons["poolSplit"] = (f"budget split by the bytes one {c.cap.expected_context}-token sequence needs per pool "
                            "(CacheManager.from_budget)")
    reasons["maxServableContext"] = (f"largest request whose blocks fit every pool of {c.cache_bytes / 1e9:.1f} GB "
                                     f"(profile needs {wl.context_max})")
    if ov and ov.max_model_len:
        max_model_len = min(ov.max_model_len, c.max_context)
        reasons["maxModelLen"] = "set by overrides.maxModelLen"
    else:
        max_model_len = min(c.max_context, wl.context_max)
        reasons["maxModelLen"] = (f"the profile's longest context ({wl.context_max}); longer requests get HTTP 400 "
                                  "and routers send them elsewhere (llm-d.ai/context-length-range)")
    limits = {"cache": c.cap.sessions, "ITL": c.itl_batch, "max_num_seqs": MAX_NUM_SEQS}
    bound = min(limits, key=lambda k: limits[k])
    ranks = f"{c.par.dp} ranks x " if c.par.dp > 1 else ""
    reasons["sessionsPerReplica"] = (f"{ranks}min(cache holds {c.cap.sessions} at p95+output, ITL {wl.itl_target_ms} "
                                     f"ms allows batch {c.itl_batch}, cap {MAX_NUM_SEQS}): bound by {bound}")
    a = spec.autoscaling
    wanted = max(1, math.ceil(wl.concurrency / c.sessions))
    if spec.replicas is not None and not (a and a.enabled):  # under autoscaling spec.replicas is an output
        replicas = spec.replicas
        reasons["initialReplicas"] = "set by spec.replicas"
    elif a and a.enabled:
        replicas = min(a.max_replicas, max(a.min_replicas, wanted))
        reasons["initialReplicas"] = (f"ceil(concurrency {wl.concurrency} / {c.sessions} sessions) = {wanted}, "
                                      f"clamped to [{a.min_replicas}, {a.max_replicas}]")
    else:
        replicas = wanted
        reasons["initialReplicas"] = f"ceil(concurrency {wl.concurrency} / {c.sessions} sessions per replica)"
    uncached = wl.context_p95 * (1 - wl.prefix_reuse_ratio)
    ttft_s = uncached / c.prefill_rate
    if ttft_s * 1000 > wl.ttft_target_ms:
        warnings.append(f"p95 prefill of {uncached:,.0f} uncached tokens takes ~{ttft_s:.1f} s > TTFT target "
                        f"{wl.ttft_target_ms} ms")
    return Plan(
        model=spec.model.variant, accelerator=acc.name, profile=wl.name, layout=c.par.layout,
        tensor_parallel_size=c.par.tp, data_parallel_size=c.par.dp,
        batching_delay_ms=float(delay), max_num_batched_tokens=c.mnbt, chunked_prefill_size=c.chunk,
        max_num_seqs=min(MAX_NUM_SEQS, max(c.sessions_per_rank, 1)), cache_policy=c.policy, hca_state=c.hca_state,
        expected_context=c.cap.expected_context, kv_dtype=spec.model.kv_dtype,
        pool_split=dict(c.cap.pool_split), num_blocks=dict(c.cap.num_blocks), cache_bytes_per_gpu=c.cache_bytes,
        max_servable_context=c.max_context, max_model_len=max_model_len, sessions_per_replica=c.sessions,
        initial_replicas=replicas,
        weight_bytes=wbytes, weight_bytes_per_gpu=c.weights_per_gpu, decode_step_ms=round(c.step_ms, 3),
        prefill_tokens_per_s=round(c.prefill_rate, 1),
        reasons=reasons, warnings=warnings)
