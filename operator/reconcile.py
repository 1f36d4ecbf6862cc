"""One level-based reconcile of a `DSV4Endpoint`, as pure functions over what the handlers observed.

`reconcile(...)` turns (spec, previous status, observed children) into the child objects to apply,
the status to write and the Events to post. `autoscale(...)` runs the autoscaler for one timer tick.
The kopf handlers (`handlers.py`) and the ticker (`ticker.py`) only read the cluster (`kube.py`), call these,
and write the results back.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from dsv4.operator import api, manifests
from dsv4.operator.api import DSV4EndpointSpec, DSV4EndpointStatus
from dsv4.operator.autoscaler import Decision, Sample, ScalerConfig, ScalerState, decide
from dsv4.operator.planner import Plan, PlanError, plan_cached
from dsv4.operator.replica_owner import foreign_scale_event
from pydantic import ValidationError

READY, PROGRESSING, DEGRADED, PLAN_VALID = "Ready", "Progressing", "Degraded", "PlanValid"


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Observed:
    """What the handlers read from the cluster for one endpoint."""

    deployment: dict[str, Any] | None = None   # the child Deployment as returned by the API (or None)
    ready_pods: list[str] = field(default_factory=list)
    pending_pods: int = 0                      # pods that exist but are not ready
    has_pod_monitor_crd: bool = False          # the CRD exists and the operator may write PodMonitors
    keda_available: bool = True                # the keda.sh CRDs exist and the operator may write ScaledObjects
    apply_error: str = ""                      # the previous apply failed with this
    default_image: str = manifests.DEFAULT_IMAGE  # the operator's DSV4_RUNTIME_IMAGE


@dataclass
class Result:
    objects: list[dict[str, Any]]
    status: dict[str, Any]                     # wire form (camelCase), for patch.status
    events: list[tuple[str, str, str]]         # (type Normal|Warning, reason, message)
    plan: Plan | None = None
    error: str = ""


def set_condition(conds: list[dict[str, Any]], type_: str, status: str, reason: str, message: str, now: float,
                  generation: int | None) -> list[dict[str, Any]]:
    """Replace condition `type_`, keeping lastTransitionTime when its status did not change."""
    old = next((c for c in conds if c.get("type") == type_), None)
    ltt = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") \
        else rfc3339(now)
    new = api.Condition(type=type_, status=status, reason=reason, message=message[:1024],
                        last_transition_time=ltt, observed_generation=generation).wire()
    return [c for c in conds if c.get("type") != type_] + [new]


def _deployment_counts(dep: dict[str, Any] | None) -> tuple[int, int, int, bool]:
    """(replicas, readyReplicas, updatedReplicas, failed) from a Deployment's status."""
    if not dep:
        return 0, 0, 0, False
    st = dep.get("status") or {}
    failed = any((c.get("type") == "Progressing" and c.get("status") == "False")
                 or (c.get("type") == "ReplicaFailure" and c.get("status") == "True")
                 for c in st.get("conditions") or [])
    return int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0), int(st.get("updatedReplicas") or 0), failed


def reconcile(name: str, namespace: str, uid: str, generation: int | None, raw_spec: dict[str, Any],
              raw_status: dict[str, Any] | None, observed: Observed, now: float,
              autoscaler_replicas: int | None = None) -> Result:
    """Desired children + status for the endpoint. Invalid specs give PlanValid=False and no objects
    (never an exception: an invalid custom object must not make the operator retry forever)."""
    prev = DSV4EndpointStatus.model_validate(raw_status or {})
    conds = [c.wire() for c in prev.conditions]
    ref = manifests.EndpointRef(name, namespace, uid)
    events: list[tuple[str, str, str]] = []
    status = prev.model_copy(update={"observed_generation": generation,
                                     "selector": manifests.selector_string(name)})
    spec: DSV4EndpointSpec | None = None
    try:
        problem = api.name_problem(name)
        if problem:
            raise PlanError("InvalidName", problem)
        spec = api.parse_spec(raw_spec)
        p = plan_cached(spec)
        failure = None
    except PlanError as e:
        failure = (e.reason, e.message)
    except ValidationError as e:
        failure = ("InvalidSpec", api.format_validation_error(e))
    except Exception as e:  # noqa: BLE001 - a planner bug must not crash-loop the operator: report it instead
        failure = ("PlanFailed", f"the planner failed: {type(e).__name__}: {e}")
    if failure is not None:
        reason, msg = failure
        was = next((c for c in conds if c.get("type") == PLAN_VALID), {})
        if was.get("status") != "False" or was.get("message") != msg[:1024]:
            events.append(("Warning", reason, msg))
        conds = set_condition(conds, PLAN_VALID, "False", reason, msg, now, generation)
        conds = set_condition(conds, READY, "False", "PlanInvalid", "the spec cannot be served; see PlanValid", now,
                              generation)
        conds = set_condition(conds, PROGRESSING, "False", "PlanInvalid", "nothing to roll out", now, generation)
        conds = set_condition(conds, DEGRADED, "True", reason, msg, now, generation)
        status = status.model_copy(update={"conditions": [api.Condition.model_validate(c) for c in conds]})
        return Result([], status.wire(), events, None, msg)
    assert spec is not None

    if autoscaler_replicas is None and spec.builtin_autoscaling and prev.desired_replicas is not None:
        autoscaler_replicas = prev.desired_replicas  # keep the autoscaler's last decision across spec edits
    objs = manifests.children(ref, spec, p, autoscaler_replicas=autoscaler_replicas,
                              with_pod_monitor=observed.has_pod_monitor_crd, default_image=observed.default_image)
    if spec.keda_autoscaling and not observed.keda_available:
        objs = [o for o in objs if o["kind"] != "ScaledObject"]
    desired = manifests.deployment_replicas(spec, p, autoscaler_replicas)
    foreign = foreign_scale_event(name, spec, desired, prev.desired_replicas, observed.deployment)
    if foreign:
        events.append(foreign)
    replicas, ready, updated, failed = _deployment_counts(observed.deployment)
    if desired is None:  # KEDA owns replicas: read what it chose
        desired = int(((observed.deployment or {}).get("spec") or {}).get("replicas") or p.initial_replicas)
    plan_msg = (f"TP{p.tensor_parallel_size}, {p.cache_policy} cache, {p.sessions_per_replica} sessions/replica, "
                f"max_model_len {p.max_model_len} (servable {p.max_servable_context})")
    was = next((c for c in conds if c.get("type") == PLAN_VALID), {})
    if was.get("status") != "True" or was.get("message") != plan_msg:
        events.append(("Normal", "Planned", plan_msg))
    conds = set_condition(conds, PLAN_VALID, "True", "Planned", plan_msg + "".join(f"; {w}" for w in p.warnings),
                          now, generation)
    if ready >= 1:
        conds = set_condition(conds, READY, "True", "ReplicasAvailable", f"{ready}/{desired} replicas ready", now,
                              generation)
    else:
        conds = set_condition(conds, READY, "False", "NoReadyReplicas", f"0/{desired} replicas ready", now, generation)
    rolling = observed.deployment is None or updated < desired or ready < desired or replicas > desired
    conds = set_condition(conds, PROGRESSING, "True" if rolling else "False",
                          "RollingOut" if rolling else "Complete",
                          f"{updated} updated, {ready} ready of {desired}", now, generation)
    if observed.apply_error:
        was = next((c for c in conds if c.get("type") == DEGRADED), {})
        if was.get("reason") != "ApplyFailed" or was.get("message") != observed.apply_error[:1024]:
            events.append(("Warning", "ApplyFailed", observed.apply_error))  # once per distinct error, not per tick
        conds = set_condition(conds, DEGRADED, "True", "ApplyFailed", observed.apply_error, now, generation)
    elif spec.keda_autoscaling and not observed.keda_available:
        msg = ("autoscaling.mode is keda but KEDA is unavailable: install KEDA (keda.sh CRDs) and the chart with "
               "rbac.keda=true; replicas stay as they are")
        was = next((c for c in conds if c.get("type") == DEGRADED), {})
        if was.get("reason") != "KedaUnavailable":
            events.append(("Warning", "KedaUnavailable", msg))
        conds = set_condition(conds, DEGRADED, "True", "KedaUnavailable", msg, now, generation)
    elif failed:
        conds = set_condition(conds, DEGRADED, "True", "DeploymentFailed",
                              "the Deployment reports ProgressDeadlineExceeded or ReplicaFailure", now, generation)
    else:
        conds = set_condition(conds, DEGRADED, "False", "AsExpected", "", now, generation)
    status = status.model_copy(update={
        "conditions": [api.Condition.model_validate(c) for c in conds],
        "replicas": replicas, "ready_replicas": ready, "desired_replicas": desired,
        "endpoint": manifests.endpoint_url(ref, spec), "plan": p.to_status(),
    })
    return Result(objs, status.wire(), events, p)


@dataclass
class AutoscaleResult:
    decision: Decision
    status_update: dict[str, Any]              # wire-form fields to merge into status
    event: tuple[str, str, str] | None


def autoscale(spec: DSV4EndpointSpec, raw_status: dict[str, Any] | None, current: int, observed: Observed,
              samples: list[Sample], now: float) -> AutoscaleResult:
    """One timer tick of the built-in autoscaler: decision, status fields (occupancy, history, state)."""
    assert spec.autoscaling is not None
    prev = DSV4EndpointStatus.model_validate(raw_status or {})
    cfg = ScalerConfig.from_spec(spec.autoscaling)
    st = prev.autoscaler or api.AutoscalerState()
    state = ScalerState(tuple((float(t), int(r)) for t, r in st.recommendations), st.panic_until)
    d = decide(now, current, observed.ready_pods, observed.pending_pods, samples, cfg, state)
    history = list(prev.scaling_history)
    event = None
    if d.direction != "none":
        history.append(api.ScalingDecision(time=rfc3339(now), from_replicas=d.current, to_replicas=d.desired,
                                           reason=d.reason[:512]))
        event = ("Normal", "ScaledUp" if d.direction == "up" else "ScaledDown",
                 f"{d.current} -> {d.desired}: {d.reason}")
    history = history[-api.MAX_SCALING_HISTORY:]
    pools = {k.removeprefix("pool_"): round(v, 4) for k, v in d.signals.items() if k.startswith("pool_")}
    update: dict[str, Any] = {
        "desiredReplicas": d.desired,
        "scalingHistory": [h.wire() for h in history],
        "autoscaler": api.AutoscalerState(recommendations=[[t, float(r)] for t, r in d.state.recommendations],
                                          panic_until=d.state.panic_until).wire(),
    }
    update.update(occupancy_fields(pools, d.signals.get("queue_depth")))
    return AutoscaleResult(d, update, event)


def occupancy_fields(pools: dict[str, float], queue: float | None) -> dict[str, Any]:
    """status.poolOccupancy / maxCacheOccupancy / queueDepth from mean per-pool occupancy."""
    if not pools:
        return {}
    top = max(sorted(pools), key=lambda k: pools[k])
    out: dict[str, Any] = {"poolOccupancy": pools, "maxCacheOccupancy": f"{top}={pools[top]:.2f}"}
    if queue is not None:
        out["queueDepth"] = round(queue, 3)
    return out
