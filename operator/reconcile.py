"""One level-based reconcile of a `DSV4Endpoint`, as pure functions over what the handlers observed.

`reconcile(...)` turns (spec, previous status, observed children) into the child objects to apply,
the status to write and the Events to post. `autoscale(...)` runs the autoscaler for one timer tick.
The kopf handlers (`handlers.py`) and the ticker (`ticker.py`) only read the cluster (`kube.py`), call these,
and write the results back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv4.operator import api, manifests
from dsv4.operator.api import DSV4EndpointSpec, DSV4EndpointStatus
from dsv4.operator.autoscaler import Decision, Sample, ScalerConfig, ScalerState, decide
from dsv4.operator.diagnosis import diagnose
from dsv4.operator.planner import Plan, PlanError, plan_cached
from dsv4.operator.replica_owner import ScaleWrite, foreign_scale_event, spec_replicas_to_write
from pydantic import ValidationError

READY, PROGRESSING, DEGRADED, PLAN_VALID = "Ready", "Progressing", "Degraded", "PlanValid"


@dataclass
class Observed:
    """What the handlers read from the cluster for one endpoint."""

    deployment: dict[str, Any] | None = None   # the child Deployment as returned by the API (or None)
    pods: list[dict[str, Any]] = field(default_factory=list)          # the endpoint's pods, as the API returns them
    replica_sets: list[dict[str, Any]] = field(default_factory=list)  # the Deployment's ReplicaSets
    events: list[dict[str, Any]] = field(default_factory=list)        # Warning events of those ReplicaSets
    ready_pods: list[str] = field(default_factory=list)
    pending_pods: int = 0                      # pods that exist but are not ready
    has_pod_monitor_crd: bool = False          # the CRD exists and the operator may write PodMonitors
    keda_available: bool = True                # the keda.sh CRDs exist and the operator may write ScaledObjects
    apply_error: str = ""                      # the previous apply failed with this
    default_image: str = manifests.DEFAULT_IMAGE  # the operator's DSV4_RUNTIME_IMAGE
    network: manifests.NetworkPolicyDefaults = field(default_factory=manifests.NetworkPolicyDefaults)


@dataclass
class Result:
    objects: list[dict[str, Any]]
    status: dict[str, Any]                     # wire form (camelCase), for patch.status
    events: list[tuple[str, str, str]]         # (type Normal|Warning, reason, message)
    plan: Plan | None = None
    error: str = ""
    scale: ScaleWrite | None = None            # write spec.replicas through /scale (replica_owner.py)


def set_condition(conds: list[dict[str, Any]], type_: str, status: str, reason: str, message: str, now: float,
                  generation: int | None) -> list[dict[str, Any]]:
    """Replace condition `type_`, keeping lastTransitionTime when its status did not change."""
    old = next((c for c in conds if c.get("type") == type_), None)
    ltt = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") \
        else api.rfc3339(now)
    new = api.Condition(type=type_, status=status, reason=reason, message=message[:1024],
                        last_transition_time=ltt, observed_generation=generation).wire()
    return [c for c in conds if c.get("type") != type_] + [new]


def _deployment_counts(dep: dict[str, Any] | None) -> tuple[int, int, int]:
    """(replicas, readyReplicas, updatedReplicas) from a Deployment's status."""
    st = (dep or {}).get("status") or {}
    return int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0), int(st.get("updatedReplicas") or 0)


# The plan's choices a replan reports old -> new (status.planHistory, the Planned event). layout and
# dataParallelSize default to tp / 1 in a status written before they existed, so a TP plan is no change.
PLAN_CHOICES = ("layout", "tensorParallelSize", "dataParallelSize", "cachePolicy", "hcaState", "batchingDelayMs",
                "maxNumBatchedTokens", "chunkedPrefillSize", "maxModelLen", "maxServableContext", "sessionsPerReplica",
                "initialReplicas")


def plan_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """`choice: old -> new` for each choice that differs between two `status.plan`s (none without an old plan)."""
    if not old:
        return []
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in PLAN_CHOICES if old.get(k) != new.get(k)]


def _changed(conds: list[dict[str, Any]], type_: str, reason: str, message: str) -> bool:
    was = next((c for c in conds if c.get("type") == type_), {})
    return was.get("reason") != reason or was.get("message") != message[:1024]


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
        status = status.model_copy(update={"conditions": [api.Condition.model_validate(c) for c in conds],
                                           "reason": reason, "plan_summary": ""})
        return Result([], status.wire(), events, None, msg)
    assert spec is not None

    if autoscaler_replicas is None and spec.builtin_autoscaling and prev.desired_replicas is not None:
        autoscaler_replicas = prev.desired_replicas  # keep the autoscaler's last decision across spec edits
    objs = manifests.children(ref, spec, p, autoscaler_replicas=autoscaler_replicas,
                              with_pod_monitor=observed.has_pod_monitor_crd, default_image=observed.default_image,
                              network=observed.network)
    if spec.keda_autoscaling and not observed.keda_available:
        objs = [o for o in objs if o["kind"] != "ScaledObject"]
    desired = manifests.deployment_replicas(spec, p, autoscaler_replicas)
    foreign = foreign_scale_event(name, spec, desired, prev.desired_replicas, observed.deployment)
    if foreign:
        events.append(foreign)
    replicas, ready, updated = _deployment_counts(observed.deployment)
    if desired is None:  # KEDA owns replicas: read what it chose
        desired = int(((observed.deployment or {}).get("spec") or {}).get("replicas") or p.initial_replicas)
    plan_msg = (f"{p.parallelism.label}, {p.cache_policy} cache, {p.sessions_per_replica} sessions/replica, "
                f"max_model_len {p.max_model_len} (servable {p.max_servable_context})")
    new_plan = p.to_status().wire()
    old_plan = prev.plan.wire() if prev.plan else None
    changes = plan_changes(old_plan, new_plan)
    plan_history = list(prev.plan_history)
    was = next((c for c in conds if c.get("type") == PLAN_VALID), {})
    if changes:
        events.append(("Normal", "Planned", f"replanned: {'; '.join(changes)} (now {plan_msg})"))
        plan_history.append(api.PlanChange(time=api.rfc3339(now), observed_generation=generation, changes=changes))
    elif was.get("status") != "True" or old_plan is None:
        events.append(("Normal", "Planned", plan_msg))
    conds = set_condition(conds, PLAN_VALID, "True", "Planned", plan_msg + "".join(f"; {w}" for w in p.warnings),
                          now, generation)
    cause = diagnose(observed.pods, observed.replica_sets, observed.events, observed.deployment)
    if ready >= 1:
        conds = set_condition(conds, READY, "True", "ReplicasAvailable", f"{ready}/{desired} replicas ready", now,
                              generation)
    elif cause:
        conds = set_condition(conds, READY, "False", cause.reason, f"0/{desired} replicas ready: {cause.message}",
                              now, generation)
    else:
        conds = set_condition(conds, READY, "False", "NoReadyReplicas", f"0/{desired} replicas ready", now, generation)
    rolling = observed.deployment is None or updated < desired or ready < desired or replicas > desired
    conds = set_condition(conds, PROGRESSING, "True" if rolling else "False",
                          "RollingOut" if rolling else "Complete",
                          f"{updated} updated, {ready} ready of {desired}", now, generation)
    if observed.apply_error:
        if _changed(conds, DEGRADED, "ApplyFailed", observed.apply_error):  # once per distinct error, not per tick
            events.append(("Warning", "ApplyFailed", observed.apply_error))
        conds = set_condition(conds, DEGRADED, "True", "ApplyFailed", observed.apply_error, now, generation)
    elif spec.keda_autoscaling and not observed.keda_available:
        msg = ("autoscaling.mode is keda but KEDA is unavailable: install KEDA (keda.sh CRDs) and the chart with "
               "rbac.keda=true; replicas stay as they are")
        was = next((c for c in conds if c.get("type") == DEGRADED), {})
        if was.get("reason") != "KedaUnavailable":
            events.append(("Warning", "KedaUnavailable", msg))
        conds = set_condition(conds, DEGRADED, "True", "KedaUnavailable", msg, now, generation)
    elif cause:
        was = next((c for c in conds if c.get("type") == DEGRADED), {})
        if was.get("reason") != cause.reason:  # once per cause (the message's restart count changes every crash)
            events.append(("Warning", cause.reason, cause.message))
        conds = set_condition(conds, DEGRADED, "True", cause.reason, cause.message, now, generation)
    else:
        conds = set_condition(conds, DEGRADED, "False", "AsExpected", "", now, generation)
    status = status.model_copy(update={
        "conditions": [api.Condition.model_validate(c) for c in conds],
        "replicas": replicas, "ready_replicas": ready, "desired_replicas": desired,
        "endpoint": manifests.endpoint_url(ref, spec), "plan": p.to_status(),
        "replica_counts": f"{ready}/{desired}", "plan_summary": plan_msg,
        "reason": next((c["reason"] for c in conds if c.get("type") == DEGRADED and c.get("status") == "True"), ""),
        "plan_history": plan_history[-api.MAX_PLAN_HISTORY:],
    })
    return Result(objs, status.wire(), events, p, scale=spec_replicas_to_write(spec, desired))


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
    state = ScalerState(tuple((api.parse_rfc3339(r.time), r.replicas) for r in st.recommendations),
                        api.parse_rfc3339(st.panic_until) if st.panic_until else None)
    d = decide(now, current, observed.ready_pods, observed.pending_pods, samples, cfg, state)
    history = list(prev.scaling_history)
    event = None
    if d.direction != "none":
        history.append(api.ScalingDecision(time=api.rfc3339(now), from_replicas=d.current, to_replicas=d.desired,
                                           reason=d.reason[:512]))
        event = ("Normal", "ScaledUp" if d.direction == "up" else "ScaledDown",
                 f"{d.current} -> {d.desired}: {d.reason}")
    history = history[-api.MAX_SCALING_HISTORY:]
    pools = {k.removeprefix("pool_"): round(v, 4) for k, v in d.signals.items() if k.startswith("pool_")}
    update: dict[str, Any] = {
        "desiredReplicas": d.desired,
        "scalingHistory": [h.wire() for h in history],
        "autoscaler": api.AutoscalerState(
            recommendations=[api.Recommendation(time=api.rfc3339(t, ms=True), replicas=int(r))
                             for t, r in d.state.recommendations],
            panic_until=api.rfc3339(d.state.panic_until, ms=True) if d.state.panic_until else None).wire(),
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
