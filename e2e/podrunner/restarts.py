"""Container restarts as the kubelet does them: per restartPolicy, with exponential back-off
(10 s doubling up to 5 min; reset after a run of 10 min), the last exit kept as `lastState.terminated`
with the last line of the container's log as its message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKOFF_BASE_S = 10.0
BACKOFF_CAP_S = 300.0
BACKOFF_RESET_AFTER_S = 2 * BACKOFF_CAP_S  # a container that ran this long starts its back-off again
MESSAGE_MAX_CHARS = 1024


@dataclass(frozen=True)
class Backoff:
    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S

    def delay(self, crashes_in_a_row: int) -> float:
        """Wait before the next start after the CRASHES_IN_A_ROW-th consecutive exit (1 -> base)."""
        return min(self.cap_s, self.base_s * 2 ** max(0, crashes_in_a_row - 1))


def should_restart(restart_policy: str, exit_code: int) -> bool:
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def exit_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def last_log_line(log: str | Path, max_chars: int = MESSAGE_MAX_CHARS) -> str:
    """The last non-empty line of a container's log (what `kubectl logs --tail=1` would show), shortened."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            tail = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1][-max_chars:] if lines else ""


def terminated_state(exit_code: int, started_at: str, finished_at: str, message: str) -> dict:
    """A container status's `terminated` block (`state` while it stays down, `lastState` once restarted)."""
    out = {"exitCode": exit_code, "reason": exit_reason(exit_code), "startedAt": started_at,
           "finishedAt": finished_at}
    if message:
        out["message"] = message
    return out


def backoff_message(delay_s: float, container: str, pod: str, namespace: str, uid: str) -> str:
    return f"back-off {delay_s:g}s restarting failed container={container} pod={pod}_{namespace}({uid})"
