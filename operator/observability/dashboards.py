"""Grafana dashboards for dsv4, generated from code (plain dicts -> JSON, Grafana schemaVersion 39).

Five dashboards, each with the template variables `datasource`, `namespace`, `endpoint`, `pod`, `job` and
`instance` (the last two are dashboard-linter's convention for reusable dashboards: every selector filters on
them; their "All" is `.+`, so by default they match every scrape):

| uid | What |
|---|---|
| `dsv4-overview` | replicas desired/ready, endpoint ready, requests/s, tokens/s, errors/s, running and waiting |
| `dsv4-cache` | per-pool occupancy, bytes, tokens held, prefix hit rate, evictions, SWA checkpoints, per DP rank |
| `dsv4-latency` | TTFT, ITL, end-to-end and queue-time percentiles; batching-delay waits; step duration by phase |
| `dsv4-autoscaler` | desired vs current vs ready (min/max), decisions by direction/reason, panic mode, signal |
| `dsv4-operator` | reconciles and errors by handler, reconcile latency, managed endpoints, pod scrape errors |

Prefix hit rate = rate(hits) / rate(queries) over the window (tokens served from cache / tokens looked up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dsv4 import metrics_catalog as mc

from .promql import BY_ENDPOINT, OP_BY_ENDPOINT, OPERATOR_SEL, SCRAPE_SEL, quantile, rate, sel

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["dsv4"]
# The series the namespace/endpoint/pod variables enumerate: every runtime pod exports it from start-up.
VARIABLE_SERIES = "vllm:num_requests_running"
PERCENTILES = (0.5, 0.9, 0.99)
_PHASE_TOTAL = 'phase="total"'


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str  # every panel has one: Grafana shows it as the panel's (i) tooltip
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # "timeseries" | "stat"
    width: int = 12
    height: int = 8
    stack: bool = False
    max: float | None = None


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _t(expr: str, legend: str) -> Target:
    return Target(expr, legend)


def _percentiles(histogram: str, label: str, by: str = "") -> tuple[Target, ...]:
    suffix = "".join(f" {{{{{b.strip()}}}}}" for b in by.split(",") if b.strip())
    return tuple(_t(quantile(q, histogram, by=by), f"p{round(q * 100)} {label}{suffix}") for q in PERCENTILES)


# ---- the five dashboards ------------------------------------------------------------------------------


def overview() -> Dashboard:
    s_ep = f"sum by ({BY_ENDPOINT})"
    return Dashboard(
        "dsv4-overview", "dsv4 / Endpoint overview", "Replicas, traffic, tokens and errors per DSV4Endpoint.",
        (
            Panel("Replicas desired / current / ready",
                  "Replicas the operator wants (desired), has created (current) and sees ready, per endpoint.", (
                _t(f"max by ({OP_BY_ENDPOINT}) ({sel('dsv4_operator_endpoint_desired_replicas', OPERATOR_SEL)})",
                   "desired {{dsv4_endpoint}}"),
                _t(f"max by ({OP_BY_ENDPOINT}) ({sel('dsv4_operator_endpoint_current_replicas', OPERATOR_SEL)})",
                   "current {{dsv4_endpoint}}"),
                _t(f"max by ({OP_BY_ENDPOINT}) ({sel('dsv4_operator_endpoint_ready_replicas', OPERATOR_SEL)})",
                   "ready {{dsv4_endpoint}}"),
            ), unit="short"),
            Panel("Endpoint ready",
                  "1 when the operator reports the endpoint Ready (at least its minimum of replicas serving).", (
                _t(f"max by ({OP_BY_ENDPOINT}) ({sel('dsv4_operator_endpoint_ready', OPERATOR_SEL)})",
                   "{{dsv4_endpoint}}"),
            ), kind="stat", unit="bool", width=6),
            Panel("Pods scraped (up)",
                  "Runtime pods whose /metrics Prometheus scraped successfully on the last attempt.", (
                _t(f"sum by ({BY_ENDPOINT}) ({sel('up')})", "{{dsv4_endpoint}}"),
            ), kind="stat", width=6),
            Panel("Requests finished / s",
                  "Requests completed per second, split by why they finished (stop, length, abort).", (
                _t(f"sum by ({BY_ENDPOINT}, finished_reason) ({rate('vllm:request_success_total')})",
                   "{{dsv4_endpoint}} {{finished_reason}}"),
            ), unit="reqps"),
            Panel("Errors / s by HTTP status", "Requests answered with an error per second, by HTTP status code.", (
                _t(f"sum by ({BY_ENDPOINT}, code) ({rate('dsv4_request_errors_total')})",
                   "{{dsv4_endpoint}} {{code}}"),
            ), unit="reqps"),
            Panel("Tokens / s", "Prompt tokens read and generation tokens produced per second, per endpoint.", (
                _t(f"{s_ep} ({rate('vllm:prompt_tokens_total')})", "prompt {{dsv4_endpoint}}"),
                _t(f"{s_ep} ({rate('vllm:generation_tokens_total')})", "generation {{dsv4_endpoint}}"),
            ), unit="short"),
            Panel("Requests running / waiting per pod",
                  "Requests in the running batch and in the waiting queue of each pod.", (
                _t(sel("vllm:num_requests_running"), "running {{pod}}"),
                _t(sel("vllm:num_requests_waiting"), "waiting {{pod}}"),
            ), unit="short"),
        ),
    )  # fmt: skip


def cache() -> Dashboard:
    by_pool = f"{BY_ENDPOINT}, pool"
    return Dashboard(
        "dsv4-cache", "dsv4 / Cache pools",
        "The multi-pool hybrid KV cache: one line per pool (swa, csa, idx, hca, csa_state, hca_state), so a "
        "full state pool is never hidden behind a blended KV-usage number.",
        (
            Panel("Pool occupancy (max over pods)",
                  "Fraction of each cache pool in use on the fullest pod; a pool near 1 forces preemption.", (
                _t(f"max by ({by_pool}) ({sel('dsv4_cache_pool_occupancy_ratio')})", "{{dsv4_endpoint}} {{pool}}"),
            ), unit="percentunit", max=1.0),
            Panel("KV usage as routers see it (vllm:kv_cache_usage_perc)",
                  "The single KV-usage number routers read: the fullest pool of each pod.", (
                _t(sel("vllm:kv_cache_usage_perc"), "{{pod}}"),
            ), unit="percentunit", max=1.0),
            Panel("Pool bytes used",
                  "Bytes of each cache pool holding live entries, summed over the endpoint's pods.", (
                _t(f"sum by ({by_pool}) ({sel('dsv4_cache_pool_used_bytes')})", "used {{dsv4_endpoint}} {{pool}}"),
            ), unit="bytes", stack=True),
            Panel("Pool bytes allocated",
                  "Bytes reserved for each cache pool at start-up, summed over the endpoint's pods.", (
                _t(f"sum by ({by_pool}) ({sel('dsv4_cache_pool_allocated_bytes')})",
                   "allocated {{dsv4_endpoint}} {{pool}}"),
            ), unit="bytes", stack=True),
            Panel("Tokens held per pool", "Tokens whose KV (or state) each pool currently holds.", (
                _t(f"sum by ({by_pool}) ({sel('dsv4_cache_pool_tokens_held')})", "{{dsv4_endpoint}} {{pool}}"),
            ), unit="short"),
            Panel("Prefix-cache hit rate (tokens)",
                  "Tokens served from the prefix cache divided by tokens looked up.", (
                _t(f"sum by ({BY_ENDPOINT}) ({rate('vllm:prefix_cache_hits_total')}) / "
                   f"sum by ({BY_ENDPOINT}) ({rate('vllm:prefix_cache_queries_total')})", "{{dsv4_endpoint}}"),
            ), unit="percentunit", max=1.0),
            Panel("Evictions / s per pool", "Cache entries evicted per second from each pool to make room.", (
                _t(f"sum by ({by_pool}) ({rate('dsv4_cache_pool_evictions_total')})", "{{dsv4_endpoint}} {{pool}}"),
            ), unit="short"),
            Panel("SWA checkpoints kept", "Sliding-window state checkpoints each pod keeps for prefix reuse.", (
                _t(sel("dsv4_swa_checkpoints_kept"), "{{pod}}"),
            ), unit="short"),
            Panel("Preemptions / s", "Running requests preempted per second because a cache pool was full.", (
                _t(f"sum by ({BY_ENDPOINT}) ({rate('vllm:num_preemptions_total')})", "{{dsv4_endpoint}}"),
            ), unit="short"),
            Panel("Pool occupancy per data-parallel rank",
                  "With dp > 1 each attention rank of a pod has its own KV cache: each rank's pools. One rank far "
                  "above the others means the dispatcher's prefix affinity is concentrating work.", (
                _t(f"max by (pod, rank, pool) ({sel('dsv4_rank_cache_pool_occupancy_ratio')})",
                   "{{pod}} rank {{rank}} {{pool}}"),
            ), unit="percentunit", max=1.0),
            Panel("Requests per data-parallel rank",
                  "Running and waiting requests of each attention rank (dp = 1: rank 0 is the whole pod).", (
                _t(sel("dsv4_rank_requests_running"), "running {{pod}} rank {{rank}}"),
                _t(sel("dsv4_rank_requests_waiting"), "waiting {{pod}} rank {{rank}}"),
            ), unit="short"),
            Panel("Dispatch per rank and prefix hits / s",
                  "Requests/s the front end sends to each rank, by reason (prefix: the rank held the longest "
                  "cached prefix; load: the least-loaded rank), and prompt tokens/s each rank served from its "
                  "own prefix cache.", (
                _t(f"sum by (pod, rank, reason) ({rate('dsv4_rank_dispatched_requests_total')})",
                   "{{pod}} rank {{rank}} {{reason}}"),
                _t(f"sum by (pod, rank) ({rate('dsv4_rank_prefix_cache_hit_tokens_total')})",
                   "hit tokens {{pod}} rank {{rank}}"),
            ), unit="short"),
        ),
    )  # fmt: skip


def latency() -> Dashboard:
    return Dashboard(
        "dsv4-latency", "dsv4 / Latency",
        "Request latency percentiles (p50/p90/p99 from the histograms), batching-delay waits and engine steps.",
        (
            Panel("Time to first token",
                  "p50/p90/p99 time from request arrival to the first generated token.",
                  _percentiles("vllm:time_to_first_token_seconds", "TTFT"), unit="s"),
            Panel("Inter-token latency",
                  "p50/p90/p99 time between two generated tokens of one request.",
                  _percentiles("vllm:inter_token_latency_seconds", "ITL"), unit="s"),
            Panel("End-to-end request latency",
                  "p50/p90/p99 time from request arrival to its last token.",
                  _percentiles("vllm:e2e_request_latency_seconds", "e2e"), unit="s"),
            Panel("Queue time",
                  "p50/p90/p99 time requests waited in the queue before their first step.",
                  _percentiles("vllm:request_queue_time_seconds", "queue"), unit="s"),
            Panel("Batching-delay wait",
                  "How long prefill work actually waited for the batching delay.",
                  _percentiles("dsv4_batching_delay_wait_seconds", "wait"), unit="s"),
            Panel("Batching-delay waits / s", "Prefill batches that waited for the batching delay, per second.", (
                _t(f"sum by ({BY_ENDPOINT}) ({rate('dsv4_batching_delay_wait_seconds_count')})", "{{dsv4_endpoint}}"),
            ), unit="short"),
            Panel("Engine step duration p99 by phase",
                  "p99 duration of one engine step, by phase (prefill, decode, total).",
                  (_t(quantile(0.99, "dsv4_step_duration_seconds", by="phase"), "p99 {{phase}}"),), unit="s"),
            Panel("Engine steps / s", "Engine steps completed per second on each pod.", (
                _t(f"sum by (pod) ({rate('dsv4_step_duration_seconds_count', extra=_PHASE_TOTAL)})", "{{pod}}"),
            ), unit="short"),
        ),
    )  # fmt: skip


def autoscaler() -> Dashboard:
    def op(metric: str) -> str:
        return f"max by ({OP_BY_ENDPOINT}) ({sel(metric, OPERATOR_SEL)})"

    return Dashboard(
        "dsv4-autoscaler", "dsv4 / Autoscaler",
        "What the operator's autoscaler saw and decided for each DSV4Endpoint.",
        (
            Panel("Replicas: desired, current, ready, min, max",
                  "The autoscaler's desired replicas against current, ready and the spec's bounds.", (
                _t(op("dsv4_operator_endpoint_desired_replicas"), "desired {{dsv4_endpoint}}"),
                _t(op("dsv4_operator_endpoint_current_replicas"), "current {{dsv4_endpoint}}"),
                _t(op("dsv4_operator_endpoint_ready_replicas"), "ready {{dsv4_endpoint}}"),
                _t(op("dsv4_operator_endpoint_min_replicas"), "min {{dsv4_endpoint}}"),
                _t(op("dsv4_operator_endpoint_max_replicas"), "max {{dsv4_endpoint}}"),
            ), width=24),
            Panel("Scaling decisions / 5m by direction and reason",
                  "Scale up/down decisions in the last 5 minutes, with the reason the autoscaler gave.", (
                _t(f"sum by ({OP_BY_ENDPOINT}, direction, reason) "
                   f"(increase({sel('dsv4_operator_scaling_decisions_total', OPERATOR_SEL)}[5m]))",
                   "{{dsv4_endpoint}} {{direction}} {{reason}}"),
            )),
            Panel("Panic mode",
                  "1 while the autoscaler is in panic mode (scales up on the short window, never down).",
                  (_t(op("dsv4_operator_autoscaler_panic_mode"), "{{dsv4_endpoint}}"),), unit="bool"),
            Panel("Signal vs target", "The signal the autoscaler observed and the target it scales to, per signal.", (
                _t(f"max by ({OP_BY_ENDPOINT}, signal) ({sel('dsv4_operator_autoscaler_signal', OPERATOR_SEL)})",
                   "observed {{dsv4_endpoint}} {{signal}}"),
                _t(f"max by ({OP_BY_ENDPOINT}, signal) ({sel('dsv4_operator_autoscaler_target', OPERATOR_SEL)})",
                   "target {{dsv4_endpoint}} {{signal}}"),
            ), width=24),
            Panel("Queue depth per endpoint (runtime)", "Requests waiting in the queues of all pods of the endpoint.", (
                _t(f"sum by ({BY_ENDPOINT}) ({sel('vllm:num_requests_waiting')})", "{{dsv4_endpoint}}"),
            )),
            Panel("Fullest pool per endpoint (runtime)",
                  "Occupancy of the fullest cache pool over the endpoint's pods.", (
                _t(f"max by ({BY_ENDPOINT}) ({sel('dsv4_cache_pool_occupancy_ratio')})", "{{dsv4_endpoint}}"),
            ), unit="percentunit", max=1.0),
        ),
    )  # fmt: skip


def operator_health() -> Dashboard:
    return Dashboard(
        "dsv4-operator", "dsv4 / Operator health", "The kopf operator itself: handlers, errors, latency.",
        (
            Panel("Managed endpoints", "DSV4Endpoints the operator currently manages.",
                  (_t(sel("dsv4_operator_endpoints", SCRAPE_SEL), "endpoints"),), kind="stat", width=6),
            Panel("Reconcile errors (1h)", "Reconciles that ended in an error over the last hour.", (
                _t(f"sum(increase({sel('dsv4_operator_reconcile_errors_total', SCRAPE_SEL)}[1h]))", "errors"),
            ), kind="stat", width=6),
            Panel("Pod /metrics scrape errors / s",
                  "Failures of the operator's own scrapes of runtime pods (its autoscaling signals).", (
                _t(f"sum by ({OP_BY_ENDPOINT}) ({rate('dsv4_operator_pod_scrape_errors_total', OPERATOR_SEL)})",
                   "{{dsv4_endpoint}}"),
            )),
            Panel("Reconciles / s by handler and result", "Reconciles per second by kopf handler and result.", (
                _t(f"sum by (handler, result) ({rate('dsv4_operator_reconciles_total', SCRAPE_SEL)})",
                   "{{handler}} {{result}}"),
            )),
            Panel("Reconcile errors / s by handler and error",
                  "Reconcile errors per second by kopf handler and error kind.", (
                _t(f"sum by (handler, error) ({rate('dsv4_operator_reconcile_errors_total', SCRAPE_SEL)})",
                   "{{handler}} {{error}}"),
            )),
            Panel("Reconcile duration p99 by handler", "p99 time one reconcile takes, by kopf handler.", (
                _t(quantile(0.99, "dsv4_operator_reconcile_duration_seconds", by="handler", selector=SCRAPE_SEL),
                   "p99 {{handler}}"),
            ), unit="s", width=24),
        ),
    )  # fmt: skip


DASHBOARDS = (overview, cache, latency, autoscaler, operator_health)


# ---- JSON rendering -----------------------------------------------------------------------------------


def _variables() -> list[dict[str, Any]]:
    def query_var(name: str, label: str, matcher: str, series: str = VARIABLE_SERIES,
                  all_value: str = ".*") -> dict[str, Any]:
        selector = f"{series}{{{matcher}}}" if matcher else series
        q = f"label_values({selector}, {label})"
        return {
            "name": name, "label": name.title(), "type": "query", "datasource": DATASOURCE,
            "query": {"query": q, "refId": f"var-{name}"}, "definition": q,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": all_value, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }  # fmt: skip

    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        query_var("namespace", mc.NAMESPACE_LABEL, ""),
        query_var("endpoint", mc.ENDPOINT_LABEL, f'{mc.NAMESPACE_LABEL}=~"$namespace"'),
        query_var("pod", mc.POD_LABEL, f'{mc.NAMESPACE_LABEL}=~"$namespace", {mc.ENDPOINT_LABEL}=~"$endpoint"'),
        # `up` (not the runtime series) so that the operator's own scrape job is listed too
        query_var("job", "job", "", series="up", all_value=".+"),
        query_var("instance", "instance", 'job=~"$job"', series="up", all_value=".+"),
    ]  # fmt: skip


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.max is not None:
        defaults["min"], defaults["max"] = 0, panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {"stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
                              "fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}  # fmt: skip
        options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                   "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
    else:
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "textMode": "auto"}  # fmt: skip
    return {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend,
             "range": True, "instant": False}
            for i, t in enumerate(panel.targets)
        ],
    }  # fmt: skip


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard JSON model (panels laid out left to right, 24 columns wide)."""
    panels, x, y, row_h = [], 0, 0, 0
    for pid, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append(_panel_json(panel, pid, x, y))
        x, row_h = x + panel.width, max(row_h, panel.height)
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description, "tags": TAGS,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": False, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "timezone": "",
        "templating": {"list": _variables()}, "annotations": {"list": []}, "links": [],
        "panels": panels,
    }  # fmt: skip


def render_all() -> dict[str, str]:
    """File name -> JSON text for every dashboard (stable formatting, trailing newline)."""
    out = {}
    for build in DASHBOARDS:
        d = render(build())
        out[f"{d['uid']}.json"] = json.dumps(d, indent=2, sort_keys=True) + "\n"
    return out


def expressions(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of a rendered dashboard."""
    return [
        (f"{dashboard_json['uid']}/{p['title']}/{t['refId']}", t["expr"])
        for p in dashboard_json["panels"]
        for t in p.get("targets", [])
    ]


def variable_selectors(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable, series selector inside label_values(...)) for every query variable."""
    out = []
    for v in dashboard_json["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            inner = q[len("label_values(") : q.rindex(",")]
            out.append((v["name"], inner))
    return out
