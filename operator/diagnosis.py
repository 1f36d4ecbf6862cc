"""Why an endpoint's pods are not running, named from what Kubernetes reports (pure).

`diagnose(pods, replica_sets, events, deployment)` reads the objects as the API returns them (dicts, camelCase)
and returns the most specific cause, or None when nothing is wrong. Order: a container that cannot run
(crash loop, image pull, missing Secret) says more than a pod the scheduler cannot place, which says more than
a pod the ReplicaSet could not even create (quota, missing PriorityClass), which says more than the Deployment's
generic `ProgressDeadlineExceeded`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
MAX_LOG_LINE = 300


@dataclass(frozen=True)
class Cause:
    reason: str    # CamelCase, for a condition's reason
    message: str   # what a user reads in `kubectl describe`


def last_log_line(termination_message: str | None) -> str:
    """The last non-empty line of a termination message (with FallbackToLogsOnError: the log's tail)."""
    lines = [ln.strip() for ln in (termination_message or "").splitlines() if ln.strip()]
    return lines[-1][-MAX_LOG_LINE:] if lines else ""


def _name(obj: dict[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name", "?")


def _live(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]


def _crash(pod: dict[str, Any], cs: dict[str, Any]) -> Cause | None:
    waiting = (cs.get("state") or {}).get("waiting") or {}
    terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
    crash_looping = waiting.get("reason") == "CrashLoopBackOff"
    failed_now = bool((cs.get("state") or {}).get("terminated")) and terminated.get("exitCode", 0) != 0
    if not (crash_looping or failed_now):
        return None
    what = (f"pod {_name(pod)}: container {cs.get('name')} keeps crashing ({cs.get('restartCount', 0)} restarts)"
            if crash_looping else f"pod {_name(pod)}: container {cs.get('name')} failed")
    if terminated:
        what += f"; last exit code {terminated.get('exitCode')}"
        if terminated.get("reason"):
            what += f" ({terminated['reason']})"
    line = last_log_line(terminated.get("message"))
    if line:
        what += f"; last log line: {line}"
    return Cause("CrashLoopBackOff" if crash_looping else "ContainerFailed", what)


_SECRET_MISSING = re.compile(r'secret "([^"]+)" not found|couldn\'t find key (\S+) in Secret', re.IGNORECASE)


def _container_problem(pod: dict[str, Any]) -> Cause | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        crash = _crash(pod, cs)
        if crash:
            return crash
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason, msg = waiting.get("reason", ""), waiting.get("message", "")
        if reason in IMAGE_PULL_REASONS:
            return Cause("ImagePullBackOff", f"pod {_name(pod)}: image {cs.get('image', '?')} cannot be pulled "
                                             f"({reason}){': ' + msg if msg else ''}")
        if reason in CONFIG_REASONS:
            missing_secret = reason == "CreateContainerConfigError" and _SECRET_MISSING.search(msg)
            return Cause("SecretNotFound" if missing_secret else reason,
                         f"pod {_name(pod)}: container {cs.get('name')} cannot start: {msg or reason}")
    return None


_PVC_MISSING = re.compile(r'persistentvolumeclaim "([^"]+)" not found', re.IGNORECASE)


def _unschedulable(pod: dict[str, Any]) -> Cause | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            msg = c.get("message") or "no node fits the pod"
            reason = "PersistentVolumeClaimNotFound" if _PVC_MISSING.search(msg) else "Unschedulable"
            return Cause(reason, f"pod {_name(pod)} cannot be scheduled: {msg}")
    return None


def classify_failed_create(message: str) -> str:
    """A ReplicaSet's FailedCreate message → a specific reason."""
    low = message.lower()
    if "exceeded quota" in low or "forbidden: failed quota" in low:
        return "QuotaExceeded"
    if "priorityclass" in low and "not found" in low or "no priorityclass with name" in low:
        return "PriorityClassNotFound"
    if "persistentvolumeclaim" in low and "not found" in low:
        return "PersistentVolumeClaimNotFound"
    return "FailedCreate"


def _failed_create(replica_sets: list[dict[str, Any]], events: list[dict[str, Any]]) -> Cause | None:
    for rs in replica_sets:
        for c in (rs.get("status") or {}).get("conditions") or []:
            if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
                msg = c.get("message") or c.get("reason") or "pods cannot be created"
                return Cause(classify_failed_create(msg), f"ReplicaSet {_name(rs)} cannot create pods: {msg}")
    # events outlive the problem (an hour): only those of a ReplicaSet that is still short of pods count
    short = {_name(rs) for rs in replica_sets
             if int((rs.get("spec") or {}).get("replicas") or 0) > int((rs.get("status") or {}).get("replicas") or 0)}
    failed = [e for e in events if e.get("reason") == "FailedCreate" and e.get("type") == "Warning"
              and (e.get("involvedObject") or {}).get("name") in short]
    if failed:
        last = max(failed, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        msg = last.get("message") or "pods cannot be created"
        return Cause(classify_failed_create(msg),
                     f"ReplicaSet {(last.get('involvedObject') or {}).get('name', '?')} cannot create pods: {msg}")
    return None


def _deployment_failed(deployment: dict[str, Any] | None) -> Cause | None:
    for c in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("status") == "False":
            return Cause(c.get("reason") or "ProgressDeadlineExceeded",
                         f"Deployment {_name(deployment or {})}: {c.get('message') or 'rollout stalled'}")
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            msg = c.get("message") or "pods cannot be created"
            return Cause(classify_failed_create(msg), f"Deployment {_name(deployment or {})}: {msg}")
    return None


def diagnose(pods: list[dict[str, Any]], replica_sets: list[dict[str, Any]], events: list[dict[str, Any]],
             deployment: dict[str, Any] | None) -> Cause | None:
    """The most specific reason the endpoint's pods are not all running, or None."""
    live = _live(pods)
    for check in (_container_problem, _unschedulable):
        causes = [c for c in (check(p) for p in live) if c]
        if causes:
            more = f" (and {len(causes) - 1} more pods)" if len(causes) > 1 else ""
            return Cause(causes[0].reason, causes[0].message + more)
    return _failed_create(replica_sets, events) or _deployment_failed(deployment)
