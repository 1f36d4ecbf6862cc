"""Prometheus alerting rules for dsv4, generated from code.

Two renderings of the same rules:

- `rule_groups(Thresholds())`: plain Prometheus rule groups with the default thresholds, written to
  `helm/dsv4-operator/rules/dsv4-alerts.rules.yaml` (for `promtool` and for Prometheus without the
  prometheus-operator).
- `helm_template()`: the chart's `templates/prometheusrule.yaml`, where every threshold is
  `{{ .Values.prometheusRule.thresholds.<name> }}` and Prometheus' own `{{ $labels.x }}` templates are
  escaped for Helm.

| Alert | Fires when (for) |
|---|---|
| DSV4CachePoolSaturation | max over pods of a pool's `dsv4_cache_pool_occupancy_ratio` > cachePoolOccupancy (10m) |
| DSV4QueueBuildup | sum of `vllm:num_requests_waiting` per endpoint > queueDepth (5m) |
| DSV4TTFTP99OverSLO | p99 of `vllm:time_to_first_token_seconds` per endpoint over 5m > ttftP99Seconds (10m) |
| DSV4HighPreemptionRate | preemptions per second per endpoint > preemptionsPerSecond (10m) |
| DSV4AutoscalerPinnedAtMax | desired replicas >= max replicas (> 0) (pinnedAtMaxFor) |
| DSV4EndpointNotReady | the endpoint's Ready condition is False (10m) |
| DSV4EndpointDegraded | ready replicas < desired replicas (15m) |
| DSV4OperatorReconcileErrors | reconcile errors per second > 0 (15m) |
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import yaml

from dsv4 import metrics_catalog as mc

from .promql import BY_ENDPOINT, OP_BY_ENDPOINT

GROUP_NAME = "dsv4.rules"
RUNBOOK = "https://github.com/dsv4/dsv4/blob/main/docs/observability.md#"


@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds (the chart's `prometheusRule.thresholds`, camelCase there)."""

    cache_pool_occupancy: float = 0.95  # fraction of a pool's blocks in use
    queue_depth: float = 50  # waiting requests per endpoint
    ttft_p99_seconds: float = 10.0  # TTFT SLO (p99)
    preemptions_per_second: float = 0.5
    pinned_at_max_for: str = "15m"

    @staticmethod
    def helm_names() -> dict[str, str]:
        """Python field -> values.yaml key."""
        def camel(n: str) -> str:
            head, *rest = n.split("_")
            return head + "".join(r.capitalize() for r in rest)

        return {f.name: camel(f.name) for f in fields(Thresholds)}


class _Concrete:
    """Thresholds formatted the way Helm prints YAML numbers (10.0 -> "10"), so both renderings agree."""

    def __init__(self, t: Thresholds) -> None:
        self._t = t

    def __getattr__(self, item: str) -> str:
        v = getattr(self._t, item)
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


class _Helm:
    """Stands in for a Thresholds object: each attribute renders as the Helm value reference."""

    def __getattr__(self, item: str) -> str:
        return "{{ .Values.prometheusRule.thresholds." + Thresholds.helm_names()[item] + " }}"


def _label(name: str, helm: bool) -> str:
    """A Prometheus alert-template reference to a label, escaped for Helm when needed."""
    return _escape("{{ $labels." + name + " }}", helm)


def _value(helm: bool) -> str:
    return _escape("{{ $value | humanize }}", helm)


def _escape(prometheus_template: str, helm: bool) -> str:
    """Helm prints a Go raw string `{{`...`}}` verbatim, so Prometheus receives its own template."""
    return "{{`" + prometheus_template + "`}}" if helm else prometheus_template


def rules(t: _Concrete | _Helm, helm: bool = False) -> list[dict]:
    """The alerting rules (expr, for, labels, annotations), with thresholds from `t`."""
    ns, ep, pool = _label(mc.NAMESPACE_LABEL, helm), _label(mc.ENDPOINT_LABEL, helm), _label("pool", helm)
    ons, v = _label(mc.ENDPOINT_NAMESPACE_LABEL, helm), _value(helm)
    op = f"on({OP_BY_ENDPOINT})"

    def alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict:
        return {
            "alert": name, "expr": expr, "for": for_, "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description, "runbook_url": f"{RUNBOOK}{name.lower()}"},
        }  # fmt: skip

    return [
        alert("DSV4CachePoolSaturation",
              f"max by ({BY_ENDPOINT}, pool) (dsv4_cache_pool_occupancy_ratio) > {t.cache_pool_occupancy}",
              "10m", "warning", f"Cache pool {pool} of {ns}/{ep} is saturated",
              f"The fullest pod's {pool} pool is {v} full: expect preemptions and queueing; scale out or "
              "change the cache policy."),
        alert("DSV4QueueBuildup",
              f"sum by ({BY_ENDPOINT}) (vllm:num_requests_waiting) > {t.queue_depth}",
              "5m", "warning", f"Requests are queueing on {ns}/{ep}",
              f"{v} requests are waiting across the endpoint's pods."),
        alert("DSV4TTFTP99OverSLO",
              f"histogram_quantile(0.99, sum by (le, {BY_ENDPOINT}) "
              f"(rate(vllm:time_to_first_token_seconds_bucket[5m]))) > {t.ttft_p99_seconds}",
              "10m", "warning", f"TTFT p99 of {ns}/{ep} is over its SLO",
              f"p99 time to first token is {v}s."),
        alert("DSV4HighPreemptionRate",
              f"sum by ({BY_ENDPOINT}) (rate(vllm:num_preemptions_total[5m])) > {t.preemptions_per_second}",
              "10m", "warning", f"{ns}/{ep} preempts requests on cache pressure",
              f"{v} preemptions per second: requests are recomputed, latency suffers."),
        alert("DSV4AutoscalerPinnedAtMax",
              f"max by ({OP_BY_ENDPOINT}) (dsv4_operator_endpoint_desired_replicas) >= {op} "
              f"max by ({OP_BY_ENDPOINT}) (dsv4_operator_endpoint_max_replicas) and {op} "
              f"max by ({OP_BY_ENDPOINT}) (dsv4_operator_endpoint_max_replicas) > 0",
              t.pinned_at_max_for, "warning", f"Autoscaler of {ons}/{ep} is pinned at maxReplicas",
              "The autoscaler wants at least maxReplicas; raise maxReplicas or add capacity."),
        alert("DSV4EndpointNotReady",
              f"max by ({OP_BY_ENDPOINT}) (dsv4_operator_endpoint_ready) == 0",
              "10m", "critical", f"DSV4Endpoint {ons}/{ep} is not ready",
              "The endpoint's Ready condition has been False for 10 minutes; see kubectl describe dsv4endpoint."),
        alert("DSV4EndpointDegraded",
              f"max by ({OP_BY_ENDPOINT}) (dsv4_operator_endpoint_ready_replicas) < {op} "
              f"max by ({OP_BY_ENDPOINT}) (dsv4_operator_endpoint_desired_replicas)",
              "15m", "warning", f"DSV4Endpoint {ons}/{ep} has fewer ready replicas than desired",
              f"Only {v} replicas are ready."),
        alert("DSV4OperatorReconcileErrors",
              "sum by (handler) (rate(dsv4_operator_reconcile_errors_total[5m])) > 0",
              "15m", "warning", "The dsv4 operator keeps failing in handler " + _label("handler", helm),
              "Reconcile errors for 15 minutes; check the operator's logs."),
    ]  # fmt: skip


def rule_groups(t: Thresholds | None = None) -> dict:
    """A Prometheus rules file ({groups: [...]}) with concrete thresholds."""
    return {"groups": [{"name": GROUP_NAME, "rules": rules(_Concrete(t or Thresholds()))}]}


def rules_file_text(t: Thresholds | None = None) -> str:
    header = "# Generated by `dsv4 observability generate` from operator/observability/alerts.py. Do not edit.\n"
    return header + yaml.safe_dump(rule_groups(t), sort_keys=False, width=200)


def helm_template() -> str:
    """The chart's templates/prometheusrule.yaml (thresholds from .Values.prometheusRule.thresholds)."""
    body = yaml.safe_dump({"groups": [{"name": GROUP_NAME, "rules": rules(_Helm(), helm=True)}]},
                          sort_keys=False, width=1000)  # fmt: skip
    body = "\n".join("  " + line for line in body.splitlines())
    return (
        "{{- /* Generated by `dsv4 observability generate` from operator/observability/alerts.py. Do not edit. */}}\n"
        "{{- if .Values.prometheusRule.enabled }}\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: {{ include \"dsv4-operator.fullname\" . }}\n"
        "  namespace: {{ .Release.Namespace }}\n"
        "  labels:\n"
        "    {{- include \"dsv4-operator.labels\" . | nindent 4 }}\n"
        "    {{- with .Values.prometheusRule.labels }}\n"
        "    {{- toYaml . | nindent 4 }}\n"
        "    {{- end }}\n"
        "spec:\n"
        f"{body}\n"
        "{{- end }}\n"
    )
