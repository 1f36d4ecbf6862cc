"""PodRunner: plays the kubelet for every pod bound to one of the managed kwok nodes.

1. **Sandbox**: a network namespace with a veth pair (`dsv4.e2e.podnet`) and a pod IP from the node's
   podCIDR, so the pod IP is a real address the tests own.
2. **Volumes** (`volumes.py`, `paths.py`): written into a per-pod directory; every mountPath in the
   command, args, env values and workingDir is rewritten to the directory that backs it.
3. **Processes** (`lifecycle.py`, `env.py`): init containers run to completion in order, then every
   container's `command` + `args` runs inside the namespace via `nsenter`, with the host environment
   overlaid by the container's env/envFrom. The image is not used; a container without a `command`
   fails the pod with a clear reason.
4. **Status** (`status.py`, `probes.py`, `restarts.py`): phase Running with podIP/hostIP once started;
   readiness mirrors the readinessProbe (Ready at once without one); a startupProbe gates the others; a
   failed startup or liveness probe stops the container. An exited container restarts per restartPolicy
   with the kubelet's back-off (CrashLoopBackOff, restartCount, lastState.terminated with the last log
   line); one that is not restarted ends the pod (Failed, or Succeeded when all exited 0 under
   Never/OnFailure). Each pod's status is resent every 10 s (a failed patch every second) until the pod
   is gone, as a kubelet re-syncs: a change made during an API-server outage, or overwritten by the node
   controller, lands. `kubelet_api.py` serves the containers' logs to kube-apiserver (`kubectl logs`).
5. **Deletion**: on a deletionTimestamp: preStop hooks, SIGTERM to each container's process group,
   SIGKILL after the grace period, then the pod object is deleted with grace 0 (as the kubelet does)
   and the namespace removed.

Every pod's PIDs and network names are recorded in `<work dir>/state.json` (`state.py`), so
`cleanup_recorded()` can stop them even if this process was killed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from dsv4.e2e import podnet, procs
from dsv4.e2e.podrunner import lifecycle, restarts, volumes
from dsv4.e2e.podrunner.kubelet_api import KubeletAPI, LogSource
from dsv4.e2e.podrunner.lifecycle import log as _log
from dsv4.e2e.podrunner.objects import ObjectReader
from dsv4.e2e.podrunner.probes import ProbeState, probe_once
from dsv4.e2e.podrunner.state import Container, PodEntry, cleanup_recorded, now_rfc3339, save_state
from dsv4.e2e.podrunner.status import phase_after_exit, pod_status

SMP = "application/strategic-merge-patch+json"
PATCH_RETRY_S = 1.0  # resend a failed status patch after this long (the API server may be restarting)
STATUS_RESYNC_S = 10.0  # and resend every pod's status this often, as the kubelet's status manager does


def allocate_ip(cidr: str, used: set[str]) -> str:
    """First free host address of CIDR, skipping .0/.1 (network, gateway-like) and the broadcast."""
    net = ipaddress.ip_network(cidr, strict=False)
    for host in list(net.hosts())[1:]:
        if str(host) not in used:
            return str(host)
    raise RuntimeError(f"podCIDR {cidr} is exhausted ({len(used)} addresses in use)")


# ---------------------------------------------------------------------------------------------------------
# the runner


class PodRunner:
    def __init__(self, kubeconfig: str, work_dir: Path, node_cidrs: dict[str, str],
                 backoff: restarts.Backoff | None = None):
        from kubernetes import client, config

        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.node_cidrs = node_cidrs
        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.watch_api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.objects = ObjectReader(self.core)
        self.pods: dict[str, PodEntry] = {}
        self.used_ips: set[str] = set()
        self.finished: set[str] = set()  # uids already torn down (late watch events must not restart them)
        self.lock = threading.RLock()
        self.stop_flag = threading.Event()
        self.venv_bin = str(Path(sys.executable).parent)
        self.backoff = backoff or restarts.Backoff()

    # -- bookkeeping ----------------------------------------------------------------------------------

    def _save(self) -> None:
        with self.lock:  # one writer at a time: the last state written is the latest
            save_state(self.work_dir, list(self.pods.values()))

    def _patch_status(self, e: PodEntry, force: bool = False) -> None:
        status = pod_status(e)
        key = json.dumps(status, sort_keys=True)
        if key == e.last_patch and not force:
            return
        try:
            self.core.patch_namespaced_pod_status(e.name, e.namespace, {"status": status}, _content_type=SMP)
            e.last_patch, e.sync_at = key, time.monotonic() + STATUS_RESYNC_S
        except Exception as exc:  # noqa: BLE001 - retried by tick() unless the pod is gone
            gone = getattr(exc, "status", None) == 404
            e.sync_at = None if gone else time.monotonic() + PATCH_RETRY_S
            _log(f"{e.namespace}/{e.name}: status patch failed{'' if gone else ', will retry'}: "
                 f"{str(exc).splitlines()[0][:200]}")

    # -- pod start ------------------------------------------------------------------------------------

    def start_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        node = pod["spec"]["nodeName"]
        with self.lock:
            if uid in self.pods:
                return
            ip = allocate_ip(self.node_cidrs[node], self.used_ips)
            self.used_ips.add(ip)
            e = PodEntry(uid=uid, namespace=meta["namespace"], name=meta["name"], node=node, pod=pod,
                         dir=self.work_dir / f"{meta['namespace']}_{meta['name']}_{uid[:8]}")
            self.pods[uid] = e
        threading.Thread(target=self._start_pod, args=(e, ip), name=f"start-{e.name}", daemon=True).start()

    def _start_pod(self, e: PodEntry, ip: str) -> None:
        try:
            e.dir.mkdir(parents=True, exist_ok=True)
            e.net = podnet.create(e.uid, ip)
            self._save()
            vols = volumes.materialise(e, self.objects)
            volumes.rewrite_volume_files(e, vols)
            for ic in e.pod["spec"].get("initContainers") or []:
                proc, rec = lifecycle.spawn(e, ic, vols, self.objects, self.venv_bin)
                rc = proc.wait()
                if rc != 0:
                    raise RuntimeError(f"init container {ic['name']!r} exited with {rc}")
            e.vols = vols
            for c in e.pod["spec"]["containers"]:
                if e.terminating:
                    return
                proc, rec = lifecycle.spawn(e, c, vols, self.objects, self.venv_bin)
                now = time.monotonic()
                with self.lock:
                    e.containers.append(Container(
                        name=c["name"], spec=c, rec=rec, proc=proc, started_at=now_rfc3339(), started_mono=now,
                        readiness=ProbeState.start(c.get("readinessProbe"), now),
                        liveness=ProbeState.start(c.get("livenessProbe"), now),
                        startup=ProbeState.start(c.get("startupProbe"), now)))
                self._save()
            with self.lock:
                if e.phase == "Pending":
                    e.phase = "Running"
            self._patch_status(e)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the pod's status
            _log(f"{e.namespace}/{e.name}: failed to start: {exc}")
            with self.lock:
                e.phase, e.reason, e.message = "Failed", "PodRunnerError", str(exc)[:1000]
            lifecycle.kill(e, grace_s=0.5)
            self._patch_status(e, force=True)

    # -- probes and exits -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Resend due statuses; for each running pod: notice exits (restart per restartPolicy with back-off, or
        end the pod), start containers whose back-off is over, run due probes; patch status on any change.

        Like the kubelet's status manager, every pod's status is resent periodically (and a failed patch
        after a second): a Ready transition during an API-server outage is not lost, and a Ready=False the
        node controller wrote while the node's heartbeats could not reach the API server is corrected."""
        now = time.monotonic()
        with self.lock:
            entries = [e for e in self.pods.values() if e.phase == "Running" and not e.terminating]
            due = [e for e in self.pods.values() if e.sync_at is not None and e.sync_at <= now and not e.terminating]
        for e in due:
            self._patch_status(e, force=True)
        for e in entries:
            changed = False
            for c in e.containers:
                if c.backing_off:
                    if time.monotonic() >= c.restart_at:
                        self._restart(e, c)
                        changed = True
                elif c.running:
                    changed |= self._check_exit(e, c)
            if any(c.done for c in e.containers):
                self._end_pod(e)
                continue
            for c in e.containers:
                if c.running and not c.killing:
                    changed |= self._probe(e, c)
            if changed:
                self._patch_status(e)

    def _check_exit(self, e: PodEntry, c: Container) -> bool:
        """True when C's process has exited: records the exit and schedules a restart if the policy says so."""
        # poll() before anything else reaps the child, so the real exit status is kept
        rc = c.proc.poll() if c.proc is not None else (None if procs.is_alive(c.rec) else 137)
        if rc is None:
            return False
        code = 128 - rc if rc < 0 else rc  # killed by signal N: 128+N, as the kubelet reports
        c.exit_code, c.finished_at = code, now_rfc3339()
        c.terminated = restarts.terminated_state(code, c.started_at, c.finished_at, restarts.last_log_line(c.rec.log))
        c.readiness.ready = False
        why = f" ({c.killing})" if c.killing else ""
        if restarts.should_restart(e.pod["spec"].get("restartPolicy", "Always"), code):
            ran_s = time.monotonic() - c.started_mono
            c.crashes_in_a_row = 1 if ran_s >= restarts.BACKOFF_RESET_AFTER_S else c.crashes_in_a_row + 1
            c.backoff_s = self.backoff.delay(c.crashes_in_a_row)
            c.restart_at = time.monotonic() + c.backoff_s
            _log(f"{e.namespace}/{e.name}[{c.name}] exited with {code}{why}; restart in {c.backoff_s:g} s; "
                 f"log {c.rec.log}")
        else:
            _log(f"{e.namespace}/{e.name}[{c.name}] exited with {code}{why}; log {c.rec.log}")
        return True

    def _restart(self, e: PodEntry, c: Container) -> None:
        """Start C again (same spec and volumes); the previous run's log is kept for `logs --previous`."""
        if e.terminating:
            return
        try:
            proc, rec = lifecycle.spawn(e, c.spec, e.vols, self.objects, self.venv_bin, rotate_log=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a ConfigMap gone: back off again, as the kubelet does
            c.crashes_in_a_row += 1
            c.backoff_s = self.backoff.delay(c.crashes_in_a_row)
            c.restart_at = time.monotonic() + c.backoff_s
            c.terminated = {**(c.terminated or {}), "message": f"restart failed: {exc}"[:restarts.MESSAGE_MAX_CHARS]}
            _log(f"{e.namespace}/{e.name}[{c.name}] restart failed: {exc}")
            return
        now = time.monotonic()
        with self.lock:
            if e.terminating:  # deleted while we were starting it: _terminate may have looked already
                threading.Thread(target=procs.stop, args=(rec,), kwargs={"grace_s": 1.0}, daemon=True).start()
                return
            c.proc, c.rec, c.started_at, c.started_mono = proc, rec, now_rfc3339(), now
            c.exit_code = c.finished_at = c.restart_at = c.killing = None
            c.restart_count += 1
            c.readiness = ProbeState.start(c.spec.get("readinessProbe"), now)
            c.liveness = ProbeState.start(c.spec.get("livenessProbe"), now)
            c.startup = ProbeState.start(c.spec.get("startupProbe"), now)
        self._save()

    def _end_pod(self, e: PodEntry) -> None:
        """A container exited for good: stop the others and end the pod (Failed, or Succeeded when all exited 0
        under restartPolicy Never/OnFailure)."""
        others = [c for c in e.containers if not c.done]
        lifecycle.kill(e, grace_s=2.0)
        for c in others:
            c.exit_code, c.finished_at, c.restart_at = 137, now_rfc3339(), None
            c.terminated = restarts.terminated_state(137, c.started_at, c.finished_at,
                                                     restarts.last_log_line(c.rec.log))
        with self.lock:
            e.phase = phase_after_exit([c.exit_code or 0 for c in e.containers],
                                       e.pod["spec"].get("restartPolicy", "Always"))
        self._patch_status(e)
        self._release_net(e)

    def _probe(self, e: PodEntry, c: Container) -> bool:
        """Run C's due probes: startup first (liveness and readiness wait for it), then liveness, readiness.
        A failed startup or liveness probe stops the container (it restarts per restartPolicy). True when
        C's status changed."""
        now = time.monotonic()
        if not c.startup.ready:
            if c.startup.due(now):
                c.startup.observe(probe_once(c.startup.spec, c.spec, e.net, e.dir), now)
                if c.startup.succeeded:
                    c.startup.ready = True
                    return True
                if c.startup.failed:
                    self._stop_container(e, c, "startup probe failed")
            return False
        if c.liveness.due(now):
            c.liveness.observe(probe_once(c.liveness.spec, c.spec, e.net, e.dir), now)
            if c.liveness.failed:
                self._stop_container(e, c, "liveness probe failed")
                return False
        if c.readiness.due(now):
            c.readiness.observe(probe_once(c.readiness.spec, c.spec, e.net, e.dir), now)
            if not c.readiness.ready and c.readiness.succeeded:
                c.readiness.ready = True
                return True
            if c.readiness.ready and c.readiness.failed:
                c.readiness.ready = False
                return True
        return False

    def _stop_container(self, e: PodEntry, c: Container, why: str) -> None:
        """Stop C in the background (SIGTERM, SIGKILL after the pod's grace period); tick() sees the exit."""
        c.killing = why
        grace = float(e.pod["spec"].get("terminationGracePeriodSeconds", 30))
        _log(f"{e.namespace}/{e.name}[{c.name}] {why}: stopping it (grace {grace:g} s)")
        threading.Thread(target=lifecycle.stop_run, args=(c.proc, c.rec, grace), daemon=True,
                         name=f"kill-{e.name}-{c.name}").start()

    # -- termination ----------------------------------------------------------------------------------

    def _release_net(self, e: PodEntry) -> None:
        if e.net is not None:
            podnet.destroy(e.net)

    def terminate(self, uid: str, pod: dict | None, *, delete_object: bool) -> None:
        with self.lock:
            e = self.pods.get(uid)
            if e is None or e.terminating:
                return
            e.terminating = True
        threading.Thread(target=self._terminate, args=(e, pod, delete_object), name=f"stop-{e.name}",
                         daemon=True).start()

    def _terminate(self, e: PodEntry, pod: dict | None, delete_object: bool) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        meta = (pod or e.pod)["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = e.pod["spec"].get("terminationGracePeriodSeconds", 30)
        deadline = time.monotonic() + float(grace)
        if any(procs.is_alive(c.rec) for c in e.containers):
            lifecycle.pre_stop(e, deadline)
            lifecycle.kill(e, grace_s=max(0.1, deadline - time.monotonic()))
        _log(f"{e.namespace}/{e.name}: stopped")
        self._release_net(e)
        if delete_object:
            try:
                self.core.delete_namespaced_pod(e.name, e.namespace, grace_period_seconds=0,
                                                body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                            preconditions={"uid": e.uid}))
            except ApiException as exc:
                if exc.status not in (404, 409):
                    _log(f"{e.namespace}/{e.name}: final delete failed: {exc.status}")
        with self.lock:
            self.pods.pop(e.uid, None)
            self.finished.add(e.uid)
            if e.net is not None:
                self.used_ips.discard(e.net.ip)
        self._save()

    # -- watch loop -----------------------------------------------------------------------------------

    def handle(self, event_type: str, pod: dict) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        if spec.get("nodeName") not in self.node_cidrs:
            return
        uid = meta["uid"]
        if uid in self.finished:
            return
        known = uid in self.pods
        if event_type == "DELETED":
            if known:
                self.terminate(uid, pod, delete_object=False)
            return
        if meta.get("deletionTimestamp"):
            if known:
                self.terminate(uid, pod, delete_object=True)
            else:  # nothing runs for it (e.g. it failed before we restarted): finish the deletion
                self.pods[uid] = PodEntry(uid=uid, namespace=meta["namespace"], name=meta["name"],
                                          node=spec["nodeName"], pod=pod, dir=self.work_dir / "gone")
                self.terminate(uid, pod, delete_object=True)
            return
        phase = (pod.get("status") or {}).get("phase")
        if not known and phase not in ("Succeeded", "Failed"):
            self.start_pod(pod)

    def _watch(self) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(self.watch_api)
        rv = None
        while not self.stop_flag.is_set():
            try:
                if rv is None:
                    resp = core.list_pod_for_all_namespaces(_preload_content=False)
                    lst = json.loads(resp.data)
                    rv = lst["metadata"]["resourceVersion"]
                    for p in lst["items"]:
                        self.handle("ADDED", p)
                    (self.work_dir / "ready").write_text(now_rfc3339() + "\n")
                w = watch.Watch()
                for ev in w.stream(core.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=30,
                                   allow_watch_bookmarks=True):
                    if self.stop_flag.is_set():
                        break
                    obj = ev["raw_object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.handle(ev["type"], obj)
                    elif ev["type"] == "ERROR":
                        rv = None
                        break
            except Exception as exc:  # noqa: BLE001 - reconnect with a fresh list
                if not self.stop_flag.is_set():
                    _log(f"watch error, relisting: {str(exc).splitlines()[0][:200]}")
                    time.sleep(1)
                rv = None

    def log_source(self, namespace: str, pod: str, container: str, previous: bool) -> LogSource | None:
        """The log `kubectl logs` asks for (the kubelet API's lookup)."""
        with self.lock:
            e = next((x for x in self.pods.values() if x.namespace == namespace and x.name == pod), None)
            c = next((x for x in e.containers if x.name == container), None) if e else None
        if e is None or c is None:
            return None
        rec = c.rec
        return LogSource(lifecycle.log_path(e, container, previous=previous),
                         running=lambda: not previous and procs.is_alive(rec))

    def run(self) -> None:
        cleanup_recorded(self.work_dir)
        threading.Thread(target=self._watch, name="watch", daemon=True).start()
        _log(f"watching pods on {', '.join(f'{n} ({c})' for n, c in self.node_cidrs.items())}")
        while not self.stop_flag.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - keep serving the other pods
                _log(f"tick error: {exc}")
            self.stop_flag.wait(0.25)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every pod process and remove every namespace (the cluster is going away)."""
        with self.lock:
            entries = list(self.pods.values())
        threads = [threading.Thread(target=lifecycle.kill, args=(e, 3.0)) for e in entries]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in entries:
            self._release_net(e)
        with self.lock:
            self.pods.clear()
        self._save()
        _log(f"shut down ({len(entries)} pods stopped)")


def parse_nodes(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, cidr = v.partition("=")
        if not sep or not name:
            raise ValueError(f"--node {v!r}: expected NAME=CIDR, e.g. dsv4-gpu-0=10.244.1.0/24")
        ipaddress.ip_network(cidr, strict=False)
        out[name] = cidr
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv4.e2e.podrunner", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--work-dir", required=True, type=Path)
    p.add_argument("--node", action="append", default=[], help="NAME=POD_CIDR of a node to serve (repeatable)")
    p.add_argument("--backoff-base-s", type=float, default=restarts.BACKOFF_BASE_S,
                   help="first restart back-off; doubles per crash up to the cap (kubelet: 10 s)")
    p.add_argument("--kubelet-port", type=int, default=0, help="serve the kubelet API (logs) on 127.0.0.1:PORT")
    p.add_argument("--tls-cert", type=Path, help="serving certificate of the kubelet API")
    p.add_argument("--tls-key", type=Path, help="its key")
    args = p.parse_args(argv)
    if why := podnet.available():
        print(f"podrunner: {why}", file=sys.stderr)
        return 2
    runner = PodRunner(args.kubeconfig, args.work_dir, parse_nodes(args.node),
                       backoff=restarts.Backoff(base_s=args.backoff_base_s))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop_flag.set())
    api = None
    if args.kubelet_port:
        if not (args.tls_cert and args.tls_key):
            p.error("--kubelet-port needs --tls-cert and --tls-key")
        api = KubeletAPI(args.kubelet_port, args.tls_cert, args.tls_key, runner.log_source).start()
        _log(f"kubelet API (container logs) on https://127.0.0.1:{args.kubelet_port}")
    runner.run()
    if api is not None:
        api.stop()
    shutil.rmtree(args.work_dir / "gone", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
