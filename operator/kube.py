"""The operator's Kubernetes client calls: apply and prune children, observe them, post Events, write status.

This module is the only writer of a `DSV4Endpoint`'s status (`write_status`, a merge patch to `/status`) and
the only poster of its Events (`post_event`, source `dsv4-operator`). Everything here is I/O; what to write is
decided by the pure functions in `reconcile.py`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import threading
from typing import Any

from dsv4.operator import api, manifests
from dsv4.operator.reconcile import Observed

log = logging.getLogger("dsv4.operator")


def _env_flag(name: str, default: bool = True) -> bool:
    return os.environ.get(name, "true" if default else "false").strip().lower() in ("1", "true", "yes", "on")


# What the chart's RBAC lets the operator write (the chart sets these from rbac.monitoring / rbac.keda). Off:
# the operator never tries (no Forbidden loop); a keda endpoint then reports Degraded=KedaUnavailable.
def pod_monitors_allowed() -> bool:
    return _env_flag("DSV4_OPERATOR_POD_MONITORS")


def keda_allowed() -> bool:
    return _env_flag("DSV4_OPERATOR_KEDA")


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


def network_policy_defaults() -> manifests.NetworkPolicyDefaults:
    """The chart's networkPolicy values, passed to the operator as environment variables."""
    return manifests.NetworkPolicyDefaults(
        enabled=_env_flag("DSV4_OPERATOR_NETWORK_POLICY", default=False),
        operator_namespace=os.environ.get("POD_NAMESPACE") or None,
        prometheus_namespace=os.environ.get("DSV4_OPERATOR_PROMETHEUS_NAMESPACE") or None)


OPTIONAL_KINDS = (("monitoring.coreos.com/v1", "PodMonitor", pod_monitors_allowed),
                  ("keda.sh/v1alpha1", "ScaledObject", keda_allowed),
                  ("networking.k8s.io/v1", "NetworkPolicy", lambda: True))


def prune(name: str, namespace: str, uid: str, objs: list[dict[str, Any]]) -> None:
    """Delete optional children (PodMonitor, ScaledObject, NetworkPolicy) this endpoint owns but no longer wants."""
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
    """The endpoint's Deployment, pods, ReplicaSets (and their Warning events when one is short of pods);
    returns (Observed, ready pod objects)."""
    from kubernetes.dynamic.exceptions import NotFoundError

    try:
        dep = _resource("apps/v1", "Deployment").get(name=name, namespace=namespace).to_dict()
    except NotFoundError:
        dep = None
    selector = manifests.selector_string(name)
    pods = _resource("v1", "Pod").get(namespace=namespace, label_selector=selector).to_dict()["items"]
    replica_sets = _resource("apps/v1", "ReplicaSet").get(namespace=namespace,
                                                          label_selector=selector).to_dict()["items"]
    events = []
    if any(int((rs.get("spec") or {}).get("replicas") or 0) > int((rs.get("status") or {}).get("replicas") or 0)
           for rs in replica_sets):  # a ReplicaSet short of pods: its FailedCreate events say why
        events = _resource("v1", "Event").get(
            namespace=namespace, field_selector="involvedObject.kind=ReplicaSet,type=Warning").to_dict()["items"]
        names = {(rs.get("metadata") or {}).get("name") for rs in replica_sets}
        events = [e for e in events if (e.get("involvedObject") or {}).get("name") in names]
    ready, pending = [], 0
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        conds = (pod.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds):
            ready.append(pod)
        else:
            pending += 1
    obs = Observed(deployment=dep, pods=pods, replica_sets=replica_sets, events=events,
                   ready_pods=[p["metadata"]["name"] for p in ready], pending_pods=pending,
                   has_pod_monitor_crd=pod_monitors_allowed() and crd_exists("monitoring.coreos.com/v1", "PodMonitor"),
                   keda_available=keda_allowed() and crd_exists("keda.sh/v1alpha1", "ScaledObject"),
                   default_image=os.environ.get("DSV4_RUNTIME_IMAGE") or manifests.DEFAULT_IMAGE,
                   network=network_policy_defaults())
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


def post_event(obj: dict[str, Any], ev: tuple[str, str, str]) -> None:
    """A core/v1 Event about the endpoint, reported by the operator (source `dsv4-operator`)."""
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


def write_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Merge-patch the endpoint's status subresource: the one place status is written."""
    from kubernetes import client

    client.CustomObjectsApi(_api_client()).patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status},
        _content_type="application/merge-patch+json")


def write_scale(namespace: str, name: str, replicas: int, only_if_absent: bool) -> None:
    """Set `spec.replicas` through the endpoint's `/scale` subresource, judged against the object as stored now
    (the caller's copy may be older than a user's `kubectl scale`) and with its resourceVersion as precondition:
    a concurrent write makes this one fail with 409 instead of undoing it."""
    from kubernetes import client

    objs = client.CustomObjectsApi(_api_client())
    current = objs.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    have = (current.get("spec") or {}).get("replicas")
    if have == replicas or (only_if_absent and have is not None):
        return
    body = {"apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": name, "namespace": namespace,
                         "resourceVersion": current["metadata"]["resourceVersion"]},
            "spec": {"replicas": int(replicas)}}
    objs.replace_namespaced_custom_object_scale(api.GROUP, api.VERSION, namespace, api.PLURAL, name, body,
                                                field_manager=manifests.FIELD_MANAGER)
