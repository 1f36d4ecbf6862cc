"""kopf handlers for `DSV4Endpoint`: read the cluster, call the pure functions, write results back.

Module-level functions only (kopf#849). Level-based: create, update and resume all run the same
`reconcile`; a timer every 15 s refreshes status from the Deployment and the pods' `/metrics`, runs
the built-in autoscaler, and re-applies the children (server-side apply, field manager
`dsv4-operator`, so drift is corrected too). Nothing is written to the watched object except its
status subresource (kopf's own bookkeeping annotations aside, under the `serving.dsv4.dev` prefix).

Load this module with `kopf run -m dsv4.operator.handlers` or `dsv4 operator`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from typing import Any

import kopf
from dsv4.operator import api, manifests, opmetrics, scrape
from dsv4.operator.autoscaler import Sample
from dsv4.operator.reconcile import Observed, autoscale, occupancy_fields, reconcile

TIMER_INTERVAL_S = float(os.environ.get("DSV4_OPERATOR_TIMER_INTERVAL", "15"))
METRICS_PORT = int(os.environ.get("DSV4_OPERATOR_METRICS_PORT", "8080"))
_SAMPLES: dict[str, deque[Sample]] = {}   # endpoint uid -> recent samples (in memory; restart = hold)
_MAX_SAMPLES = 4096
log = logging.getLogger("dsv4.operator")


# ---- kube I/O -----------------------------------------------------------------------------------
def _dyn():
    from kubernetes import config, dynamic
    from kubernetes.client import api_client

    global _DYN
    try:
        return _DYN
    except NameError:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _DYN = dynamic.DynamicClient(api_client.ApiClient())
        return _DYN


def _resource(api_version: str, kind: str):
    return _dyn().resources.get(api_version=api_version, kind=kind)


def crd_exists(api_version: str, kind: str) -> bool:
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    try:
        _resource(api_version, kind)
        return True
    except ResourceNotFoundError:
        return False


def apply(objs: list[dict[str, Any]]) -> None:
    """Server-side apply each object with field manager dsv4-operator (forcing: the operator owns them)."""
    for obj in objs:
        res = _resource(obj["apiVersion"], obj["kind"])
        res.server_side_apply(body=obj, name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"],
                              field_manager=manifests.FIELD_MANAGER, force_conflicts=True)


OPTIONAL_KINDS = (("monitoring.coreos.com/v1", "PodMonitor"), ("keda.sh/v1alpha1", "ScaledObject"))


def prune(name: str, namespace: str, uid: str, objs: list[dict[str, Any]]) -> None:
    """Delete optional children (PodMonitor, ScaledObject) this endpoint owns but no longer wants."""
    from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

    wanted = {(o["apiVersion"], o["kind"]) for o in objs}
    for api_version, kind in OPTIONAL_KINDS:
        if (api_version, kind) in wanted:
            continue
        try:
            res = _resource(api_version, kind)
            obj = res.get(name=name, namespace=namespace).to_dict()
        except (ResourceNotFoundError, NotFoundError):
            continue
        if any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or []):
            res.delete(name=name, namespace=namespace)


def observe(name: str, namespace: str) -> tuple[Observed, list[dict[str, Any]]]:
    """The endpoint's Deployment and pods; returns (Observed, ready pod objects)."""
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        dep = _resource("apps/v1", "Deployment").get(name=name, namespace=namespace).to_dict()
    except NotFoundError:
        dep = None
    pods = _resource("v1", "Pod").get(namespace=namespace,
                                      label_selector=manifests.selector_string(name)).to_dict()["items"]
    ready, pending = [], 0
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        conds = (pod.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds):
            ready.append(pod)
        else:
            pending += 1
    obs = Observed(deployment=dep, ready_pods=[p["metadata"]["name"] for p in ready], pending_pods=pending,
                   has_pod_monitor_crd=crd_exists("monitoring.coreos.com/v1", "PodMonitor"),
                   default_image=os.environ.get("DSV4_RUNTIME_IMAGE") or manifests.DEFAULT_IMAGE)
    return obs, ready


def _event(body: Any, ev: tuple[str, str, str]) -> None:
    kopf.event(body, type=ev[0], reason=ev[1], message=ev[2][:1024])


# ---- handlers -----------------------------------------------------------------------------------
@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Storage under serving.dsv4.dev (fixed before the first release: changing it later makes every
    object look unhandled), quiet log-to-event posting, long watches, and the metrics endpoint."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{api.GROUP}/kopf-finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    if METRICS_PORT > 0:
        try:
            opmetrics.serve(METRICS_PORT)
        except OSError as e:  # port taken (e.g. two operators in one test process): metrics off, not fatal
            log.warning("operator metrics not served on :%d (%s)", METRICS_PORT, e)


def _ep_labels(namespace: str, name: str) -> dict[str, str]:
    return {"dsv4_namespace": namespace, "dsv4_endpoint": name}


def _run_reconcile(handler: str, body: Any, name: str, namespace: str, uid: str, generation: int | None,
                   spec: Any, status: Any, patch: kopf.Patch, autoscaler_replicas: int | None = None,
                   observed: Observed | None = None) -> None:
    m = opmetrics.collectors()
    t0 = time.monotonic()
    result = "success"
    try:
        obs = observed or observe(name, namespace)[0]
        res = reconcile(name, namespace, uid, generation, dict(spec), dict(status or {}), obs, time.time(),
                        autoscaler_replicas)
        if res.objects:
            try:
                apply(res.objects)
                prune(name, namespace, uid, res.objects)
            except Exception as e:  # API errors: record Degraded, retry on the next timer tick
                obs.apply_error = f"{type(e).__name__}: {str(e)[:500]}"
                res = reconcile(name, namespace, uid, generation, dict(spec), dict(status or {}), obs, time.time(),
                                autoscaler_replicas)
                res.events.append(("Warning", "ApplyFailed", obs.apply_error))
                m["dsv4_operator_reconcile_errors_total"].labels(handler=handler, error=type(e).__name__).inc()
                result = "retry"
        elif res.error:
            result = "error"
        patch.status.update(res.status)
        for ev in res.events:
            _event(body, ev)
        lb = _ep_labels(namespace, name)
        st = res.status
        if st.get("desiredReplicas") is not None:
            m["dsv4_operator_endpoint_desired_replicas"].labels(**lb).set(st["desiredReplicas"])
        m["dsv4_operator_endpoint_current_replicas"].labels(**lb).set(st.get("replicas") or 0)
        m["dsv4_operator_endpoint_ready_replicas"].labels(**lb).set(st.get("readyReplicas") or 0)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions", []))
        m["dsv4_operator_endpoint_ready"].labels(**lb).set(1 if ready else 0)
    except Exception as e:
        result = "error"
        m["dsv4_operator_reconcile_errors_total"].labels(handler=handler, error=type(e).__name__).inc()
        raise kopf.TemporaryError(f"{handler}: {type(e).__name__}: {e}", delay=30) from e
    finally:
        m["dsv4_operator_reconciles_total"].labels(handler=handler, result=result).inc()
        m["dsv4_operator_reconcile_duration_seconds"].labels(handler=handler).observe(time.monotonic() - t0)


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
def on_create(body, name, namespace, uid, meta, spec, status, patch, **_: Any) -> None:
    _run_reconcile("create", body, name, namespace, uid, meta.get("generation"), spec, status, patch)


@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL)
def on_update(body, name, namespace, uid, meta, spec, status, patch, **_: Any) -> None:
    _run_reconcile("update", body, name, namespace, uid, meta.get("generation"), spec, status, patch)


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
def on_resume(body, name, namespace, uid, meta, spec, status, patch, **_: Any) -> None:
    opmetrics.collectors()["dsv4_operator_endpoints"].inc()
    _run_reconcile("resume", body, name, namespace, uid, meta.get("generation"), spec, status, patch)


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, optional=True)
def on_delete(name, namespace, uid, **_: Any) -> None:
    """Children go with the owner (garbage collection); only forget the in-memory samples."""
    _SAMPLES.pop(uid, None)


def _scrape(ready_pods: list[dict[str, Any]], namespace: str, name: str, now: float) -> list[Sample]:
    m = opmetrics.collectors()
    out = []
    for pod in ready_pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            continue
        try:
            out.append(scrape.fetch(f"http://{ip}:{manifests.PORT}/metrics", pod["metadata"]["name"], now))
        except scrape.ScrapeError as e:
            log.info("%s/%s: %s", namespace, name, e)
            m["dsv4_operator_pod_scrape_errors_total"].labels(**_ep_labels(namespace, name)).inc()
    return out


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=TIMER_INTERVAL_S, sharp=True,
            initial_delay=lambda **_: random.uniform(0, TIMER_INTERVAL_S))
async def tick(body, name, namespace, uid, meta, spec, status, patch, **_: Any) -> None:
    """Refresh status from the cluster; scrape ready pods; run the built-in autoscaler; re-apply."""
    await asyncio.to_thread(_tick, body, name, namespace, uid, meta, spec, status, patch)


def _tick(body, name, namespace, uid, meta, spec, status, patch) -> None:
    now = time.time()
    try:
        parsed = api.parse_spec(dict(spec))
    except Exception:
        return  # invalid: the create/update handler already reported PlanValid=False
    obs, ready_pods = observe(name, namespace)
    samples = _SAMPLES.setdefault(uid, deque(maxlen=_MAX_SAMPLES))
    samples.extend(_scrape(ready_pods, namespace, name, now))
    horizon = now - max(600.0, parsed.autoscaling.stable_window_seconds if parsed.autoscaling else 0)
    while samples and samples[0].time < horizon:
        samples.popleft()
    status = dict(status or {})
    autoscaler_replicas = None
    lb = _ep_labels(namespace, name)
    m = opmetrics.collectors()
    if parsed.builtin_autoscaling:
        current = int(((obs.deployment or {}).get("spec") or {}).get("replicas")
                      or status.get("desiredReplicas") or parsed.autoscaling.min_replicas)
        res = autoscale(parsed, status, current, obs, list(samples), now)
        d = res.decision
        autoscaler_replicas = d.desired
        status.update(res.status_update)
        patch.status.update(res.status_update)
        m["dsv4_operator_scaling_decisions_total"].labels(**lb, direction=d.direction, reason=d.signal).inc()
        m["dsv4_operator_autoscaler_panic_mode"].labels(**lb).set(1 if d.panic else 0)
        m["dsv4_operator_endpoint_min_replicas"].labels(**lb).set(parsed.autoscaling.min_replicas)
        m["dsv4_operator_endpoint_max_replicas"].labels(**lb).set(parsed.autoscaling.max_replicas)
        for sig, v in d.signals.items():
            m["dsv4_operator_autoscaler_signal"].labels(**lb, signal=sig).set(v)
        m["dsv4_operator_autoscaler_target"].labels(**lb, signal="queue_depth").set(
            parsed.autoscaling.target_queue_depth)
        if res.event:
            _event(body, res.event)
    else:
        recent = [s for s in samples if now - s.time <= 60]
        if recent:
            pools: dict[str, list[float]] = {}
            for s in recent:
                for k, v in s.pools.items():
                    pools.setdefault(k, []).append(v)
            upd = occupancy_fields({k: round(sum(v) / len(v), 4) for k, v in pools.items()},
                                   sum(s.queue for s in recent) / len(recent))
            status.update(upd)
            patch.status.update(upd)
    _run_reconcile("timer", body, name, namespace, uid, meta.get("generation"), spec, status, patch,
                   autoscaler_replicas, observed=obs)
