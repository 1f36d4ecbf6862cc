"""A real local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kwok fake GPU nodes, and the pod runner that backs the nodes' pods with local processes.

`up()` builds the binaries when the cache is cold (`dsv4.e2e.build`), generates certificates and a
service-account key pair, starts every component on 127.0.0.1 (free ports), waits for each, creates
the GPU nodes and returns a `Cluster`. `down()` stops every recorded PID and removes the state
directory. The state lives in `${XDG_CACHE_HOME:-~/.cache}/dsv4/cluster/<name>/`:

    state.json       ports, PIDs (+ start times), node names, kubeconfig path
    kubeconfig       cluster-admin kubeconfig (certificates embedded)
    pki/             CA, serving and client certificates, service-account keys
    etcd/            etcd data
    logs/<component>.log
    pods/            the pod runner's working directories and process logs
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsv4.e2e import build, certs, podnet, procs

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"
POD_CIDR_PREFIX = podnet.POD_RANGE.rsplit(".", 2)[0]  # node i gets 10.244.<first_subnet + i>.0/24
NODE_IP = "127.0.0.1"  # nodes' InternalIP: whatever the API server dials for a node (logs) stays on loopback
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"

POD_RANGE_LOCK = "pod-range"  # serialises installing/removing the pod-range route across clusters

# Order matters: started in this order, stopped in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "podrunner")


class ClusterError(RuntimeError):
    """The cluster could not be brought up or queried; the message names the component and its log."""


@dataclass(frozen=True)
class NodeSpec:
    """A kwok node advertising GPUs (H200 by default: 141 GB HBM3e, reported as 143771 MiB)."""

    name: str
    gpus: int = 8
    gpu_product: str = "NVIDIA-H200"
    gpu_memory_mib: int = 143771
    cpu: str = "128"
    memory: str = "2Ti"
    pods: int = 110
    pod_cidr: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.gpus <= 64:
            raise ValueError(f"NodeSpec.gpus={self.gpus}: must be in [0, 64]")
        if not self.name or len(self.name) > 63:
            raise ValueError(f"NodeSpec.name={self.name!r}: must be 1..63 characters")

    def manifest(self, kubelet_port: int = 0) -> dict:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            "node.kubernetes.io/instance-type": f"gpu-{self.gpu_product.lower()}-x{self.gpus}",
            "topology.kubernetes.io/zone": "local-a",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": self.gpu_product,
            "nvidia.com/gpu.count": str(self.gpus),
            "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
            "spec": {"podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr]},
            "status": self.status(kubelet_port),
        }

    def status(self, kubelet_port: int = 0) -> dict:
        """Capacity, addresses and (with a port) the kubelet endpoint the API server dials for logs."""
        res = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), "ephemeral-storage": "10Ti",
               GPU_RESOURCE: str(self.gpus)}
        out = {"capacity": dict(res), "allocatable": dict(res),
               "addresses": [{"type": "InternalIP", "address": NODE_IP},
                             {"type": "Hostname", "address": self.name}]}
        if kubelet_port:
            out["daemonEndpoints"] = {"kubeletEndpoint": {"Port": kubelet_port}}
        return out


def first_subnet(name: str) -> int:
    """Third octet of the first node's podCIDR: 1 for "default", 11..241 (by name) for other clusters, so
    two clusters on one host get different pod IPs (up to 10 nodes each)."""
    return 1 if name == "default" else 11 + (zlib.crc32(name.encode()) % 24) * 10


def default_nodes(count: int = 2, gpus: int = 8, *, name: str = "default") -> list[NodeSpec]:
    if not 1 <= count <= 10:
        raise ValueError(f"nodes={count}: must be in [1, 10]")
    base = first_subnet(name)
    return [NodeSpec(name=f"dsv4-gpu-{i}", gpus=gpus, pod_cidr=f"{POD_CIDR_PREFIX}.{base + i}.0/24")
            for i in range(count)]


def state_root() -> Path:
    return build.cache_root() / "cluster"


@dataclass
class Cluster:
    """A running (or recorded) local cluster. `kubeconfig` is a cluster-admin kubeconfig."""

    name: str
    state_dir: Path
    server: str
    kubeconfig: Path
    ports: dict[str, int]
    procs: dict[str, procs.ProcRecord] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    kubernetes_version: str = build.K8S_VERSION

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pki(self) -> certs.CertPaths:
        return certs.CertPaths(self.state_dir / "pki")

    def save(self) -> None:
        data = {
            "name": self.name, "server": self.server, "kubeconfig": str(self.kubeconfig), "ports": self.ports,
            "procs": {k: v.to_dict() for k, v in self.procs.items()}, "nodes": self.nodes,
            "kubernetes_version": self.kubernetes_version,
        }
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_dir / "state.json")

    @classmethod
    def load(cls, name: str = "default") -> Cluster | None:
        d = state_root() / name
        f = d / "state.json"
        if not f.exists():
            return None
        data = json.loads(f.read_text())
        return cls(name=data["name"], state_dir=d, server=data["server"], kubeconfig=Path(data["kubeconfig"]),
                   ports=data["ports"], procs={k: procs.ProcRecord.from_dict(v) for k, v in data["procs"].items()},
                   nodes=data["nodes"], kubernetes_version=data.get("kubernetes_version", build.K8S_VERSION))

    def alive(self) -> dict[str, bool]:
        return {name: procs.is_alive(rec) for name, rec in self.procs.items()}

    def api_client(self):
        """A kubernetes.client.ApiClient for this cluster (imported lazily)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig), context=None)

    def env(self) -> dict[str, str]:
        """Environment for tools run against this cluster (kubectl, helm, the operator)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET PATH on the apiserver as cluster-admin (status code, body)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.crt("ca")))
        ctx.load_cert_chain(str(self.pki.crt("admin")), str(self.pki.key("admin")))
        try:
            with urllib.request.urlopen(self.server + path, context=ctx, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return 0, str(e)


# ---------------------------------------------------------------------------------------------------------
# helpers


def _log(msg: str) -> None:
    print(f"[dsv4 cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str | Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def _wait(what: str, check, rec: procs.ProcRecord | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if rec is not None and not procs.is_alive(rec):
            raise ClusterError(f"{rec.name} exited while waiting for {what}; last log lines of {rec.log}:\n"
                               f"{_tail(rec.log)}")
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.2)
    log = f"; last log lines of {rec.log}:\n{_tail(rec.log)}" if rec else ""
    raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last}){log}")


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------
# component command lines (pure functions of the paths and ports)


def etcd_argv(bin_dir: Path, data: Path, client: int, peer: int) -> list[str]:
    return [str(bin_dir / "etcd"), "--name", "dsv4", "--data-dir", str(data),
            "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"dsv4=http://127.0.0.1:{peer}", "--listen-metrics-urls", "",
            "--unsafe-no-fsync", "--log-level", "warn"]


def apiserver_argv(bin_dir: Path, pki: certs.CertPaths, etcd_port: int, port: int) -> list[str]:
    return [str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            "--endpoint-reconciler-type=none",  # the advertised loopback address is not a valid endpoint
            f"--tls-cert-file={pki.crt('apiserver')}", f"--tls-private-key-file={pki.key('apiserver')}",
            f"--client-ca-file={pki.crt('ca')}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            # aggregation layer (for prometheus-adapter or other APIServices later)
            f"--requestheader-client-ca-file={pki.crt('front-proxy-ca')}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.crt('front-proxy-client')}",
            f"--proxy-client-key-file={pki.key('front-proxy-client')}",
            "--enable-aggregator-routing=true",
            # node names (dsv4-gpu-0) resolve nowhere: dial the InternalIP, which is loopback
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false", "--v=1"]


def controller_manager_argv(bin_dir: Path, pki: certs.CertPaths, kubeconfig: Path, port: int) -> list[str]:
    return [str(bin_dir / "kube-controller-manager"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--leader-elect=false",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.crt('ca')}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki.crt('ca')}", f"--cluster-signing-key-file={pki.key('ca')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", "--v=1"]


def scheduler_argv(bin_dir: Path, kubeconfig: Path, port: int) -> list[str]:
    return [str(bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--leader-elect=false", "--profiling=false",
            "--v=1"]


def kwok_argv(bin_dir: Path, stages: Path, kubeconfig: Path, port: int) -> list[str]:
    return [str(bin_dir / "kwok"), f"--kubeconfig={kubeconfig}", f"--config={stages}",
            "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{port}", f"--node-ip={NODE_IP}",
            "--node-lease-duration-seconds=40"]


def podrunner_argv(state_dir: Path, kubeconfig: Path, nodes: list[NodeSpec], pki: certs.CertPaths,
                   kubelet_port: int, backoff_base_s: float | None = None) -> list[str]:
    argv = [sys.executable, "-m", "dsv4.e2e.podrunner", "--kubeconfig", str(kubeconfig),
            "--work-dir", str(state_dir / "pods"), "--kubelet-port", str(kubelet_port),
            "--tls-cert", str(pki.crt("kubelet")), "--tls-key", str(pki.key("kubelet"))]
    if backoff_base_s is not None:
        argv += ["--backoff-base-s", str(backoff_base_s)]
    for n in nodes:
        argv += ["--node", f"{n.name}={n.pod_cidr}"]
    return argv


# ---------------------------------------------------------------------------------------------------------
# up / down / status


def up(name: str = "default", *, nodes: list[NodeSpec] | None = None, pod_runner: bool = True,
       timeout_s: float = 120.0, backoff_base_s: float | None = None) -> Cluster:
    """Bring the cluster up (building the binaries first if needed); idempotent when it already runs.
    BACKOFF_BASE_S: the pod runner's first container-restart back-off (default 10 s, as the kubelet)."""
    nodes = nodes if nodes is not None else default_nodes(name=name)
    with _locked(name):
        existing = Cluster.load(name)
        if existing is not None:
            alive = existing.alive()
            if all(alive.values()) and existing.get("/readyz")[0] == 200:
                _log(f"cluster {name!r} already running at {existing.server}")
                return existing
            _log(f"cluster {name!r} has stale state ({alive}); cleaning it up first")
            _down_locked(existing)
        if pod_runner and (why := podnet.available()):
            raise ClusterError(f"pod runner unavailable: {why} (pass pod_runner=False to run without it)")
        bin_dir = build.ensure_built()
        if pod_runner:
            with _locked(POD_RANGE_LOCK):
                route = podnet.ensure_range_route()
            _log(f"pod range {podnet.POD_RANGE}: {route.type} on the host "
                 f"({'installed by us' if route.ours else 'already there'})")
        t0 = time.monotonic()
        state_dir = state_root() / name
        if state_dir.exists():
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True)
        pki = certs.generate(state_dir / "pki", service_ip=SERVICE_IP)
        ports = {k: free_port() for k in ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager",
                                          "kube-scheduler", "kwok", "kubelet")}
        server = f"https://127.0.0.1:{ports['kube-apiserver']}"
        kcfg = state_dir / "kubeconfig"
        kcfg.write_text(certs.kubeconfig(server, pki.crt("ca"), pki.crt("admin"), pki.key("admin"), user="dsv4-admin"))
        kcfg.chmod(0o600)
        comp_cfg = {}
        for stem in ("controller-manager", "scheduler"):
            p = state_dir / f"{stem}.kubeconfig"
            p.write_text(certs.kubeconfig(server, pki.crt("ca"), pki.crt(stem), pki.key(stem),
                                          user=certs.CLIENTS[stem][0]))
            comp_cfg[stem] = p
        cluster = Cluster(name=name, state_dir=state_dir, server=server, kubeconfig=kcfg, ports=ports,
                          nodes=[n.name for n in nodes])
        logs = cluster.logs_dir
        try:
            def start(comp: str, argv: list[str]) -> procs.ProcRecord:
                _, rec = procs.spawn(comp, argv, logs / f"{comp}.log")
                cluster.procs[comp] = rec
                cluster.save()
                return rec

            rec = start("etcd", etcd_argv(bin_dir, state_dir / "etcd", ports["etcd"], ports["etcd-peer"]))
            _wait("etcd /health", lambda: _http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), rec, timeout_s)
            rec = start("kube-apiserver", apiserver_argv(bin_dir, pki, ports["etcd"], ports["kube-apiserver"]))
            _wait("kube-apiserver /readyz", lambda: cluster.get("/readyz")[0] == 200, rec, timeout_s)
            _log(f"kube-apiserver ready at {server} ({time.monotonic() - t0:.1f} s)")
            start("kube-controller-manager", controller_manager_argv(
                bin_dir, pki, comp_cfg["controller-manager"], ports["kube-controller-manager"]))
            start("kube-scheduler", scheduler_argv(bin_dir, comp_cfg["scheduler"], ports["kube-scheduler"]))
            start("kwok", kwok_argv(bin_dir, build.kwok_stages_file(), kcfg, ports["kwok"]))
            if pod_runner:
                start("podrunner", podrunner_argv(state_dir, kcfg, nodes, pki, ports["kubelet"], backoff_base_s))
            _create_nodes(cluster, nodes)
            _wait_ready(cluster, nodes, timeout_s)
        except BaseException:
            _log(f"bringing {name!r} up failed; stopping what was started (logs kept in {logs})")
            _down_locked(cluster, keep_state=True)
            raise
        _log(f"cluster {name!r} up in {time.monotonic() - t0:.1f} s; export KUBECONFIG={kcfg}")
        return cluster


def _create_nodes(cluster: Cluster, nodes: list[NodeSpec]) -> None:
    from kubernetes import client

    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        for n in nodes:
            core.create_node(n.manifest(cluster.ports["kubelet"]))
            # Status on create is kept for nodes today; patch it too so capacity never depends on that.
            _patch_node_status(core, cluster, n)


def _patch_node_status(core, cluster: Cluster, n: NodeSpec) -> None:
    core.patch_node_status(n.name, {"status": n.status(cluster.ports["kubelet"])},
                           _content_type="application/strategic-merge-patch+json")


def _wait_ready(cluster: Cluster, nodes: list[NodeSpec], timeout_s: float) -> None:
    from kubernetes import client

    with cluster.api_client() as api:
        core = client.CoreV1Api(api)

        def nodes_ready() -> bool:
            for n in nodes:
                node = core.read_node(n.name)
                ready = any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))
                tainted = any(t.key.startswith("node.kubernetes.io/") for t in (node.spec.taints or []))
                if not ready or tainted or node.status.allocatable.get(GPU_RESOURCE) != str(n.gpus):
                    return False
            return True

        _wait("kwok nodes Ready with GPU capacity and no not-ready taints", nodes_ready, cluster.procs.get("kwok"),
              timeout_s)
        for n in nodes:  # kwok's initialising stage has rewritten the status: make sure the kubelet port stays
            _patch_node_status(core, cluster, n)
        # Pods need the namespace's default ServiceAccount, which the controller-manager creates.
        _wait("the default ServiceAccount", lambda: core.read_namespaced_service_account("default", "default"),
              cluster.procs.get("kube-controller-manager"), timeout_s)
        if "podrunner" in cluster.procs:
            ready_file = cluster.state_dir / "pods" / "ready"
            _wait("the pod runner", ready_file.exists, cluster.procs["podrunner"], timeout_s)


def recorded_clusters() -> list[str]:
    """Names of clusters with a state directory, the most recently written state first."""
    root = state_root()
    states = [d / "state.json" for d in root.iterdir()] if root.is_dir() else []
    return [f.parent.name for f in sorted((f for f in states if f.is_file()), key=lambda f: -f.stat().st_mtime)]


def live_clusters(exclude: str | None = None) -> list[str]:
    """Names of recorded clusters with at least one live process (most recent first)."""
    return [n for n in recorded_clusters()
            if n != exclude and (c := Cluster.load(n)) is not None and any(c.alive().values())]


def last_cluster() -> str | None:
    """The cluster a command without --name means: the only or most recent live one, else the most recent."""
    live = live_clusters()
    recorded = recorded_clusters()
    return live[0] if live else (recorded[0] if recorded else None)


def _release_range_route(name: str) -> None:
    """The last of our clusters to go takes the pod-range route with it (only a route we installed)."""
    with _locked(POD_RANGE_LOCK):
        others = live_clusters(exclude=name)
        if others:
            _log(f"pod range route kept: cluster(s) {', '.join(others)} still up")
        elif podnet.available() is None and podnet.remove_range_route():
            _log(f"pod range route removed (unreachable {podnet.POD_RANGE})")


def _down_locked(cluster: Cluster, *, keep_state: bool = False) -> list[str]:
    stopped = []
    for comp in reversed(COMPONENTS):
        rec = cluster.procs.get(comp)
        if rec is not None and procs.stop(rec, grace_s=15.0 if comp == "podrunner" else 10.0):
            stopped.append(comp)
    # Anything the pod runner could not clean (it was killed, or crashed): its state file names it.
    from dsv4.e2e.podrunner.state import cleanup_recorded

    cleanup_recorded(cluster.state_dir / "pods")
    _release_range_route(cluster.name)
    if not keep_state and cluster.state_dir.exists():
        shutil.rmtree(cluster.state_dir, ignore_errors=True)
    return stopped


def down(name: str = "default", *, keep_state: bool = False) -> list[str]:
    """Stop every recorded process (reverse start order) and remove the state; returns what was stopped."""
    with _locked(name):
        cluster = Cluster.load(name)
        if cluster is None:
            return []
        stopped = _down_locked(cluster, keep_state=keep_state)
        _log(f"cluster {name!r} down (stopped: {', '.join(stopped) or 'nothing was running'})")
        return stopped


def status(name: str = "default") -> dict:
    """What is recorded and what is alive; `healthy` when every process runs and /readyz answers 200."""
    cluster = Cluster.load(name)
    if cluster is None:
        return {"name": name, "exists": False, "healthy": False}
    alive = cluster.alive()
    code = cluster.get("/readyz")[0] if alive.get("kube-apiserver") else 0
    return {
        "name": name, "exists": True, "healthy": all(alive.values()) and code == 200, "server": cluster.server,
        "kubeconfig": str(cluster.kubeconfig), "readyz": code, "nodes": cluster.nodes,
        "processes": {k: {"pid": r.pid, "alive": alive[k], "log": r.log} for k, r in cluster.procs.items()},
        "kubernetes_version": cluster.kubernetes_version,
    }


# ---------------------------------------------------------------------------------------------------------
# fault injection: take the API server away and bring it back on the same port (e2e reliability tests)


def stop_apiserver(name: str) -> procs.ProcRecord:
    """SIGTERM the cluster's kube-apiserver (clients see connection refused until `start_apiserver`)."""
    with _locked(name):
        cluster = Cluster.load(name)
        if cluster is None or "kube-apiserver" not in cluster.procs:
            raise ClusterError(f"cluster {name!r} has no recorded kube-apiserver")
        rec = cluster.procs["kube-apiserver"]
        procs.stop(rec, grace_s=10.0)
        _log(f"kube-apiserver of {name!r} stopped (pid {rec.pid})")
        return rec


def start_apiserver(name: str, timeout_s: float = 60.0) -> procs.ProcRecord:
    """Start kube-apiserver again with the same flags, port and etcd; wait for /readyz; record the new PID."""
    with _locked(name):
        cluster = Cluster.load(name)
        if cluster is None:
            raise ClusterError(f"cluster {name!r} does not exist")
        old = cluster.procs.get("kube-apiserver")
        if old is not None and procs.is_alive(old):
            return old
        argv = apiserver_argv(build.bin_dir(), cluster.pki, cluster.ports["etcd"], cluster.ports["kube-apiserver"])
        _, rec = procs.spawn("kube-apiserver", argv, cluster.logs_dir / "kube-apiserver.log")
        cluster.procs["kube-apiserver"] = rec
        cluster.save()
        _wait("kube-apiserver /readyz after a restart", lambda: cluster.get("/readyz")[0] == 200, rec, timeout_s)
        _log(f"kube-apiserver of {name!r} back (pid {rec.pid})")
        return rec
