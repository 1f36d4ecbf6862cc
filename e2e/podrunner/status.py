"""The pod status a kubelet would report for a PodEntry: phase, IPs, conditions, container statuses."""

from __future__ import annotations

from dsv4.e2e import podnet
from dsv4.e2e.podrunner.restarts import backoff_message
from dsv4.e2e.podrunner.state import Container, PodEntry, now_rfc3339


def phase_after_exit(exit_codes: list[int], restart_policy: str) -> str:
    if all(c == 0 for c in exit_codes) and restart_policy in ("Never", "OnFailure"):
        return "Succeeded"
    return "Failed"


def _condition(e: PodEntry, ctype: str, ok: bool) -> dict:
    """A pod condition; its lastTransitionTime changes only when its status does (kept in E.transitions)."""
    s = "True" if ok else "False"
    prev = e.transitions.get(ctype)
    if prev is None or prev[0] != s:
        e.transitions[ctype] = (s, now_rfc3339())
    return {"type": ctype, "status": s, "lastTransitionTime": e.transitions[ctype][1], "lastProbeTime": None}


def container_status(e: PodEntry, spec: dict, c: Container | None) -> dict:
    """One entry of `containerStatuses`: state running / waiting (ContainerCreating, CrashLoopBackOff) /
    terminated, `lastState.terminated` of the previous run once restarted, restartCount, ready, started."""
    st: dict = {"name": spec["name"], "image": spec.get("image", ""), "imageID": "", "restartCount": 0,
                "ready": False, "started": False, "lastState": {}}
    if c is None:
        st["state"] = {"waiting": {"reason": e.reason or "ContainerCreating", "message": e.message or ""}}
        return st
    st.update(containerID=f"dsv4://{c.rec.pid}", restartCount=c.restart_count)
    if c.backing_off:
        st["state"] = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": backoff_message(c.backoff_s, c.name, e.name, e.namespace, e.uid)}}
        st["lastState"] = {"terminated": c.terminated}
    elif c.running:
        st.update(ready=c.readiness.ready and c.startup.ready, started=c.startup.ready,
                  state={"running": {"startedAt": c.started_at}})
        if c.restart_count and c.terminated:
            st["lastState"] = {"terminated": c.terminated}
    else:
        st["state"] = {"terminated": c.terminated}
    return st


def pod_status(e: PodEntry) -> dict:
    by_name = {c.name: c for c in e.containers}
    statuses = [container_status(e, sc, by_name.get(sc["name"])) for sc in e.pod["spec"]["containers"]]
    running = e.phase == "Running"
    all_ready = running and bool(statuses) and all(s["ready"] for s in statuses)
    status: dict = {
        "phase": e.phase,
        "hostIP": podnet.GATEWAY, "hostIPs": [{"ip": podnet.GATEWAY}],
        "startTime": e.start_time,
        "conditions": [
            _condition(e, "PodReadyToStartContainers", e.net is not None),
            _condition(e, "Initialized", bool(e.containers) or e.phase != "Pending"),
            _condition(e, "ContainersReady", all_ready),
            _condition(e, "Ready", all_ready),
            _condition(e, "PodScheduled", True),
        ],
        "containerStatuses": statuses,
    }
    if e.net is not None:
        status["podIP"] = e.net.ip
        status["podIPs"] = [{"ip": e.net.ip}]
    if e.reason:
        status["reason"] = e.reason
    if e.message:
        status["message"] = e.message
    return status
