"""A container's process: started under `nsenter` in the pod's network namespace, preStop hooks, stop."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from dsv4.e2e import podnet, procs
from dsv4.e2e.podrunner.env import container_argv, container_env
from dsv4.e2e.podrunner.objects import ObjectReader
from dsv4.e2e.podrunner.paths import container_mounts, rewrite_paths
from dsv4.e2e.podrunner.probes import probe_port
from dsv4.e2e.podrunner.state import PodEntry


def log(msg: str) -> None:
    print(f"[podrunner {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def log_path(e: PodEntry, container: str, *, previous: bool = False) -> Path:
    """Where a container's output goes: <pod dir>/logs/<container>.log (the run before: .previous.log)."""
    return e.dir / "logs" / f"{container}{'.previous' if previous else ''}.log"


def spawn(e: PodEntry, c: dict, vols: dict[str, str], objects: ObjectReader, venv_bin: str, *,
          rotate_log: bool = False) -> tuple[subprocess.Popen, procs.ProcRecord]:
    """Start container C of pod E with its output in `log_path`; ROTATE_LOG (a restart) first moves the
    previous run's log aside."""
    mounts = container_mounts(c, vols)
    env = container_env(e, c, mounts, objects, venv_bin)
    argv = container_argv(c, env, mounts)
    cwd = e.dir
    if c.get("workingDir"):
        wd = Path(rewrite_paths(c["workingDir"], mounts))
        cwd = wd if wd.is_dir() else e.dir
    assert e.net is not None
    log_file = log_path(e, c["name"])
    if rotate_log and log_file.exists():
        log_file.replace(log_path(e, c["name"], previous=True))
    log(f"{e.namespace}/{e.name}[{c['name']}] at {e.net.ip}: {' '.join(argv)[:300]}")
    return procs.spawn(f"{e.namespace}/{e.name}/{c['name']}", podnet.enter_argv(e.net) + argv, log_file, env=env,
                       cwd=cwd)


def kill(e: PodEntry, grace_s: float) -> None:
    """SIGTERM every live container of E (in parallel), SIGKILL after GRACE_S; reap our children."""
    threads = [threading.Thread(target=procs.stop, args=(c.rec,), kwargs={"grace_s": grace_s})
               for c in e.containers if procs.is_alive(c.rec)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in e.containers:
        if c.proc is not None:
            with contextlib.suppress(Exception):
                c.proc.wait(timeout=0.1)


def pre_stop(e: PodEntry, deadline: float) -> None:
    """Run each container's preStop hook (sleep, exec, httpGet) within the grace period."""
    for c in e.containers:
        hook = ((c.spec.get("lifecycle") or {}).get("preStop")) or {}
        left = max(0.0, deadline - time.monotonic())
        try:
            if "sleep" in hook:
                time.sleep(min(left, float(hook["sleep"]["seconds"])))
            elif "exec" in hook and e.net is not None:
                subprocess.run(podnet.enter_argv(e.net) + hook["exec"]["command"], timeout=left or 0.1,
                               capture_output=True, cwd=e.dir)
            elif "httpGet" in hook and e.net is not None:
                h = hook["httpGet"]
                url = f"http://{h.get('host') or e.net.ip}:{probe_port(h.get('port'), c.spec)}{h.get('path', '/')}"
                with contextlib.suppress(OSError, urllib.error.URLError):
                    urllib.request.urlopen(url, timeout=left or 0.1).close()
        except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
            log(f"{e.namespace}/{e.name}[{c.name}] preStop failed: {exc}")
