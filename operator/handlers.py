"""kopf handlers for `DSV4Endpoint`: read the cluster, call the pure functions, write results back.

Module-level functions only (kopf#849). Level-based: create, update and resume all run the same
`reconcile`; a periodic **ticker** (every 15 s, `DSV4_OPERATOR_TIMER_INTERVAL`) refreshes status from
the Deployment and the pods' `/metrics`, runs the built-in autoscaler, and re-applies the children
(server-side apply, field manager `dsv4-operator`, so drift and foreign writes are corrected too).
Nothing is written to the watched object except its status subresource (kopf's own bookkeeping
annotations aside, under the `serving.dsv4.dev` prefix).

**No finalizer.** kopf puts a finalizer on every object that has a `@kopf.timer`/`@kopf.daemon` (or a
non-optional delete handler), and that finalizer blocks `kubectl delete` for as long as the operator is
gone. The children need no cleanup (owner references: the garbage collector deletes them), so the
ticker is not a kopf timer: an event handler (which never needs a finalizer) keeps the latest copy of
every endpoint in memory, and one asyncio task started at operator startup ticks them all. A finalizer
left by an older version is removed by kopf on the next event, because no handler requires it.

Errors: an invalid or unservable spec is a status (`PlanValid=False`), one Warning event, and a kopf
`PermanentError` (no retries until the spec changes); API-server trouble (connection refused, 5xx,
429, 409) is a `TemporaryError` with exponential backoff (15 s doubling to 5 min) in the change
handlers and a skipped tick in the ticker, so an unavailable API server is survived without a crash.

Load this module with `kopf run -m dsv4.operator.handlers` or `dsv4 operator`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
import tempfile
import threading
import time
from collections import deque
from typing import Any

import kopf
from dsv4.operator import api, manifests, opmetrics, scrape
from dsv4.operator.autoscaler import Sample
from dsv4.operator.reconcile import PLAN_VALID, Observed, Result, autoscale, occupancy_fields, reconcile
from dsv4.operator.writer import autoscaler_current

TIMER_INTERVAL_S = float(os.environ.get("DSV4_OPERATOR_TIMER_INTERVAL", "15"))
METRICS_PORT = int(os.environ.get("DSV4_OPERATOR_METRICS_PORT", "8080"))
_SAMPLES: dict[str, deque[Sample]] = {}   # endpoint uid -> recent samples (in memory; restart = hold)
_MAX_SAMPLES = 4096
_ENDPOINTS: dict[str, dict[str, Any]] = {}  # endpoint uid -> latest object seen on the watch
_TICKER: dict[str, asyncio.Task] = {}
log = logging.getLogger("dsv4.operator")


def _env_flag(name: str, default: bool = True) -> bool:
    return os.environ.get(name, "true" if default else "false").strip().lower() in ("1", "true", "yes", "on")


# What the chart's RBAC lets the operator write (the chart sets these from rbac.monitoring / rbac.keda). Off:
# the operator never tries (no Forbidden loop); a keda endpoint then reports Degraded=KedaUnavailable.
def pod_monitors_allowed() -> bool:
    return _env_flag("DSV4_OPERATOR_POD_MONITORS")


def keda_allowed() -> bool:
    return _env_flag("DSV4_OPERATOR_KEDA")


# ---- kube I/O -----------------------------------------------------------------------------------
_CLIENT_LOCK = threading.Lock()
_DISCOVERY_LOCK = threading.Lock()
_CLIENTS: dict[str, Any] = {}


def _api_client():
    """One ApiClient per process (in-cluster config, else the kubeconfig)."""
    with _CLIENT_LOCK:
        if "api" not in _CLIENTS:
            from kubernetes import config
            from kubernetes.client import api_client

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _CLIENTS["api"] = api_client.ApiClient()
        return _CLIENTS["api"]


def _dyn():
    """The dynamic client, with a discovery cache file of this process's own (the default file is shared by
    every process talking to the same server, and a concurrent writer left it truncated: 'load cache error')."""
    client = _api_client()
    with _CLIENT_LOCK:
        if "dyn" not in _CLIENTS:
            from kubernetes import dynamic

            cache = os.path.join(tempfile.gettempdir(), f"dsv4-operator-discovery-{os.getpid()}.json")
            _CLIENTS["dyn"] = dynamic.DynamicClient(client, cache_file=cache)
        return _CLIENTS["dyn"]


def _resource(api_version: str, kind: str):
    """Discovery lookup, serialised: the dynamic client's discovery cache is one shared dict that a miss
    (e.g. PodMonitor without the prometheus-operator) invalidates and refetches, so two handler threads
    at once raised KeyError: 'resources' (found by the e2e suite)."""
    with _DISCOVERY_LOCK:
        dyn = _dyn()
        return dyn.resources.get(api_version=api_version, kind=kind)


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


OPTIONAL_KINDS = (("monitoring.coreos.com/v1", "PodMonitor", pod_monitors_allowed),
                  ("keda.sh/v1alpha1", "ScaledObject", keda_allowed))


def prune(name: str, namespace: str, uid: str, objs: list[dict[str, Any]]) -> None:
    """Delete optional children (PodMonitor, ScaledObject) this endpoint owns but no longer wants."""
    from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError, ResourceNotFoundError

    wanted = {(o["apiVersion"], o["kind"]) for o in objs}
    for api_version, kind, allowed in OPTIONAL_KINDS:
        if (api_version, kind) in wanted or not allowed():
            continue
        try:
            res = _resource(api_version, kind)
            obj = res.get(name=name, namespace=namespace).to_dict()
        except (ResourceNotFoundError, NotFoundError, ForbiddenError):
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
                   has_pod_monitor_crd=pod_monitors_allowed() and crd_exists("monitoring.coreos.com/v1", "PodMonitor"),
                   keda_available=keda_allowed() and crd_exists("keda.sh/v1alpha1", "ScaledObject"),
                   default_image=os.environ.get("DSV4_RUNTIME_IMAGE") or manifests.DEFAULT_IMAGE)
    return obs, ready


def is_transient(exc: BaseException) -> bool:
    """API-server trouble worth retrying: no connection, timeouts, 408/409/429/5xx."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status > 0:
        return status in (408, 409, 429) or status >= 500
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectionError", "TimeoutError", "MaxRetryError", "ProtocolError", "NewConnectionError",
                         "ReadTimeoutError", "HTTPError", "OSError"})


def backoff_s(retry: int) -> float:
    """Delay before retry number `retry` (0-based): 15 s doubling, at most 5 min."""
    return float(min(300, 15 * 2 ** max(0, min(retry, 10))))


def _post_event(obj: dict[str, Any], ev: tuple[str, str, str]) -> None:
    """A core/v1 Event about the endpoint, posted directly (the ticker runs outside kopf's handler context)."""
    from kubernetes import client

    meta = obj["metadata"]
    now = dt.datetime.now(dt.UTC)
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "type": ev[0], "reason": ev[1], "message": ev[2][:1024], "count": 1,
        "firstTimestamp": now, "lastTimestamp": now,
        "source": {"component": manifests.FIELD_MANAGER},
    }
    try:
        client.CoreV1Api(_api_client()).create_namespaced_event(meta["namespace"], body)
    except Exception as e:  # noqa: BLE001 - an event is best effort
        log.info("%s/%s: event %s not posted: %s", meta["namespace"], meta["name"], ev[1], e)


def _patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    from kubernetes import client

    client.CustomObjectsApi(_api_client()).patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status},
        _content_type="application/merge-patch+json")


# ---- one reconcile with I/O ---------------------------------------------------------------------
def _ep_labels(namespace: str, name: str) -> dict[str, str]:
    return {"dsv4_namespace": namespace, "dsv4_endpoint": name}


def reconcile_io(handler: str, name: str, namespace: str, uid: str, generation: int | None, spec: dict[str, Any],
                 status: dict[str, Any], autoscaler_replicas: int | None = None,
                 observed: Observed | None = None) -> Result:
    """Observe, reconcile (pure), apply; apply errors become Degraded=ApplyFailed in the result. Raises only
    for API-server trouble while observing (the caller retries)."""
    m = opmetrics.collectors()
    t0 = time.monotonic()
    result = "success"
    try:
        obs = observed or observe(name, namespace)[0]
        res = reconcile(name, namespace, uid, generation, spec, status, obs, time.time(), autoscaler_replicas)
        if res.objects:
            try:
                apply(res.objects)
                prune(name, namespace, uid, res.objects)
            except Exception as e:  # noqa: BLE001 - API errors: Degraded; the next tick re-applies
                obs.apply_error = f"{type(e).__name__}: {str(e)[:500]}"
                res = reconcile(name, namespace, uid, generation, spec, status, obs, time.time(), autoscaler_replicas)
                m["dsv4_operator_reconcile_errors_total"].labels(handler=handler, error=type(e).__name__).inc()
                result = "retry"
        elif res.error:
            result = "error"
        lb = _ep_labels(namespace, name)
        st = res.status
        if st.get("desiredReplicas") is not None:
            m["dsv4_operator_endpoint_desired_replicas"].labels(**lb).set(st["desiredReplicas"])
        m["dsv4_operator_endpoint_current_replicas"].labels(**lb).set(st.get("replicas") or 0)
        m["dsv4_operator_endpoint_ready_replicas"].labels(**lb).set(st.get("readyReplicas") or 0)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions", []))
        m["dsv4_operator_endpoint_ready"].labels(**lb).set(1 if ready else 0)
        return res
    except Exception as e:
        result = "error"
        m["dsv4_operator_reconcile_errors_total"].labels(handler=handler, error=type(e).__name__).inc()
        raise
    finally:
        m["dsv4_operator_reconciles_total"].labels(handler=handler, result=result).inc()
        m["dsv4_operator_reconcile_duration_seconds"].labels(handler=handler).observe(time.monotonic() - t0)


def _event(body: Any, ev: tuple[str, str, str]) -> None:
    kopf.event(body, type=ev[0], reason=ev[1], message=ev[2][:1024])


def _change(handler: str, body: Any, name: str, namespace: str, uid: str, meta: Any, spec: Any, status: Any,
            patch: kopf.Patch, retry: int) -> None:
    """create/update/resume: reconcile, write status and events; permanent error for an unservable spec."""
    try:
        res = reconcile_io(handler, name, namespace, uid, meta.get("generation"), copy.deepcopy(dict(spec)),
                           copy.deepcopy(dict(status or {})))
    except Exception as e:
        if is_transient(e):
            raise kopf.TemporaryError(f"{handler}: API server: {type(e).__name__}: {e}", delay=backoff_s(retry)) from e
        raise kopf.PermanentError(f"{handler}: {type(e).__name__}: {e}") from e
    patch.status.update(res.status)
    for ev in res.events:
        _event(body, ev)
    if res.error:  # PlanValid=False is in the status patch (kopf applies it); no retries until the spec changes
        pv = next((c for c in res.status.get("conditions", []) if c.get("type") == PLAN_VALID), {})
        raise kopf.PermanentError(f"{pv.get('reason', 'PlanInvalid')}: {res.error}")


# ---- handlers -----------------------------------------------------------------------------------
class _QuietTrack(logging.Filter):
    """Drop kopf's INFO line for every watch event the `track` handler sees (one per status write)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and "Handler 'track' succeeded" in record.getMessage())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Storage under serving.dsv4.dev (fixed before the first release: changing it later makes every
    object look unhandled), quiet log-to-event posting, long watches, and the metrics endpoint."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration")
    # No handler needs a finalizer; the name stays so kopf recognises (and removes) one an older version added.
    settings.persistence.finalizer = f"{api.GROUP}/kopf-finalizer"
    settings.posting.level = logging.WARNING
    kopf_log = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _QuietTrack) for f in kopf_log.filters):
        kopf_log.addFilter(_QuietTrack())
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    if METRICS_PORT > 0:
        try:
            opmetrics.serve(METRICS_PORT)
        except OSError as e:  # port taken (e.g. two operators in one test process): metrics off, not fatal
            log.warning("operator metrics not served on :%d (%s)", METRICS_PORT, e)


@kopf.on.startup()
async def start_ticker(**_: Any) -> None:
    if "task" not in _TICKER or _TICKER["task"].done():
        _TICKER["task"] = asyncio.get_running_loop().create_task(ticker(), name="dsv4-ticker")


@kopf.on.cleanup()
async def stop_ticker(**_: Any) -> None:
    task = _TICKER.pop("task", None)
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
def on_create(body, name, namespace, uid, meta, spec, status, patch, retry, **_: Any) -> None:
    _change("create", body, name, namespace, uid, meta, spec, status, patch, retry)


@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL)
def on_update(body, name, namespace, uid, meta, spec, status, patch, retry, **_: Any) -> None:
    _change("update", body, name, namespace, uid, meta, spec, status, patch, retry)


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
def on_resume(body, name, namespace, uid, meta, spec, status, patch, retry, **_: Any) -> None:
    opmetrics.collectors()["dsv4_operator_endpoints"].inc()
    _change("resume", body, name, namespace, uid, meta, spec, status, patch, retry)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def track(event, **_: Any) -> None:
    """Keep the latest copy of every endpoint for the ticker; forget deleted ones (children go with the
    owner through garbage collection). Event handlers never require a finalizer."""
    track_event(event)


def track_event(event: dict[str, Any]) -> None:
    obj = event.get("object") or {}
    meta = obj.get("metadata") or {}
    uid = meta.get("uid")
    if not uid:
        return
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        _ENDPOINTS.pop(uid, None)
        _SAMPLES.pop(uid, None)
    else:
        _ENDPOINTS[uid] = copy.deepcopy(dict(obj))


async def ticker() -> None:
    """Every TIMER_INTERVAL_S: tick each tracked endpoint (in worker threads, concurrently)."""
    while True:
        t0 = time.monotonic()
        objs = list(_ENDPOINTS.values())
        if objs:
            await asyncio.gather(*(asyncio.to_thread(tick_safe, o) for o in objs))
        await asyncio.sleep(max(1.0, TIMER_INTERVAL_S - (time.monotonic() - t0)))


def tick_safe(obj: dict[str, Any]) -> None:
    meta = obj.get("metadata") or {}
    try:
        tick(obj)
    except Exception as e:  # noqa: BLE001 - one endpoint's trouble never stops the ticker
        level = logging.INFO if is_transient(e) else logging.WARNING
        log.log(level, "%s/%s: tick failed (next in %.0f s): %s: %s", meta.get("namespace"), meta.get("name"),
                TIMER_INTERVAL_S, type(e).__name__, e)


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


def tick(obj: dict[str, Any]) -> None:
    """Refresh status from the cluster; scrape ready pods; run the built-in autoscaler; re-apply."""
    meta = obj["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    spec = copy.deepcopy(obj.get("spec") or {})
    now = time.time()
    try:
        parsed = api.parse_spec(spec)
    except Exception:  # noqa: BLE001
        return  # invalid: the create/update handler already reported PlanValid=False
    status = copy.deepcopy(obj.get("status") or {})
    obs, ready_pods = observe(name, namespace)
    samples = _SAMPLES.setdefault(uid, deque(maxlen=_MAX_SAMPLES))
    a = parsed.autoscaling
    if a is not None and a.metrics_source == "prometheus":
        try:
            have = {(s.pod, s.time) for s in samples}  # Prometheus returns the same scrape until the next one
            samples.extend(s for s in scrape.fetch_prometheus(a.prometheus_address, namespace, name, obs.ready_pods)
                           if (s.pod, s.time) not in have)
        except scrape.ScrapeError as e:  # no samples: the autoscaler holds (missing metrics)
            log.info("%s/%s: %s", namespace, name, e)
            opmetrics.collectors()["dsv4_operator_pod_scrape_errors_total"].labels(**_ep_labels(namespace, name)).inc()
    else:
        samples.extend(_scrape(ready_pods, namespace, name, now))
    horizon = now - max(600.0, parsed.autoscaling.stable_window_seconds if parsed.autoscaling else 0)
    while samples and samples[0].time < horizon:
        samples.popleft()
    autoscaler_replicas = None
    events: list[tuple[str, str, str]] = []
    lb = _ep_labels(namespace, name)
    m = opmetrics.collectors()
    if parsed.builtin_autoscaling:
        current = autoscaler_current(status.get("desiredReplicas"), obs.deployment, parsed.autoscaling.min_replicas)
        res = autoscale(parsed, status, current, obs, list(samples), now)
        d = res.decision
        autoscaler_replicas = d.desired
        status.update(res.status_update)
        m["dsv4_operator_scaling_decisions_total"].labels(**lb, direction=d.direction, reason=d.signal).inc()
        m["dsv4_operator_autoscaler_panic_mode"].labels(**lb).set(1 if d.panic else 0)
        m["dsv4_operator_endpoint_min_replicas"].labels(**lb).set(parsed.autoscaling.min_replicas)
        m["dsv4_operator_endpoint_max_replicas"].labels(**lb).set(parsed.autoscaling.max_replicas)
        for sig, v in d.signals.items():
            m["dsv4_operator_autoscaler_signal"].labels(**lb, signal=sig).set(v)
        m["dsv4_operator_autoscaler_target"].labels(**lb, signal="queue_depth").set(
            parsed.autoscaling.target_queue_depth)
        if res.event:
            events.append(res.event)
    else:
        recent = [s for s in samples if now - s.time <= 60]
        if recent:
            pools: dict[str, list[float]] = {}
            for s in recent:
                for k, v in s.pools.items():
                    pools.setdefault(k, []).append(v)
            status.update(occupancy_fields({k: round(sum(v) / len(v), 4) for k, v in pools.items()},
                                           sum(s.queue for s in recent) / len(recent)))
    # the reconcile starts from the autoscaler's status (the scaling history must carry over)
    res = reconcile_io("timer", name, namespace, uid, meta.get("generation"), spec, status, autoscaler_replicas,
                       observed=obs)
    final = {**status, **res.status}
    if final != (obj.get("status") or {}):  # unchanged (e.g. a steady invalid plan): no write, no watch event
        _patch_status(namespace, name, final)
    if uid in _ENDPOINTS:  # our own write: the next tick starts from it even before the watch event arrives
        _ENDPOINTS[uid] = {**_ENDPOINTS[uid], "status": final}
    for ev in events + res.events:
        _post_event(obj, ev)
