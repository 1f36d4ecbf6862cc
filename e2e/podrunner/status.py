"""The pod status a kubelet would report for a PodEntry: phase, IPs, conditions, container statuses."""

from __future__ import annotations

from dsv4.e2e import podnet
from dsv4.e2e.podrunner.state import PodEntry, now_rfc3339


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


def pod_status(e: PodEntry) -> dict:
    spec_containers = e.pod["spec"]["containers"]
    by_name = {c.name: c for c in e.containers}
    statuses = []
    for sc in spec_containers:
        c = by_name.get(sc["name"])
        st: dict = {"name": sc["name"], "image": sc.get("image", ""), "imageID": "", "restartCount": 0,
                    "ready": False, "started": False}
        if c is None:
            st["state"] = {"waiting": {"reason": e.reason or "ContainerCreating", "message": e.message or ""}}
        elif c.exit_code is None:
            st.update(ready=c.probe.ready, started=True, containerID=f"dsv4://{c.rec.pid}",
                      state={"running": {"startedAt": c.started_at}})
        else:
            st.update(containerID=f"dsv4://{c.rec.pid}", state={"terminated": {
                "exitCode": c.exit_code, "reason": "Completed" if c.exit_code == 0 else "Error",
                "startedAt": c.started_at, "finishedAt": c.finished_at}})
        statuses.append(st)
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
