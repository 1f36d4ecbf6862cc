"""The level-based reconcile and the autoscaler tick as pure functions (the kopf handlers only do I/O)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from dsv4.operator import api
from dsv4.operator.autoscaler import Sample
from dsv4.operator.reconcile import Observed, autoscale, reconcile
from dsv4.operator.replica_owner import ScaleWrite

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())["spec"]


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def deployment(replicas: int, ready: int, updated: int | None = None, spec_replicas: int | None = None,
               failed: bool = False) -> dict[str, Any]:
    conds = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}] if failed else []
    return {"spec": {"replicas": spec_replicas if spec_replicas is not None else replicas},
            "status": {"replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas if updated is None else updated, "conditions": conds}}


def test_invalid_plan_sets_planvalid_false_creates_nothing_and_warns_once() -> None:
    spec = example("invalid-pro-on-h100.yaml")
    r = reconcile("too-big", "ns", "uid", 1, spec, None, Observed(), 100.0)
    assert r.objects == [] and r.plan is None
    pv = cond(r.status, "PlanValid")
    assert pv["status"] == "False" and pv["reason"] == "WeightsDoNotFit" and "H100" in pv["message"]
    assert cond(r.status, "Ready")["status"] == "False" and cond(r.status, "Degraded")["status"] == "True"
    assert r.status["observedGeneration"] == 1
    assert [(t, reason) for t, reason, _ in r.events] == [("Warning", "WeightsDoNotFit")]
    again = reconcile("too-big", "ns", "uid", 1, spec, r.status, Observed(), 200.0)
    assert again.events == []  # same problem: no repeated event
    assert cond(again.status, "PlanValid")["lastTransitionTime"] == pv["lastTransitionTime"]


def test_schema_invalid_spec_is_reported_not_raised() -> None:
    spec = example("short-chat.yaml")
    spec["autoscaling"]["minReplicas"] = 9  # > maxReplicas
    r = reconcile("chat", "ns", "uid", 4, spec, None, Observed(), 0.0)
    pv = cond(r.status, "PlanValid")
    assert (pv["status"], pv["reason"]) == ("False", "InvalidSpec") and "maxReplicas" in pv["message"]
    spec = example("short-chat.yaml")
    spec["profile"]["name"] = "nope"
    r = reconcile("chat", "ns", "uid", 5, spec, None, Observed(), 0.0)
    assert "spec.profile.name" in cond(r.status, "PlanValid")["message"]


def test_valid_spec_lifecycle_conditions() -> None:
    spec = example("long-context-agent.yaml")
    r = reconcile("agents", "ns", "uid", 2, spec, None, Observed(), 10.0)
    assert [o["kind"] for o in r.objects] == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    st = r.status
    assert cond(st, "PlanValid")["status"] == "True" and cond(st, "Ready")["status"] == "False"
    assert cond(st, "Progressing")["status"] == "True"
    assert st["selector"] == "dsv4.io/endpoint=agents,app.kubernetes.io/component=engine"
    assert st["endpoint"] == "http://agents.ns.svc:8000/v1"
    assert st["plan"]["tensorParallelSize"] == r.plan.tensor_parallel_size and st["desiredReplicas"] == 2
    assert ("Normal", "Planned") == r.events[0][:2]
    # rollout finished
    done = reconcile("agents", "ns", "uid", 2, spec, st, Observed(deployment=deployment(2, 2)), 20.0)
    assert cond(done.status, "Ready")["status"] == "True" and cond(done.status, "Progressing")["status"] == "False"
    assert cond(done.status, "Degraded")["status"] == "False" and done.status["readyReplicas"] == 2
    assert done.events == []  # nothing new to say
    # the Deployment gives up
    bad = reconcile("agents", "ns", "uid", 2, spec, done.status, Observed(deployment=deployment(2, 1, failed=True)),
                    30.0)
    degraded = cond(bad.status, "Degraded")  # the Deployment's own reason, not a generic one
    assert (degraded["status"], degraded["reason"]) == ("True", "ProgressDeadlineExceeded")
    assert degraded["message"].startswith("Deployment ")
    # status validates against the model that generates the CRD
    api.DSV4EndpointStatus.model_validate(bad.status)


def test_pod_monitor_follows_crd_presence_and_apply_errors_degrade() -> None:
    spec = example("long-context-agent.yaml")
    r = reconcile("agents", "ns", "uid", 1, spec, None, Observed(has_pod_monitor_crd=True), 0.0)
    assert "PodMonitor" in [o["kind"] for o in r.objects]
    r = reconcile("agents", "ns", "uid", 1, spec, None, Observed(apply_error="Forbidden: x"), 0.0)
    assert cond(r.status, "Degraded")["reason"] == "ApplyFailed"


def test_spec_edit_keeps_the_autoscalers_replicas() -> None:
    spec = example("short-chat.yaml")
    first = reconcile("chat", "ns", "uid", 1, spec, None, Observed(), 0.0, autoscaler_replicas=6)
    dep = next(o for o in first.objects if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 6 and first.status["desiredReplicas"] == 6
    spec["image"] = "ghcr.io/dsv4/dsv4:v2"
    edit = reconcile("chat", "ns", "uid", 2, spec, first.status, Observed(), 5.0)
    assert next(o for o in edit.objects if o["kind"] == "Deployment")["spec"]["replicas"] == 6


def test_autoscale_tick_records_history_occupancy_and_state() -> None:
    spec = api.parse_spec(example("short-chat.yaml"))
    status: dict[str, Any] = {}
    pods = ["a", "b"]
    samples = [Sample(t, p, {"csa": 0.95, "swa": 0.3}, 1.0) for t in range(0, 121, 5) for p in pods]
    obs = Observed(ready_pods=pods)
    res = autoscale(spec, status, 2, obs, samples, 120.0)
    assert res.decision.desired == 3 and res.event[1] == "ScaledUp"
    up = res.status_update
    assert up["poolOccupancy"] == {"csa": 0.95, "swa": 0.3} and up["maxCacheOccupancy"] == "csa=0.95"
    assert up["scalingHistory"][-1]["toReplicas"] == 3 and "pool_csa" in up["scalingHistory"][-1]["reason"]
    status.update(up)
    for i in range(8):  # history keeps the last five
        res = autoscale(spec, status, 2 + i % 2, obs, samples, 130.0 + i)
        status.update(res.status_update)
    assert len(status["scalingHistory"]) <= api.MAX_SCALING_HISTORY
    assert status["autoscaler"]["recommendations"]
    api.DSV4EndpointStatus.model_validate(status)


def test_image_defaults_to_the_operators_runtime_image() -> None:
    spec = example("long-context-agent.yaml")
    r = reconcile("agents", "ns", "uid", 1, spec, None, Observed(default_image="reg.local/dsv4:1.2"), 0.0)
    dep = next(o for o in r.objects if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.local/dsv4:1.2"
    spec["image"] = "mine:1"
    r = reconcile("agents", "ns", "uid", 1, spec, None, Observed(default_image="reg.local/dsv4:1.2"), 0.0)
    assert next(o for o in r.objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "image"] == "mine:1"


def test_spec_replicas_is_kept_present_for_the_scale_subresource() -> None:
    """GET .../scale needs .spec.replicas in every mode: the reconcile says what to write there."""
    auto = example("short-chat.yaml")  # builtin autoscaling, no spec.replicas
    r = reconcile("chat", "ns", "uid", 1, auto, None, Observed(), 0.0, autoscaler_replicas=3)
    assert r.status["desiredReplicas"] == 3 and r.scale == ScaleWrite(3, only_if_absent=False)
    auto["replicas"] = 3  # the mirror is current: nothing to write
    assert reconcile("chat", "ns", "uid", 1, auto, r.status, Observed(), 1.0, autoscaler_replicas=3).scale is None
    # spec.replicas is an output under autoscaling: not a plan input, not the Deployment's count
    auto["replicas"] = 7
    r = reconcile("chat", "ns", "uid", 1, auto, r.status, Observed(), 2.0, autoscaler_replicas=3)
    assert next(o for o in r.objects if o["kind"] == "Deployment")["spec"]["replicas"] == 3 and r.scale.replicas == 3
    keda = example("short-chat.yaml")
    keda["autoscaling"]["mode"] = "keda"
    dep = {"spec": {"replicas": 5}, "status": {"replicas": 5}}
    r = reconcile("chat", "ns", "uid", 1, keda, None, Observed(deployment=dep), 0.0)
    assert r.status["desiredReplicas"] == 5 and r.scale == ScaleWrite(5, only_if_absent=False)  # KEDA's
    fixed = example("long-context-agent.yaml")
    fixed.pop("autoscaling", None)
    fixed.pop("replicas", None)
    r = reconcile("agents", "ns", "uid", 1, fixed, None, Observed(), 0.0)
    assert r.scale == ScaleWrite(r.plan.initial_replicas, only_if_absent=True)  # once, then the user's
    fixed["replicas"] = 4
    assert reconcile("agents", "ns", "uid", 1, fixed, None, Observed(), 0.0).scale is None
