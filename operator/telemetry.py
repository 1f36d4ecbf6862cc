"""The operator's own Prometheus metrics (names and labels from dsv4.metrics_catalog): the collectors,
their HTTP endpoint, and one recording function per thing the operator measures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dsv4.operator.api import AutoscalingSpec
from dsv4.operator.autoscaler import Decision

from dsv4 import metrics_catalog as mc

_COLLECTORS: dict[str, Any] | None = None
_LOCK = threading.Lock()  # kopf runs sync handlers in worker threads: create the collectors once


def collectors(registry: Any = None) -> dict[str, Any]:
    """The operator's collectors, created once per process (pass `registry` in tests for a fresh set)."""
    global _COLLECTORS
    if registry is not None:
        return mc.make_collectors(mc.OPERATOR, registry=registry)
    with _LOCK:
        if _COLLECTORS is None:
            import prometheus_client as pc

            _COLLECTORS = mc.make_collectors(mc.OPERATOR, registry=pc.REGISTRY)
        return _COLLECTORS


def serve(port: int) -> None:
    """Expose the default registry on :port/metrics (a thread of the operator process)."""
    import prometheus_client as pc

    collectors()
    pc.start_http_server(port)


def endpoint_labels(namespace: str, name: str) -> dict[str, str]:
    return {"dsv4_namespace": namespace, "dsv4_endpoint": name}


class ReconcileOutcome:
    """What one timed reconcile reports: "success" unless the caller says otherwise."""

    def __init__(self) -> None:
        self.result = "success"


@contextmanager
def timed_reconcile(handler: str) -> Iterator[ReconcileOutcome]:
    """Count and time one reconcile; an exception counts as an error of its type and propagates."""
    m = collectors()
    outcome = ReconcileOutcome()
    t0 = time.monotonic()
    try:
        yield outcome
    except Exception as e:
        outcome.result = "error"
        reconcile_error(handler, e)
        raise
    finally:
        m["dsv4_operator_reconciles_total"].labels(handler=handler, result=outcome.result).inc()
        m["dsv4_operator_reconcile_duration_seconds"].labels(handler=handler).observe(time.monotonic() - t0)


def reconcile_error(handler: str, exc: BaseException) -> None:
    collectors()["dsv4_operator_reconcile_errors_total"].labels(handler=handler, error=type(exc).__name__).inc()


def endpoint_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Replica gauges and readiness of one endpoint, from the status just computed."""
    m = collectors()
    lb = endpoint_labels(namespace, name)
    if status.get("desiredReplicas") is not None:
        m["dsv4_operator_endpoint_desired_replicas"].labels(**lb).set(status["desiredReplicas"])
    m["dsv4_operator_endpoint_current_replicas"].labels(**lb).set(status.get("replicas") or 0)
    m["dsv4_operator_endpoint_ready_replicas"].labels(**lb).set(status.get("readyReplicas") or 0)
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
    m["dsv4_operator_endpoint_ready"].labels(**lb).set(1 if ready else 0)


def autoscaler_decision(namespace: str, name: str, bounds: AutoscalingSpec, d: Decision) -> None:
    m = collectors()
    lb = endpoint_labels(namespace, name)
    m["dsv4_operator_scaling_decisions_total"].labels(**lb, direction=d.direction, reason=d.signal).inc()
    m["dsv4_operator_autoscaler_panic_mode"].labels(**lb).set(1 if d.panic else 0)
    m["dsv4_operator_endpoint_min_replicas"].labels(**lb).set(bounds.min_replicas)
    m["dsv4_operator_endpoint_max_replicas"].labels(**lb).set(bounds.max_replicas)
    for sig, v in d.signals.items():
        m["dsv4_operator_autoscaler_signal"].labels(**lb, signal=sig).set(v)
    m["dsv4_operator_autoscaler_target"].labels(**lb, signal="queue_depth").set(bounds.target_queue_depth)


def scrape_error(namespace: str, name: str) -> None:
    collectors()["dsv4_operator_pod_scrape_errors_total"].labels(**endpoint_labels(namespace, name)).inc()


def endpoint_seen() -> None:
    collectors()["dsv4_operator_endpoints"].inc()
