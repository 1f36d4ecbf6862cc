"""Conditions that name the cause: `diagnose` over pods, ReplicaSets and events shaped as the API server returns
them (copied from `kubectl get -o json` of real failures), and the conditions/events `reconcile` makes of it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from dsv4.operator import api
from dsv4.operator.diagnosis import Cause, classify_failed_create, diagnose, last_log_line
from dsv4.operator.reconcile import Observed, plan_changes, reconcile

ROOT = Path(__file__).resolve().parents[1]


def pod(name: str, container_status: dict[str, Any] | None = None, conditions: list[dict[str, Any]] | None = None,
        phase: str = "Running") -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if container_status is not None:
        st["containerStatuses"] = [container_status]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "labels": {"dsv4.io/endpoint": "chat"}}, "status": st}


CRASH_LOOP = {
    "name": "dsv4", "image": "ghcr.io/dsv4/dsv4:0.4.0", "ready": False, "restartCount": 4, "started": False,
    "state": {"waiting": {"reason": "CrashLoopBackOff",
                          "message": "back-off 1m20s restarting failed container=dsv4 pod=chat-6d9f-abcde_ns(uid)"}},
    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": "2026-12-02T04:00:00Z",
                                 "finishedAt": "2026-12-02T04:00:03Z",
                                 "message": "INFO loading config /etc/dsv4/config.yaml\n"
                                            "ERROR model path /models/config.json does not exist\n"}},
}
IMAGE_PULL = {
    "name": "dsv4", "image": "ghcr.io/dsv4/dsv4:nope", "ready": False, "restartCount": 0,
    "state": {"waiting": {"reason": "ImagePullBackOff",
                          "message": 'Back-off pulling image "ghcr.io/dsv4/dsv4:nope"'}},
}
SECRET_MISSING = {
    "name": "dsv4", "image": "ghcr.io/dsv4/dsv4:0.4.0", "ready": False, "restartCount": 0,
    "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "chat-key" not found'}},
}
UNSCHEDULABLE = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                  "lastTransitionTime": "2026-12-02T04:00:00Z",
                  "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
                             "available: 3 No preemption victims found for incoming pod."}]
RUNNING = {"name": "dsv4", "image": "x", "ready": True, "restartCount": 0,
           "state": {"running": {"startedAt": "2026-12-02T04:00:00Z"}}}


def replica_set(name: str, want: int, have: int, failure: str | None = None) -> dict[str, Any]:
    conds = [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": failure,
              "lastTransitionTime": "2026-12-02T04:00:00Z"}] if failure else []
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": name, "namespace": "ns"},
            "spec": {"replicas": want}, "status": {"replicas": have, "conditions": conds}}


def failed_create_event(rs: str, message: str, when: str = "2026-12-02T04:00:05Z") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedCreate", "message": message,
            "involvedObject": {"kind": "ReplicaSet", "name": rs, "namespace": "ns"},
            "source": {"component": "replicaset-controller"}, "count": 7, "lastTimestamp": when}


def test_crash_loop_names_container_exit_code_and_last_log_line() -> None:
    cause = diagnose([pod("chat-6d9f-abcde", CRASH_LOOP)], [], [], None)
    assert cause is not None and cause.reason == "CrashLoopBackOff"
    assert "container dsv4" in cause.message and "4 restarts" in cause.message
    assert "last exit code 1 (Error)" in cause.message
    assert cause.message.endswith("last log line: ERROR model path /models/config.json does not exist")


def test_a_container_that_failed_once_is_named_before_the_back_off_starts() -> None:
    st = copy.deepcopy(CRASH_LOOP)
    st["state"] = {"terminated": st.pop("lastState")["terminated"]}
    cause = diagnose([pod("p", st)], [], [], None)
    assert cause is not None and cause.reason == "ContainerFailed" and "exit code 1" in cause.message


def test_a_restarted_container_that_runs_again_is_healthy() -> None:
    st = {**copy.deepcopy(CRASH_LOOP), "state": RUNNING["state"], "ready": True}
    assert diagnose([pod("p", st, [{"type": "Ready", "status": "True"}])], [], [], None) is None


def test_image_pull_and_missing_secret() -> None:
    cause = diagnose([pod("p", IMAGE_PULL)], [], [], None)
    assert cause == Cause("ImagePullBackOff", 'pod p: image ghcr.io/dsv4/dsv4:nope cannot be pulled '
                                              '(ImagePullBackOff): Back-off pulling image "ghcr.io/dsv4/dsv4:nope"')
    cause = diagnose([pod("p", SECRET_MISSING)], [], [], None)
    assert cause is not None and cause.reason == "SecretNotFound" and 'secret "chat-key" not found' in cause.message


def test_unschedulable_quotes_the_scheduler_and_a_missing_pvc_is_named() -> None:
    cause = diagnose([pod("p", None, UNSCHEDULABLE, phase="Pending")], [], [], None)
    assert cause is not None and cause.reason == "Unschedulable"
    assert "0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in cause.message
    pvc = [{**UNSCHEDULABLE[0], "message": 'persistentvolumeclaim "weights" not found'}]
    assert diagnose([pod("p", None, pvc, phase="Pending")], [], [], None).reason == "PersistentVolumeClaimNotFound"


def test_several_failing_pods_are_counted_and_the_container_problem_wins() -> None:
    pods = [pod("a", None, UNSCHEDULABLE, "Pending"), pod("b", CRASH_LOOP), pod("c", CRASH_LOOP)]
    cause = diagnose(pods, [], [], None)
    assert cause.reason == "CrashLoopBackOff" and cause.message.endswith("(and 1 more pods)")


def test_terminating_pods_are_ignored() -> None:
    gone = pod("old", CRASH_LOOP)
    gone["metadata"]["deletionTimestamp"] = "2026-12-02T04:00:00Z"
    assert diagnose([gone], [], [], None) is None


def test_replicaset_failed_create_quota_and_priority_class() -> None:
    quota = ('pods "chat-6d9f-x2x7l" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=2, '
             'used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8')
    cause = diagnose([], [replica_set("chat-6d9f", 1, 0, quota)], [], None)
    assert cause.reason == "QuotaExceeded" and "exceeded quota: gpu-quota" in cause.message
    pc = 'pods "chat-6d9f-" is forbidden: no PriorityClass with name inference-high was found'
    # no condition (yet): the ReplicaSet's FailedCreate event says it
    cause = diagnose([], [replica_set("chat-6d9f", 1, 0)], [failed_create_event("chat-6d9f", pc)], None)
    assert cause.reason == "PriorityClassNotFound" and "inference-high" in cause.message
    # the event outlives the problem: a ReplicaSet with all its pods is not degraded by it
    assert diagnose([], [replica_set("chat-6d9f", 1, 1)], [failed_create_event("chat-6d9f", pc)], None) is None
    assert classify_failed_create("admission webhook denied the request") == "FailedCreate"


def test_last_log_line() -> None:
    assert last_log_line("a\nb\n\n") == "b" and last_log_line(None) == "" and len(last_log_line("x" * 999)) == 300


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())["spec"]


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_reconcile_reports_the_cause_in_ready_and_degraded_and_warns_once_per_cause() -> None:
    spec = example("long-context-agent.yaml")
    dep = {"metadata": {"name": "agents"}, "spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 0}}
    obs = Observed(deployment=dep, pods=[pod("agents-1", CRASH_LOOP)])
    r = reconcile("agents", "ns", "uid", 1, spec, None, obs, 10.0)
    deg, ready = cond(r.status, "Degraded"), cond(r.status, "Ready")
    assert (deg["status"], deg["reason"]) == ("True", "CrashLoopBackOff") and "last log line: ERROR" in deg["message"]
    assert (ready["status"], ready["reason"]) == ("False", "CrashLoopBackOff")
    assert ready["message"].startswith("0/2 replicas ready: pod agents-1")
    assert [e[:2] for e in r.events if e[0] == "Warning"] == [("Warning", "CrashLoopBackOff")]
    more = copy.deepcopy(CRASH_LOOP)
    more["restartCount"] = 5
    again = reconcile("agents", "ns", "uid", 1, spec, r.status, Observed(deployment=dep, pods=[pod("agents-1", more)]),
                      20.0)
    assert "5 restarts" in cond(again.status, "Degraded")["message"] and not again.events
    fixed = reconcile("agents", "ns", "uid", 1, spec, again.status,
                      Observed(deployment=dep, pods=[pod("agents-1", RUNNING)]), 30.0)
    assert (cond(fixed.status, "Degraded")["status"], cond(fixed.status, "Degraded")["reason"]) == ("False",
                                                                                                  "AsExpected")


def test_replan_reports_old_to_new_in_the_event_and_plan_history() -> None:
    spec = example("long-context-agent.yaml")
    first = reconcile("agents", "ns", "uid", 1, spec, None, Observed(), 10.0)
    assert first.status["planHistory"] == [] and [e[1] for e in first.events] == ["Planned"]
    old_delay = first.status["plan"]["batchingDelayMs"]
    spec["overrides"] = {"batchingDelayMs": 7.5}
    second = reconcile("agents", "ns", "uid", 2, spec, first.status, Observed(), 20.0)
    (ev,) = [e for e in second.events if e[1] == "Planned"]
    assert f"batchingDelayMs: {old_delay} -> 7.5" in ev[2] and ev[2].startswith("replanned: ")
    (entry,) = second.status["planHistory"]
    assert entry["time"] == "1970-01-01T00:00:20Z" and entry["observedGeneration"] == 2
    assert f"batchingDelayMs: {old_delay} -> 7.5" in entry["changes"]
    same = reconcile("agents", "ns", "uid", 2, spec, second.status, Observed(), 30.0)
    assert same.events == [] and len(same.status["planHistory"]) == 1
    api.DSV4EndpointStatus.model_validate(same.status)


def test_status_from_before_layouts_is_no_replan_and_a_layout_change_is() -> None:
    spec = example("long-context-agent.yaml")
    spec["accelerator"]["type"] = "H200"
    spec["overrides"] = {**spec.get("overrides", {}), "layout": "tp"}  # a status written before layouts was TP
    first = reconcile("agents", "ns", "uid", 1, spec, None, Observed(), 10.0)
    assert first.status["plan"]["parallelism"] == "TP8"
    old = {**first.status, "plan": {k: v for k, v in first.status["plan"].items()
                                    if k not in ("layout", "parallelism", "dataParallelSize")}}
    again = reconcile("agents", "ns", "uid", 1, spec, old, Observed(), 20.0)
    assert again.events == [] and again.status["planHistory"] == []
    spec["accelerator"]["type"] = "B200"  # DP8+EP there
    del spec["overrides"]["layout"]
    moved = reconcile("agents", "ns", "uid", 2, spec, again.status, Observed(), 30.0)
    (entry,) = moved.status["planHistory"]
    assert entry["changes"][:3] == ["layout: tp -> dp-ep", "tensorParallelSize: 8 -> 1", "dataParallelSize: 1 -> 8"]


def test_plan_changes_lists_only_changed_choices() -> None:
    assert plan_changes(None, {"tensorParallelSize": 2}) == []
    assert plan_changes({"tensorParallelSize": 2, "cachePolicy": "full"},
                        {"tensorParallelSize": 4, "cachePolicy": "full"}) == ["tensorParallelSize: 2 -> 4"]


def test_autoscaler_state_is_readable_and_old_epoch_state_still_parses() -> None:
    st = api.AutoscalerState.model_validate({"recommendations": [[1764648000.25, 3.0]], "panicUntil": 1764648060.0})
    assert st.wire() == {"recommendations": [{"time": "2025-12-02T04:00:00.250Z", "replicas": 3}],
                         "panicUntil": "2025-12-02T04:01:00.000Z"}
    assert api.parse_rfc3339(st.recommendations[0].time) == 1764648000.25
