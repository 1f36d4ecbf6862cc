"""What the pod runner knows about each pod and container, and the state file that survives a crash of it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dsv4.e2e import podnet, procs
from dsv4.e2e.podrunner.probes import ProbeState


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    """One container's current run, its probes and its restart history."""

    name: str
    spec: dict
    rec: procs.ProcRecord
    proc: subprocess.Popen | None
    started_at: str
    readiness: ProbeState
    liveness: ProbeState
    startup: ProbeState            # .ready: the container has started (no startup probe: at once)
    started_mono: float = 0.0      # monotonic start time of the current run
    exit_code: int | None = None   # the current run has ended
    finished_at: str | None = None
    terminated: dict | None = None       # `terminated` block of the run that ended last (exit code, log line)
    restart_count: int = 0
    crashes_in_a_row: int = 0
    restart_at: float | None = None      # backing off: monotonic time of the next start
    backoff_s: float = 0.0
    killing: str | None = None           # why we are stopping it (liveness/startup probe failed)

    @property
    def running(self) -> bool:
        return self.exit_code is None

    @property
    def backing_off(self) -> bool:
        return self.restart_at is not None

    @property
    def done(self) -> bool:
        """Exited and will not be started again."""
        return self.exit_code is not None and self.restart_at is None


@dataclass
class PodEntry:
    uid: str
    namespace: str
    name: str
    node: str
    pod: dict
    dir: Path
    net: podnet.PodNet | None = None
    containers: list[Container] = field(default_factory=list)
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    start_time: str = field(default_factory=now_rfc3339)
    vols: dict[str, str] = field(default_factory=dict)  # volume name -> local directory (for restarts)
    terminating: bool = False
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition -> (status, time)
    last_patch: str = ""
    sync_at: float | None = None  # when to resend the status (periodic re-sync; sooner after a failed patch)

    def record(self) -> dict:
        return {"namespace": self.namespace, "name": self.name, "node": self.node,
                "net": self.net.to_dict() if self.net else None, "dir": str(self.dir),
                "procs": [c.rec.to_dict() for c in self.containers]}


def save_state(work_dir: Path, entries: list[PodEntry]) -> None:
    """Write every pod's PIDs and network names to WORK_DIR/state.json (atomically)."""
    data = {"pods": {e.uid: e.record() for e in entries}}
    # a temp name of this thread's own: pods start on threads of their own, and two writers sharing one temp
    # file had the second rename fail (the first had moved it), failing that pod's start
    tmp = work_dir / f"state.json.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(work_dir / "state.json")


def cleanup_recorded(work_dir: Path) -> int:
    """Stop every process and remove every network namespace recorded in WORK_DIR/state.json."""
    f = Path(work_dir) / "state.json"
    if not f.exists():
        return 0
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError:
        return 0
    n = 0
    for entry in data.get("pods", {}).values():
        for r in entry.get("procs", []):
            if procs.stop(procs.ProcRecord.from_dict(r), grace_s=2.0):
                n += 1
        if entry.get("net"):
            podnet.destroy(podnet.from_dict(entry["net"]))
    f.write_text(json.dumps({"pods": {}}) + "\n")
    return n
