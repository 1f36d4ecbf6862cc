"""Prometheus pod discovery from the API server: a `file_sd` file rewritten on every pod change.

Debian builds Prometheus without `kubernetes_sd_configs`, so this small process does its job: it lists
and watches every pod with the given kubeconfig and, after each event, rewrites the targets file
(atomically, only when it changed) from the pods that exist now (`prom.file_sd_targets`). A deleted or
replaced pod leaves the file with the event that removed it, so Prometheus never keeps a target that
outlives its pod. It lives as long as the Prometheus it feeds (`prom.Prometheus` starts and stops both).

    python -m dsv4.e2e.pod_sd --kubeconfig K --out targets/pods.json
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dsv4.e2e.prom import file_sd_targets

WATCH_TIMEOUT_S = 30


class PodTargets:
    """The current pods by uid, and the file they are written to."""

    def __init__(self, out: Path):
        self.out = out
        self.pods: dict[str, dict[str, Any]] = {}
        self._written: str | None = None

    def replace_all(self, items: list[dict[str, Any]]) -> None:
        self.pods = {p["metadata"]["uid"]: p for p in items}
        self.write()

    def apply(self, event_type: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if event_type == "DELETED":
            self.pods.pop(uid, None)
        else:
            self.pods[uid] = pod
        self.write()

    def write(self) -> None:
        text = json.dumps(file_sd_targets(list(self.pods.values())), sort_keys=True)
        if text == self._written:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.out)
        self._written = text


def follow(kubeconfig: str, targets: PodTargets, stop: threading.Event) -> None:
    """List, then watch; on any error (API server away, expired resourceVersion) list again."""
    from kubernetes import client, config, watch

    core = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    rv = None
    while not stop.is_set():
        try:
            if rv is None:
                lst = json.loads(core.list_pod_for_all_namespaces(_preload_content=False).data)
                targets.replace_all(lst["items"])
                rv = lst["metadata"]["resourceVersion"]
            for ev in watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=rv,
                                           timeout_seconds=WATCH_TIMEOUT_S, allow_watch_bookmarks=True):
                if stop.is_set():
                    return
                obj = ev["raw_object"]
                if ev["type"] == "ERROR":
                    rv = None
                    break
                rv = obj["metadata"].get("resourceVersion", rv)
                if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    targets.apply(ev["type"], obj)
        except Exception as exc:  # noqa: BLE001 - relist after a short pause
            print(f"[pod_sd {time.strftime('%H:%M:%S')}] relisting: {str(exc).splitlines()[0][:200]}", flush=True)
            rv = None
            stop.wait(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4.e2e.pod_sd", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = threading.Thread(target=follow, args=(args.kubeconfig, PodTargets(args.out), stop), daemon=True)
    worker.start()
    while worker.is_alive() and not stop.wait(0.5):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
