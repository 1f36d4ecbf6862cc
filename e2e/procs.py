"""Start, identify and stop local processes by their recorded PID.

A PID alone can be reused after its process exits, so every record also keeps the process's start
time (field 22 of /proc/PID/stat, in clock ticks since boot): a record matches a live process only
when both agree. Stopping sends SIGTERM to the process group (every process here is started in its
own session), waits, then SIGKILLs; zombies of our own children are reaped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcRecord:
    name: str
    pid: int
    start_ticks: int
    argv0: str
    log: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProcRecord:
        return cls(**d)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of PID, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def start_ticks(pid: int) -> int:
    st = _stat(pid)
    if st is None:
        raise ProcessLookupError(pid)
    return st[1]


def reap(pid: int) -> None:
    """Collect PID's exit status if it is our child (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_alive(rec: ProcRecord) -> bool:
    """True when the recorded process still runs (a zombie counts as gone)."""
    reap(rec.pid)
    st = _stat(rec.pid)
    return st is not None and st[1] == rec.start_ticks and st[0] not in ("Z", "X")


def spawn(name: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> tuple[subprocess.Popen, ProcRecord]:
    """Start ARGV in its own session with stdout+stderr appended to LOG; return the handle and its record."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    try:
        ticks = start_ticks(proc.pid)
    except ProcessLookupError:
        ticks = -1
    return proc, ProcRecord(name=name, pid=proc.pid, start_ticks=ticks, argv0=argv[0], log=str(log))


def stop(rec: ProcRecord, *, grace_s: float = 10.0) -> bool:
    """SIGTERM the process group of REC, wait up to GRACE_S, then SIGKILL. Returns True if it was running."""
    if not is_alive(rec):
        return False
    try:
        own_group = os.getpgid(rec.pid) == rec.pid
    except ProcessLookupError:
        return True
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            if own_group:
                os.killpg(rec.pid, sig)
            else:
                os.kill(rec.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not is_alive(rec):
                if own_group:  # stragglers left in the group (workers the leader did not stop)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(rec.pid, signal.SIGKILL)
                return True
            time.sleep(0.05)
    return True
