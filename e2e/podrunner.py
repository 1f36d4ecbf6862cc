"""The pod runner: pods scheduled onto the kwok nodes are backed by real local processes.

kwok fakes the nodes (status, heartbeats, leases); it is configured with no pod stages, so this
process plays the kubelet for every pod bound to one of the managed nodes:

1. **Sandbox**: a network namespace with a veth pair (`dsv4.e2e.podnet`) and a pod IP from the node's
   podCIDR (node i: 10.244.<i+1>.0/24), so the pod IP is a real address the tests own.
2. **Volumes**: configMap, secret, emptyDir and downwardAPI volumes are written into a per-pod
   directory; hostPath volumes use the host path. Without a mount namespace the container's
   `mountPath` cannot exist, so every occurrence of a mountPath in the command, args, env values and
   workingDir is rewritten to the materialised directory (`/etc/dsv4/config.yaml` ->
   `<pod dir>/volumes/<volume>/config.yaml`).
3. **Processes**: init containers run to completion in order, then every container's `command` +
   `args` (with `$(VAR)` expansion) runs inside the namespace via `nsenter`, with the host
   environment overlaid by the container's env/envFrom (fieldRef, configMapKeyRef, secretKeyRef,
   resourceFieldRef resolved). `python`/`dsv4` resolve to this virtualenv (its bin dir leads PATH).
   The image is not used; a container without a `command` fails the pod with a clear reason.
4. **Status**: phase Running with podIP/hostIP once started; readiness mirrors the readinessProbe
   (httpGet, tcpSocket or exec; period, thresholds and delays honoured), Ready=true at once without
   a probe; a container that exits marks the pod Failed (Succeeded when all exited 0 and the
   restartPolicy is not Always); there are no restarts. Liveness and startup probes are ignored. Each
   pod's status is resent every 10 s (a failed patch every second) until the pod is gone, as a kubelet
   re-syncs: a change made during an API-server outage, or overwritten by the node controller, lands.
5. **Deletion**: on a deletionTimestamp: preStop hooks (exec, httpGet, sleep), SIGTERM to each
   container's process group, SIGKILL after the grace period, then the pod object is deleted with
   grace 0 (as the kubelet does) and the namespace removed.

Every pod's PIDs and network names are recorded in `<work dir>/state.json`, so `cleanup_recorded()`
can stop them even if this process was killed. Run: ``python -m dsv4.e2e.podrunner --kubeconfig K
--work-dir D --node NAME=CIDR ...`` (the cluster starts it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dsv4.e2e import podnet, procs

SMP = "application/strategic-merge-patch+json"
PATCH_RETRY_S = 1.0  # resend a failed status patch after this long (the API server may be restarting)
STATUS_RESYNC_S = 10.0  # and resend every pod's status this often, as the kubelet's status manager does
_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log(msg: str) -> None:
    print(f"[podrunner {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# pure helpers


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined vars are substituted, `$$` escapes, unknown refs stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_RE.sub(sub, text)


def rewrite_paths(text: str, mounts: list[tuple[str, str]]) -> str:
    """Replace each container mountPath (longest first) in TEXT with its local directory."""
    for mount_path, local in sorted(mounts, key=lambda m: -len(m[0])):
        mp = mount_path.rstrip("/") or "/"
        pattern = r"(?<![\w.\-/])" + re.escape(mp) + r"(?=/|$|[^\w.\-])"
        text = re.sub(pattern, lambda _m, loc=local: loc, text)
    return text


def allocate_ip(cidr: str, used: set[str]) -> str:
    """First free host address of CIDR, skipping .0/.1 (network, gateway-like) and the broadcast."""
    net = ipaddress.ip_network(cidr, strict=False)
    for host in list(net.hosts())[1:]:
        if str(host) not in used:
            return str(host)
    raise RuntimeError(f"podCIDR {cidr} is exhausted ({len(used)} addresses in use)")


def probe_port(probe_port_value, container: dict) -> int:
    """A probe port is a number or the name of one of the container's ports."""
    if isinstance(probe_port_value, int) or (isinstance(probe_port_value, str) and probe_port_value.isdigit()):
        return int(probe_port_value)
    for p in container.get("ports") or []:
        if p.get("name") == probe_port_value:
            return int(p["containerPort"])
    raise ValueError(f"probe port {probe_port_value!r} is not a number or a named port of container "
                     f"{container.get('name')!r}")


def resource_value(container: dict, resource: str, divisor: str | None) -> str:
    """resourceFieldRef: limits.cpu etc., rounded up to the divisor as the kubelet does."""
    from kubernetes.utils import parse_quantity

    kind, _, name = resource.partition(".")
    q = (container.get("resources") or {}).get(kind, {}).get(name)
    if q is None and kind == "requests":
        q = (container.get("resources") or {}).get("limits", {}).get(name)
    if q is None:
        q = {"cpu": "128", "memory": "2Ti", "ephemeral-storage": "10Ti"}.get(name, "0")  # node allocatable
    d = parse_quantity(divisor or "1")
    return str(math.ceil(parse_quantity(q) / d))


def phase_after_exit(exit_codes: list[int], restart_policy: str) -> str:
    if all(c == 0 for c in exit_codes) and restart_policy in ("Never", "OnFailure"):
        return "Succeeded"
    return "Failed"


# ---------------------------------------------------------------------------------------------------------
# state


@dataclass
class ProbeState:
    spec: dict | None
    ready: bool = False
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0


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
    start_time: str = field(default_factory=_now)
    terminating: bool = False
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition -> (status, time)
    last_patch: str = ""
    sync_at: float | None = None  # when to resend the status (periodic re-sync; sooner after a failed patch)

    def record(self) -> dict:
        return {"namespace": self.namespace, "name": self.name, "node": self.node,
                "net": self.net.to_dict() if self.net else None, "dir": str(self.dir),
                "procs": [c.rec.to_dict() for c in self.containers]}


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


# ---------------------------------------------------------------------------------------------------------
# the runner


class PodRunner:
    def __init__(self, kubeconfig: str, work_dir: Path, node_cidrs: dict[str, str]):
        from kubernetes import client, config

        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.node_cidrs = node_cidrs
        self.api = config.new_client_from_config(config_file=kubeconfig)
        self.watch_api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.pods: dict[str, PodEntry] = {}
        self.used_ips: set[str] = set()
        self.finished: set[str] = set()  # uids already torn down (late watch events must not restart them)
        self.lock = threading.RLock()
        self.stop_flag = threading.Event()
        self.venv_bin = str(Path(sys.executable).parent)

    # -- bookkeeping ----------------------------------------------------------------------------------

    def _save(self) -> None:
        with self.lock:
            data = {"pods": {uid: e.record() for uid, e in self.pods.items()}}
        tmp = self.work_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.work_dir / "state.json")

    def _patch_status(self, e: PodEntry, force: bool = False) -> None:
        status = self._status(e)
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

    def _condition(self, e: PodEntry, ctype: str, ok: bool) -> dict:
        s = "True" if ok else "False"
        prev = e.transitions.get(ctype)
        if prev is None or prev[0] != s:
            e.transitions[ctype] = (s, _now())
        return {"type": ctype, "status": s, "lastTransitionTime": e.transitions[ctype][1], "lastProbeTime": None}

    def _status(self, e: PodEntry) -> dict:
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
                self._condition(e, "PodReadyToStartContainers", e.net is not None),
                self._condition(e, "Initialized", bool(e.containers) or e.phase != "Pending"),
                self._condition(e, "ContainersReady", all_ready),
                self._condition(e, "Ready", all_ready),
                self._condition(e, "PodScheduled", True),
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

    # -- pod start ------------------------------------------------------------------------------------

    def _volumes(self, e: PodEntry) -> dict[str, str]:
        """Materialise the pod's volumes; returns volume name -> local directory (or host path)."""
        out: dict[str, str] = {}
        base = e.dir / "volumes"
        for v in e.pod["spec"].get("volumes") or []:
            name = v["name"]
            target = base / name
            if "hostPath" in v:
                out[name] = v["hostPath"]["path"]
                continue
            target.mkdir(parents=True, exist_ok=True)
            out[name] = str(target)
            if "configMap" in v:
                self._write_keys(target, self._configmap_data(e.namespace, v["configMap"]), v["configMap"])
            elif "secret" in v:
                src = v["secret"]
                self._write_keys(target, self._secret_data(e.namespace, src.get("secretName"), src.get("optional")),
                                 src)
            elif "downwardAPI" in v:
                for item in v["downwardAPI"].get("items") or []:
                    if "fieldRef" in item:
                        (target / item["path"]).write_text(self._field(e, item["fieldRef"]["fieldPath"]))
            elif "projected" in v:
                for src in v["projected"].get("sources") or []:
                    if "configMap" in src:
                        self._write_keys(target, self._configmap_data(e.namespace, src["configMap"]), src["configMap"])
                    elif "secret" in src:
                        s = src["secret"]
                        self._write_keys(target, self._secret_data(e.namespace, s.get("name"), s.get("optional")), s)
                    # serviceAccountToken / downwardAPI in projections: left empty (no in-cluster API access)
            # emptyDir, persistentVolumeClaim, ephemeral: an empty directory
        return out

    def _rewrite_volume_files(self, e: PodEntry, vols: dict[str, str]) -> None:
        """ConfigMap/Secret files often name other mounts (`model: /models`): rewrite those paths too."""
        mounts = []
        for c in [*(e.pod["spec"].get("initContainers") or []), *e.pod["spec"]["containers"]]:
            for vm in c.get("volumeMounts") or []:
                if vm["name"] in vols:
                    local = vols[vm["name"]] + (f"/{vm['subPath']}" if vm.get("subPath") else "")
                    mounts.append((vm["mountPath"], local))
        for v in e.pod["spec"].get("volumes") or []:
            if not any(k in v for k in ("configMap", "secret", "projected")):
                continue
            for f in Path(vols[v["name"]]).rglob("*"):
                if not f.is_file():
                    continue
                try:
                    text = f.read_text()
                except UnicodeDecodeError:
                    continue
                new = rewrite_paths(text, mounts)
                if new != text:
                    f.write_text(new)

    def _configmap_data(self, namespace: str, src: dict) -> dict[str, bytes]:
        from kubernetes.client.exceptions import ApiException

        try:
            cm = self.core.read_namespaced_config_map(src["name"], namespace)
        except ApiException as exc:
            if exc.status == 404 and src.get("optional"):
                return {}
            raise RuntimeError(f"configMap {namespace}/{src['name']} is not readable ({exc.status})") from exc
        data = {k: v.encode() for k, v in (cm.data or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
        return data

    def _secret_data(self, namespace: str, name: str | None, optional: bool | None) -> dict[str, bytes]:
        from kubernetes.client.exceptions import ApiException

        try:
            sec = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise RuntimeError(f"secret {namespace}/{name} is not readable ({exc.status})") from exc
        return {k: base64.b64decode(v) for k, v in (sec.data or {}).items()}

    @staticmethod
    def _write_keys(target: Path, data: dict[str, bytes], src: dict) -> None:
        items = src.get("items")
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, rel in pairs:
            if key not in data:
                if src.get("optional"):
                    continue
                raise RuntimeError(f"key {key!r} is missing from {src.get('name')!r}")
            p = target / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data[key])

    def _field(self, e: PodEntry, path: str) -> str:
        meta = e.pod["metadata"]
        simple = {
            "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
            "spec.nodeName": e.node, "spec.serviceAccountName": e.pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": e.net.ip if e.net else "", "status.podIPs": e.net.ip if e.net else "",
            "status.hostIP": podnet.GATEWAY, "status.hostIPs": podnet.GATEWAY,
        }
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            d = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        raise ValueError(f"fieldRef.fieldPath {path!r} is not supported by the pod runner")

    def _env(self, e: PodEntry, c: dict, mounts: list[tuple[str, str]]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        env["PATH"] = self.venv_bin + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        env["HOSTNAME"] = e.name
        env["DSV4_POD_DIR"] = str(e.dir)
        declared: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self._configmap_data(e.namespace, {"name": ref["name"], "optional": ref.get("optional")})
            else:
                ref = src["secretRef"]
                data = self._secret_data(e.namespace, ref["name"], ref.get("optional"))
            declared.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
        for item in c.get("env") or []:
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                declared[name] = expand(item.get("value", ""), declared)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                declared[name] = self._field(e, vf["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                data = self._configmap_data(e.namespace, {"name": ref["name"], "optional": ref.get("optional")})
                if ref["key"] in data:
                    declared[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional"):
                    raise RuntimeError(f"env {name}: key {ref['key']!r} missing from configMap {ref['name']!r}")
            elif "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                data = self._secret_data(e.namespace, ref["name"], ref.get("optional"))
                if ref["key"] in data:
                    declared[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional"):
                    raise RuntimeError(f"env {name}: key {ref['key']!r} missing from secret {ref['name']!r}")
            elif "resourceFieldRef" in vf:
                ref = vf["resourceFieldRef"]
                declared[name] = resource_value(c, ref["resource"], ref.get("divisor"))
        env.update({k: rewrite_paths(v, mounts) for k, v in declared.items()})
        return env

    def _argv(self, c: dict, env: dict[str, str], mounts: list[tuple[str, str]]) -> list[str]:
        if not c.get("command"):
            raise RuntimeError(f"container {c['name']!r} has no command: the pod runner runs no images, "
                               "so every container must set `command`")
        return [rewrite_paths(expand(a, env), mounts) for a in [*c["command"], *(c.get("args") or [])]]

    def _spawn(self, e: PodEntry, c: dict, vols: dict[str, str]) -> tuple[subprocess.Popen, procs.ProcRecord]:
        mounts = []
        for vm in c.get("volumeMounts") or []:
            local = vols.get(vm["name"])
            if local is None:
                raise RuntimeError(f"container {c['name']!r} mounts unknown volume {vm['name']!r}")
            if vm.get("subPath"):
                local = str(Path(local) / vm["subPath"])
            mounts.append((vm["mountPath"], local))
        env = self._env(e, c, mounts)
        argv = self._argv(c, env, mounts)
        cwd = e.dir
        if c.get("workingDir"):
            wd = Path(rewrite_paths(c["workingDir"], mounts))
            cwd = wd if wd.is_dir() else e.dir
        assert e.net is not None
        log = e.dir / "logs" / f"{c['name']}.log"
        _log(f"{e.namespace}/{e.name}[{c['name']}] at {e.net.ip}: {' '.join(argv)[:300]}")
        return procs.spawn(f"{e.namespace}/{e.name}/{c['name']}", podnet.enter_argv(e.net) + argv, log, env=env,
                           cwd=cwd)

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
            vols = self._volumes(e)
            self._rewrite_volume_files(e, vols)
            for ic in e.pod["spec"].get("initContainers") or []:
                proc, rec = self._spawn(e, ic, vols)
                rc = proc.wait()
                if rc != 0:
                    raise RuntimeError(f"init container {ic['name']!r} exited with {rc}")
            for c in e.pod["spec"]["containers"]:
                if e.terminating:
                    return
                proc, rec = self._spawn(e, c, vols)
                probe = ProbeState(spec=c.get("readinessProbe"))
                if probe.spec is None:
                    probe.ready = True
                else:
                    probe.next_at = time.monotonic() + float(probe.spec.get("initialDelaySeconds", 0))
                with self.lock:
                    e.containers.append(Container(name=c["name"], spec=c, rec=rec, proc=proc, started_at=_now(),
                                                  probe=probe))
                self._save()
            with self.lock:
                if e.phase == "Pending":
                    e.phase = "Running"
            self._patch_status(e)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the pod's status
            _log(f"{e.namespace}/{e.name}: failed to start: {exc}")
            with self.lock:
                e.phase, e.reason, e.message = "Failed", "PodRunnerError", str(exc)[:1000]
            self._kill(e, grace_s=0.5)
            self._patch_status(e, force=True)

    # -- probes and exits -----------------------------------------------------------------------------

    def _probe_once(self, e: PodEntry, c: Container) -> bool:
        spec = c.probe.spec or {}
        timeout = float(spec.get("timeoutSeconds", 1))
        assert e.net is not None
        if "httpGet" in spec:
            h = spec["httpGet"]
            port = probe_port(h.get("port"), c.spec)
            scheme = h.get("scheme", "HTTP").lower()
            url = f"{scheme}://{h.get('host') or e.net.ip}:{port}{h.get('path', '/')}"
            req = urllib.request.Request(url, headers={x["name"]: x["value"] for x in h.get("httpHeaders") or []})
            ctx = ssl._create_unverified_context() if scheme == "https" else None  # noqa: S323 - kubelet skips it too
            try:
                with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                    return 200 <= r.status < 400
            except urllib.error.HTTPError as err:
                return 200 <= err.code < 400
            except (urllib.error.URLError, OSError):
                return False
        if "tcpSocket" in spec:
            t = spec["tcpSocket"]
            try:
                with socket.create_connection((t.get("host") or e.net.ip, probe_port(t.get("port"), c.spec)),
                                              timeout=timeout):
                    return True
            except OSError:
                return False
        if "exec" in spec:
            try:
                r = subprocess.run(podnet.enter_argv(e.net) + spec["exec"]["command"], timeout=timeout,
                                   capture_output=True, cwd=e.dir)
                return r.returncode == 0
            except (subprocess.TimeoutExpired, OSError):
                return False
        return True  # grpc and unknown handlers: not supported, counted as success

    def tick(self) -> None:
        """Resend due statuses; check exits and run due readiness probes; patch status on any change.

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
                if c.exit_code is not None:
                    continue
                # poll() before anything else reaps the child, so the real exit status is kept
                rc = c.proc.poll() if c.proc is not None else (None if procs.is_alive(c.rec) else 137)
                if rc is not None:
                    c.exit_code = 128 - rc if rc < 0 else rc  # killed by signal N: 128+N, as the kubelet reports
                    c.finished_at = _now()
                    c.probe.ready = False
                    changed = True
                    _log(f"{e.namespace}/{e.name}[{c.name}] exited with {c.exit_code}; log {c.rec.log}")
            if any(c.exit_code is not None for c in e.containers):
                others = [c for c in e.containers if c.exit_code is None]
                self._kill(e, grace_s=2.0)
                for c in others:
                    c.exit_code, c.finished_at = 137, _now()
                with self.lock:
                    e.phase = phase_after_exit([c.exit_code or 0 for c in e.containers],
                                               e.pod["spec"].get("restartPolicy", "Always"))
                self._patch_status(e)
                self._release_net(e)
                continue
            now = time.monotonic()
            for c in e.containers:
                spec = c.probe.spec
                if spec is None or now < c.probe.next_at:
                    continue
                c.probe.next_at = now + float(spec.get("periodSeconds", 10))
                ok = self._probe_once(e, c)
                if ok:
                    c.probe.successes, c.probe.failures = c.probe.successes + 1, 0
                    if not c.probe.ready and c.probe.successes >= int(spec.get("successThreshold", 1)):
                        c.probe.ready, changed = True, True
                else:
                    c.probe.successes, c.probe.failures = 0, c.probe.failures + 1
                    if c.probe.ready and c.probe.failures >= int(spec.get("failureThreshold", 3)):
                        c.probe.ready, changed = False, True
            if changed:
                self._patch_status(e)

    # -- termination ----------------------------------------------------------------------------------

    def _kill(self, e: PodEntry, grace_s: float) -> None:
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

    def _release_net(self, e: PodEntry) -> None:
        if e.net is not None:
            podnet.destroy(e.net)

    def _pre_stop(self, e: PodEntry, deadline: float) -> None:
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
                _log(f"{e.namespace}/{e.name}[{c.name}] preStop failed: {exc}")

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
            self._pre_stop(e, deadline)
            self._kill(e, grace_s=max(0.1, deadline - time.monotonic()))
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
                    (self.work_dir / "ready").write_text(_now() + "\n")
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
        threads = [threading.Thread(target=self._kill, args=(e, 3.0)) for e in entries]
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
    args = p.parse_args(argv)
    if why := podnet.available():
        print(f"podrunner: {why}", file=sys.stderr)
        return 2
    runner = PodRunner(args.kubeconfig, args.work_dir, parse_nodes(args.node))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop_flag.set())
    runner.run()
    shutil.rmtree(args.work_dir / "gone", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
