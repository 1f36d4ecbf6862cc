"""One reconcile with I/O, shared by the change handlers and the ticker: observe, reconcile (pure), apply."""

from __future__ import annotations

import logging
import time
from typing import Any

from dsv4.operator import kube, telemetry
from dsv4.operator.reconcile import Observed, Result, reconcile
from dsv4.operator.replica_owner import ScaleWrite

log = logging.getLogger("dsv4.operator")


def reconcile_and_apply(handler: str, name: str, namespace: str, uid: str, generation: int | None,
                        spec: dict[str, Any], status: dict[str, Any], autoscaler_replicas: int | None = None,
                        observed: Observed | None = None) -> Result:
    """Observe, reconcile, apply and prune; apply errors become Degraded=ApplyFailed in the result. Raises only
    for API-server trouble while observing (the caller retries). Writes no status: the caller does."""
    with telemetry.timed_reconcile(handler) as outcome:
        obs = observed or kube.observe(name, namespace)[0]
        res = reconcile(name, namespace, uid, generation, spec, status, obs, time.time(), autoscaler_replicas)
        if res.objects:
            try:
                kube.apply(res.objects)
                kube.prune(name, namespace, uid, res.objects)
            except Exception as e:  # noqa: BLE001 - API errors: Degraded; the next tick re-applies
                obs.apply_error = f"{type(e).__name__}: {str(e)[:500]}"
                res = reconcile(name, namespace, uid, generation, spec, status, obs, time.time(), autoscaler_replicas)
                telemetry.reconcile_error(handler, e)
                outcome.result = "retry"
        elif res.error:
            outcome.result = "error"
        telemetry.endpoint_status(namespace, name, res.status)
        return res


def publish(namespace: str, name: str, status: dict[str, Any] | None, scale: ScaleWrite | None) -> None:
    """Write the status (None: unchanged), then `spec.replicas` through /scale: in that order, because under
    autoscaling the CRD admits a new spec.replicas only when it equals status.desiredReplicas."""
    if status is not None:
        kube.write_status(namespace, name, status)
    if scale is not None:
        try:
            kube.write_scale(namespace, name, scale.replicas, scale.only_if_absent)
        except Exception as e:  # noqa: BLE001 - a conflict or a refusal: the next reconcile decides again
            log.info("%s/%s: spec.replicas not set to %d through /scale: %s: %s", namespace, name,
                     scale.replicas, type(e).__name__, e)
