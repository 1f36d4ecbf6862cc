"""The single source of truth for every Prometheus metric dsv4 exports, runtime and operator alike (so it lives
in the top-level `dsv4` package, which both components import, not inside either).

Plain data: one `MetricSpec` per metric (name, type, labels, help text, buckets, enumerated label
values). The runtime's exporter (`dsv4 serve` `/metrics`), the operator's exporter, the Grafana
dashboards, the PrometheusRule alerts and `docs/metrics.md` are all built from this module, and tests
check that every PromQL expression shipped in the chart names only series listed here.

Naming rules
------------
- `MetricSpec.name` is the *exposed* family name as it appears in PromQL. Counters end in `_total`;
  pass `spec.client_name` (the name without `_total`) to `prometheus_client.Counter`, which appends
  `_total` itself. Histograms expose `<name>_bucket`, `<name>_sum`, `<name>_count`.
- Runtime metrics that routers, KEDA recipes and dashboards already know keep vLLM's names
  (prefix `vllm:`); the per-pool and scheduler metrics no other engine has use the prefix `dsv4_` (not
  `dsv4:`: Prometheus reserves colons for recording rules; see the changelog in docs/metrics.md).
  Operator metrics use the prefix `dsv4_operator_`.
- Runtime metrics carry `model_name` (and `engine`, always "0", as vLLM V1 does). The scrape adds
  `namespace` and `pod`; the PodMonitor/scrape config copies the pod label `dsv4.io/endpoint` into
  `dsv4_endpoint` (see `runtime_scrape_relabelings`). Operator metrics are scraped from the operator
  pod, so they name the endpoint in their own labels `dsv4_namespace` and `dsv4_endpoint` (a label
  called `namespace` would be renamed `exported_namespace` by the scrape).

No `prometheus_client` import at module level; `make_collectors` imports it lazily.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"
KINDS = (COUNTER, GAUGE, HISTOGRAM)

RUNTIME = "runtime"
OPERATOR = "operator"
COMPONENTS = (RUNTIME, OPERATOR)

# Cache pools (identical to dsv4.runtime.cache.pools.POOLS; a test keeps them equal).
POOLS = ("swa", "csa", "idx", "hca", "csa_state", "hca_state")
# Stages timed inside one engine step; "total" is the whole step (so its _count is the step rate).
STEP_PHASES = ("schedule", "forward", "sample", "total")
# Why the front end sent a request to a data-parallel rank (runtime/engine/dispatch.py).
DISPATCH_REASONS = ("prefix", "load")
# Why a request finished (vLLM's finished_reason values).
FINISHED_REASONS = ("stop", "length", "abort")
# Operator handlers and their outcomes.
HANDLERS = ("create", "update", "resume", "delete", "timer", "scale")
RESULTS = ("success", "retry", "error")
SCALE_DIRECTIONS = ("up", "down", "none")

# Label names shared by the chart, the operator (PodMonitor) and the e2e Prometheus config.
MODEL_LABEL = "model_name"
ENGINE_LABEL = "engine"
POOL_LABEL = "pool"
RANK_LABEL = "rank"  # data-parallel attention rank of the replica (`dsv4 serve --dp N --ep`; 0 when dp = 1)
NAMESPACE_LABEL = "namespace"  # added by the scrape (target label) on runtime series
POD_LABEL = "pod"  # added by the scrape (target label) on runtime series
ENDPOINT_LABEL = "dsv4_endpoint"  # runtime: relabelled from the pod label; operator: its own label
ENDPOINT_NAMESPACE_LABEL = "dsv4_namespace"  # operator series only
ENDPOINT_POD_LABEL_KEY = "dsv4.io/endpoint"  # Kubernetes label on every runtime pod = DSV4Endpoint name

# Series Prometheus itself creates for each scrape target (allowed in dashboards and alerts).
PROMETHEUS_BUILTIN_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped")

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# ---- buckets (seconds) -----------------------------------------------------------------------------
# vLLM V1's buckets where a vLLM metric exists, so existing dashboards' bucket choices still make sense.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
QUEUE_TIME_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 7680.0,
)  # fmt: skip
# Batching delay: 0 is its own bucket (requests that did not wait at all).
BATCHING_DELAY_BUCKETS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
STEP_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
RECONCILE_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family.

    `label_values` lists the allowed values of enumerated labels (others are free-form, e.g.
    `model_name`). `unit` is informational ("seconds", "bytes", "tokens", "ratio", "").
    """

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    component: str
    unit: str = ""
    buckets: tuple[float, ...] | None = None
    label_values: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"metric name {self.name!r} is not a valid Prometheus name")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} not in {KINDS}")
        if self.component not in COMPONENTS:
            raise ValueError(f"{self.name}: component {self.component!r} not in {COMPONENTS}")
        if (self.kind == COUNTER) != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters (and only counters) end in _total")
        if (self.kind == HISTOGRAM) != (self.buckets is not None):
            raise ValueError(f"{self.name}: histograms (and only histograms) have buckets")
        if self.buckets is not None and list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{self.name}: buckets must be strictly increasing")
        for label in self.labels:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"{self.name}: invalid label name {label!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.name}: duplicate label names")
        for label in self.label_values:
            if label not in self.labels:
                raise ValueError(f"{self.name}: label_values names unknown label {label!r}")
        if not self.help.strip():
            raise ValueError(f"{self.name}: help text is required")

    @property
    def client_name(self) -> str:
        """The name to pass to prometheus_client (counters without their `_total` suffix)."""
        return self.name[: -len("_total")] if self.kind == COUNTER else self.name

    @property
    def series(self) -> tuple[str, ...]:
        """Every series name this family exposes that PromQL may reference."""
        if self.kind == HISTOGRAM:
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


_VLLM = (MODEL_LABEL, ENGINE_LABEL)
_POOL = (MODEL_LABEL, ENGINE_LABEL, POOL_LABEL)
_RANK = (MODEL_LABEL, ENGINE_LABEL, RANK_LABEL)
_EP = (ENDPOINT_NAMESPACE_LABEL, ENDPOINT_LABEL)
_POOLS_ENUM = {POOL_LABEL: POOLS}


def _rt(name: str, kind: str, help: str, labels: tuple[str, ...] = _VLLM, **kw: Any) -> MetricSpec:
    return MetricSpec(name=name, kind=kind, help=help, labels=labels, component=RUNTIME, **kw)


def _op(name: str, kind: str, help: str, labels: tuple[str, ...] = _EP, **kw: Any) -> MetricSpec:
    return MetricSpec(name=name, kind=kind, help=help, labels=labels, component=OPERATOR, **kw)


RUNTIME_METRICS: tuple[MetricSpec, ...] = (
    # ---- vLLM-compatible scheduler state -----------------------------------------------------------
    _rt("vllm:num_requests_running", GAUGE, "Number of requests in the running batch (prefill or decode).",
        unit="requests"),
    _rt("vllm:num_requests_waiting", GAUGE, "Number of requests waiting in the admission queue.", unit="requests"),
    _rt("vllm:kv_cache_usage_perc", GAUGE,
        "KV-cache usage as a fraction 0-1: the occupancy of the fullest cache pool "
        "(max over dsv4_cache_pool_occupancy_ratio), so a router never under-reads pressure.", unit="ratio"),
    _rt("vllm:prefix_cache_queries_total", COUNTER, "Prompt tokens looked up in the prefix cache.",
        unit="tokens"),
    _rt("vllm:prefix_cache_hits_total", COUNTER, "Prompt tokens served from the prefix cache.", unit="tokens"),
    _rt("vllm:num_preemptions_total", COUNTER, "Requests preempted (freed and later recomputed) on cache pressure.",
        unit="requests"),
    _rt("vllm:prompt_tokens_total", COUNTER, "Prompt tokens processed (prefill, including prefix hits).",
        unit="tokens"),
    _rt("vllm:generation_tokens_total", COUNTER, "Tokens generated.", unit="tokens"),
    _rt("vllm:request_success_total", COUNTER, "Requests finished, by finish reason.",
        labels=(*_VLLM, "finished_reason"), unit="requests",
        label_values={"finished_reason": FINISHED_REASONS}),
    # ---- vLLM-compatible latency histograms --------------------------------------------------------
    _rt("vllm:time_to_first_token_seconds", HISTOGRAM, "Time from arrival to the first generated token.",
        unit="seconds", buckets=TTFT_BUCKETS),
    _rt("vllm:inter_token_latency_seconds", HISTOGRAM, "Time between consecutive generated tokens of a request.",
        unit="seconds", buckets=ITL_BUCKETS),
    _rt("vllm:e2e_request_latency_seconds", HISTOGRAM, "Time from arrival to the last token of a request.",
        unit="seconds", buckets=REQUEST_LATENCY_BUCKETS),
    _rt("vllm:request_queue_time_seconds", HISTOGRAM,
        "Time a request spent waiting before its first scheduled step.", unit="seconds",
        buckets=QUEUE_TIME_BUCKETS),
    _rt("vllm:cache_config_info", GAUGE,
        "Cache configuration; the value is always 1, the labels carry the configuration "
        "(block_size and num_gpu_blocks as read by routers; num_gpu_blocks = blocks of the csa pool, "
        "or of swa when there is no csa pool).",
        labels=(*_VLLM, "block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching",
                "swa_block_size", "cache_policy")),
    # ---- dsv4 extras -------------------------------------------------------------------------------
    _rt("dsv4_request_errors_total", COUNTER,
        "Requests answered with an HTTP error, by status code (400 cannot fit / invalid, 429 queue full, "
        "503 draining, 500 internal).", labels=(*_VLLM, "code"), unit="requests"),
    _rt("dsv4_cache_pool_occupancy_ratio", GAUGE, "Fraction 0-1 of the pool's blocks in use.",
        labels=_POOL, unit="ratio", label_values=_POOLS_ENUM),
    _rt("dsv4_cache_pool_used_bytes", GAUGE, "Bytes of the pool held by blocks in use.",
        labels=_POOL, unit="bytes", label_values=_POOLS_ENUM),
    _rt("dsv4_cache_pool_allocated_bytes", GAUGE, "Bytes allocated for the pool (its capacity).",
        labels=_POOL, unit="bytes", label_values=_POOLS_ENUM),
    _rt("dsv4_cache_pool_tokens_held", GAUGE,
        "Native token positions covered by the pool's blocks in use (running and cached-for-reuse).",
        labels=_POOL, unit="tokens", label_values=_POOLS_ENUM),
    _rt("dsv4_cache_pool_evictions_total", COUNTER, "Cached (unreferenced) blocks evicted from the pool.",
        labels=_POOL, unit="blocks", label_values=_POOLS_ENUM),
    _rt("dsv4_swa_checkpoints_kept", GAUGE,
        "Sliding-window/compressor-state checkpoints kept for prefix reuse (checkpoint policy).",
        unit="checkpoints"),
    _rt("dsv4_batching_delay_wait_seconds", HISTOGRAM,
        "How long prefill work actually waited for the batching delay before being scheduled.",
        unit="seconds", buckets=BATCHING_DELAY_BUCKETS),
    # ---- per data-parallel attention rank (dp = 1: rank 0 = the replica) -----------------------------------------
    _rt("dsv4_rank_requests_running", GAUGE, "Requests running on the data-parallel attention rank.",
        labels=_RANK, unit="requests"),
    _rt("dsv4_rank_requests_waiting", GAUGE, "Requests queued on the data-parallel attention rank.",
        labels=_RANK, unit="requests"),
    _rt("dsv4_rank_cache_pool_occupancy_ratio", GAUGE,
        "Fraction 0-1 of the rank's pool blocks in use (each rank has its own KV cache; the replica's "
        "dsv4_cache_pool_occupancy_ratio is the max over ranks).",
        labels=(*_RANK, POOL_LABEL), unit="ratio", label_values=_POOLS_ENUM),
    _rt("dsv4_rank_prefix_cache_hit_tokens_total", COUNTER,
        "Prompt tokens the rank served from its own prefix cache.", labels=_RANK, unit="tokens"),
    _rt("dsv4_rank_dispatched_requests_total", COUNTER,
        "Requests the front end assigned to the rank, by reason (prefix: the rank held the longest cached "
        "prefix of the prompt; load: the least-loaded rank). Only with dp > 1.",
        labels=(*_RANK, "reason"), unit="requests", label_values={"reason": DISPATCH_REASONS}),
    _rt("dsv4_step_duration_seconds", HISTOGRAM, "Engine step duration by phase (phase=\"total\" is the whole step).",
        labels=(*_VLLM, "phase"), unit="seconds", buckets=STEP_DURATION_BUCKETS,
        label_values={"phase": STEP_PHASES}),
)  # fmt: skip

OPERATOR_METRICS: tuple[MetricSpec, ...] = (
    _op("dsv4_operator_reconciles_total", COUNTER, "Handler invocations, by handler and result.",
        labels=("handler", "result"), label_values={"handler": HANDLERS, "result": RESULTS}),
    _op("dsv4_operator_reconcile_errors_total", COUNTER,
        "Handler failures, by handler and error class (Python exception type name).",
        labels=("handler", "error"), label_values={"handler": HANDLERS}),
    _op("dsv4_operator_reconcile_duration_seconds", HISTOGRAM, "Handler run time.",
        labels=("handler",), unit="seconds", buckets=RECONCILE_DURATION_BUCKETS,
        label_values={"handler": HANDLERS}),
    _op("dsv4_operator_endpoints", GAUGE, "DSV4Endpoints the operator currently manages.", labels=()),
    _op("dsv4_operator_endpoint_desired_replicas", GAUGE, "Replicas the operator wants (autoscaler output).",
        unit="replicas"),
    _op("dsv4_operator_endpoint_current_replicas", GAUGE, "Replicas of the endpoint's Deployment (status).",
        unit="replicas"),
    _op("dsv4_operator_endpoint_ready_replicas", GAUGE, "Ready replicas of the endpoint's Deployment.",
        unit="replicas"),
    _op("dsv4_operator_endpoint_min_replicas", GAUGE, "Autoscaling lower bound (spec).", unit="replicas"),
    _op("dsv4_operator_endpoint_max_replicas", GAUGE, "Autoscaling upper bound (spec).", unit="replicas"),
    _op("dsv4_operator_endpoint_ready", GAUGE, "1 when the endpoint's Ready condition is True, else 0."),
    _op("dsv4_operator_scaling_decisions_total", COUNTER,
        "Autoscaler decisions, by direction and reason (a short fixed token such as queue, pool_csa, idle).",
        labels=(*_EP, "direction", "reason"), label_values={"direction": SCALE_DIRECTIONS}),
    _op("dsv4_operator_autoscaler_panic_mode", GAUGE, "1 while the autoscaler is in panic mode, else 0."),
    _op("dsv4_operator_autoscaler_signal", GAUGE,
        "Observed autoscaling signal averaged over ready pods (signal = queue_depth, running, or pool_<name>).",
        labels=(*_EP, "signal")),
    _op("dsv4_operator_autoscaler_target", GAUGE, "Per-pod target of each autoscaling signal.",
        labels=(*_EP, "signal")),
    _op("dsv4_operator_pod_scrape_errors_total", COUNTER, "Failed reads of a runtime pod's /metrics."),
)  # fmt: skip

METRICS: tuple[MetricSpec, ...] = RUNTIME_METRICS + OPERATOR_METRICS
BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}
if len(BY_NAME) != len(METRICS):  # pragma: no cover - guarded by tests too
    raise RuntimeError("duplicate metric names in the catalog")


def get(name: str) -> MetricSpec:
    """The spec of metric `name` (the exposed family name); KeyError names the unknown metric."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not in dsv4.metrics_catalog") from None


def of_component(component: str) -> tuple[MetricSpec, ...]:
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r} not in {COMPONENTS}")
    return RUNTIME_METRICS if component == RUNTIME else OPERATOR_METRICS


def series_index() -> dict[str, MetricSpec | None]:
    """Every series name PromQL may reference -> its family (None for Prometheus' own series)."""
    out: dict[str, MetricSpec | None] = {s: None for s in PROMETHEUS_BUILTIN_SERIES}
    for m in METRICS:
        for s in m.series:
            out[s] = m
    return out


def family_of_series(series: str) -> MetricSpec | None:
    """The family a series name belongs to, or None when it is not a catalogued series."""
    return series_index().get(series)


def make_collectors(
    component: str,
    registry: Any = None,
    constant_labels: dict[str, str] | None = None,
    init_enumerated: bool = True,
) -> dict:
    """prometheus_client collectors for one component, keyed by `MetricSpec.name`.

    `registry` defaults to a fresh `CollectorRegistry` (never the global one, so tests can build
    many). The returned dict also holds the registry under the key `"__registry__"`.
    `constant_labels` fills labels with a fixed value (e.g. {"model_name": "tiny", "engine": "0"}):
    those labels are bound at creation and removed from the family's label names.
    `init_enumerated`: when every remaining label of a family is enumerated (pool, phase,
    finished_reason), create each child at 0 so the series exist before the first event.
    """
    import prometheus_client as pc  # lazy: keep the catalog importable without prometheus_client

    registry = registry if registry is not None else pc.CollectorRegistry()
    const = dict(constant_labels or {})
    out: dict[str, Any] = {"__registry__": registry}
    for m in of_component(component):
        names = [lb for lb in m.labels if lb not in const]
        bound = {lb: const[lb] for lb in m.labels if lb in const}
        kwargs: dict[str, Any] = {"registry": registry}
        if m.kind == COUNTER:
            cls = pc.Counter
        elif m.kind == GAUGE:
            cls = pc.Gauge
        else:
            cls = pc.Histogram
            kwargs["buckets"] = m.buckets
        # prometheus_client binds constant labels through `labels()` on the parent; emulate it by
        # declaring every label and pre-binding the constant ones via a tiny wrapper.
        collector = cls(m.client_name, m.help, labelnames=list(m.labels), **kwargs)
        out[m.name] = _Bound(collector, bound, names) if bound else collector
        if m.labels and not names:
            collector.labels(**bound)  # fully bound: the series exists (at 0) from start-up
        elif init_enumerated and names and all(lb in m.label_values for lb in names):
            for combo in itertools.product(*(m.label_values[lb] for lb in names)):
                collector.labels(**bound, **dict(zip(names, combo, strict=True)))
    return out


class _Bound:
    """A collector whose constant labels are already filled in: `.labels(**rest)` or, with no
    remaining labels, `.inc()/.set()/.observe()` directly."""

    def __init__(self, collector: Any, bound: dict[str, str], free: list[str]) -> None:
        self._collector, self._bound, self._free = collector, bound, free
        # children looked up once each (not per .inc()/.observe() on the hot path); () is a fully bound one's
        self._children: dict[tuple[tuple[str, str], ...], Any] = {} if free else {(): collector.labels(**bound)}

    def labels(self, *args: str, **kwargs: str) -> Any:
        if args:
            kwargs = {**dict(zip(self._free, args, strict=True)), **kwargs}
        key = tuple(kwargs.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._collector.labels(**self._bound, **kwargs)
        return child

    def __getattr__(self, item: str) -> Any:
        if self._free:
            raise AttributeError(f"{item}: call .labels({', '.join(self._free)}) first")
        return getattr(self._children[()], item)


def runtime_scrape_relabelings(style: str = "prometheus") -> list[dict[str, Any]]:
    """Relabel rules that give runtime series the labels dashboards filter on.

    style="prometheus": `relabel_configs` for a plain Prometheus `kubernetes_sd_configs: [{role: pod}]`
    job (namespace, pod, dsv4_endpoint). style="operator": `relabelings` for a prometheus-operator
    PodMonitor/ServiceMonitor (namespace and pod are added by it already).
    """
    meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", ENDPOINT_POD_LABEL_KEY)
    if style == "prometheus":
        return [
            {"source_labels": [meta], "regex": ".+", "action": "keep"},
            {"source_labels": [meta], "target_label": ENDPOINT_LABEL},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": NAMESPACE_LABEL},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": POD_LABEL},
        ]
    if style == "operator":
        return [{"sourceLabels": [meta], "targetLabel": ENDPOINT_LABEL, "action": "replace"}]
    raise ValueError(f"style {style!r} must be 'prometheus' or 'operator'")


def markdown_table(specs: Iterable[MetricSpec] = METRICS) -> str:
    """A Markdown table of the given metrics (name, type, labels, unit, meaning) for the docs."""
    rows = ["| Name | Type | Labels | Unit | Meaning |", "|---|---|---|---|---|"]
    for m in specs:
        labels = ", ".join(
            f"{lb} ({'/'.join(m.label_values[lb])})" if lb in m.label_values else lb for lb in m.labels
        )
        rows.append(f"| `{m.name}` | {m.kind} | {labels or '—'} | {m.unit or '—'} | {m.help} |")
    return "\n".join(rows) + "\n"
