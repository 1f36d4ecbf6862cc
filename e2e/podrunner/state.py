"""What the pod runner knows about each pod and container, and the state file that survives a crash of it."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dsv4.e2e import podnet, procs
from dsv4.e2e.podrunner.probes import ProbeState


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    name: str
    spec: dict
    rec: procs.ProcRecord
    proc: subprocess.Popen | None
    started_at: str
    probe: ProbeState
    exit_code: int | None = None
    finished_at: str | None = None


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
    tmp = work_dir / "state.json.tmp"
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
