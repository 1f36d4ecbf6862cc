"""Peak resident memory of another process over a window of time (Linux `/proc/<pid>/status`).

`RssWatch(pid)` resets the process's high-water mark (`VmHWM`, by writing 5 to `/proc/<pid>/clear_refs`) when
the window starts and samples `VmRSS` in a thread while it lasts; `stop()` returns the larger of the sampled
peak and `VmHWM` (the kernel's exact peak, valid where the reset took effect). Elsewhere (no /proc) it reports
None.
"""

from __future__ import annotations

import threading
from pathlib import Path


def status_bytes(pid: int, key: str) -> int | None:
    """`VmRSS` / `VmHWM` / ... of `pid` in bytes, None where /proc has no such process or field."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


class RssWatch:
    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.start_rss = status_bytes(pid, "VmRSS")
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._peak = self.start_rss or 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-watch", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            rss = status_bytes(self.pid, "VmRSS")
            if rss is not None:
                self._peak = max(self._peak, rss)

    def stop(self) -> int | None:
        """Peak RSS in bytes over the window (None where it could not be read)."""
        self._done.set()
        self._thread.join()
        if self.start_rss is None:
            return None
        hwm = status_bytes(self.pid, "VmHWM") if self._hwm_reset else None
        return max(self._peak, hwm or 0)
