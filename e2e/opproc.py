"""The operator as the chart installs it, run as a local process (no container engine exists here).

1. `install_chart()` runs `helm upgrade --install` of `helm/dsv4-operator` into the cluster: CRD,
   ServiceAccount, (Cluster)Roles and bindings, metrics Service, dashboard ConfigMaps, and the operator
   Deployment, which is then scaled to 0 (and given a nodeSelector no node has, should anything scale it
   up): its process could not reach the API server from a pod network namespace (the API server binds
   127.0.0.1), and a second operator would fight the local one. Scaled to 0 rather than left Pending,
   `kubectl rollout status` (the chart's NOTES) completes instead of waiting forever.
2. `service_account_kubeconfig()` asks the TokenRequest API (`serviceaccounts/<sa>/token`) for a token
   of the chart's ServiceAccount and writes a kubeconfig with it: the operator then has exactly the
   chart's RBAC, which is what the e2e proves to be enough.
3. `OperatorProcess` runs `dsv4 operator -A` with that kubeconfig, the very command line of the chart's
   container, on free loopback ports for metrics and liveness; `kill()` (SIGKILL, mid-reconcile) and
   `start()` again for the fault tests.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from dsv4.e2e import procs, tools

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "dsv4-operator"
UNSCHEDULABLE_LABEL = "dsv4.dev/e2e-no-such-node"  # nodeSelector key that keeps the chart's own pod Pending


class OperatorError(RuntimeError):
    """helm, the TokenRequest API or the operator process failed; the message carries their output."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ChartInstall:
    release: str
    namespace: str
    service_account: str
    helm_output: str
    deployment: str = ""  # the chart's operator Deployment (scaled to 0: the operator runs as a local process)


def helm(args: list[str], kubeconfig: Path, timeout: float = 120) -> str:
    """Run the pinned helm binary against KUBECONFIG; OperatorError with helm's stderr on failure."""
    t = tools.ensure_kubectl_helm()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HELM_CACHE_HOME": str(tools.cache_dir() / "helm-cache"),
           "HELM_CONFIG_HOME": str(tools.cache_dir() / "helm-config"),
           "HELM_DATA_HOME": str(tools.cache_dir() / "helm-data")}
    proc = subprocess.run([str(t.helm), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise OperatorError(f"helm {' '.join(args[:3])} exited {proc.returncode}: {proc.stderr.strip()[-3000:]}")
    return proc.stdout


def kubectl(args: list[str], kubeconfig: Path, *, stdin: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the pinned kubectl binary; with check=True a non-zero exit raises OperatorError with stderr."""
    t = tools.ensure_kubectl_helm()
    proc = subprocess.run([str(t.kubectl), f"--kubeconfig={kubeconfig}", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise OperatorError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-3000:]}")
    return proc


def install_chart(kubeconfig: Path, *, release: str = "dsv4", namespace: str = "dsv4-system",
                  extra_values: dict | None = None) -> ChartInstall:
    """`helm upgrade --install RELEASE helm/dsv4-operator -n NAMESPACE --create-namespace --wait=false`."""
    values = {"nodeSelector": {UNSCHEDULABLE_LABEL: "true"}, **(extra_values or {})}
    with tempfile.NamedTemporaryFile("w", suffix=".values.yaml", delete=False) as fh:
        yaml.safe_dump(values, fh)
    try:
        out = helm(["upgrade", "--install", release, str(CHART), "-n", namespace, "--create-namespace",
                    "-f", fh.name], kubeconfig)
    finally:
        os.unlink(fh.name)
    docs = [d for d in yaml.safe_load_all(helm(["get", "manifest", release, "-n", namespace], kubeconfig)) if d]
    sas = [d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"]
    if len(sas) != 1:
        raise OperatorError(f"the chart rendered {len(sas)} ServiceAccounts ({sas}); expected exactly one")
    deployments = [d["metadata"]["name"] for d in docs if d.get("kind") == "Deployment"]
    for name in deployments:
        kubectl(["scale", "deployment", name, "-n", namespace, "--replicas=0"], kubeconfig)
    return ChartInstall(release, namespace, sas[0], out, deployment=",".join(deployments))


def uninstall_chart(kubeconfig: Path, install: ChartInstall) -> None:
    helm(["uninstall", install.release, "-n", install.namespace, "--wait=false"], kubeconfig)


def service_account_kubeconfig(admin_kubeconfig: Path, namespace: str, service_account: str, out: Path,
                               duration_s: int = 7200) -> Path:
    """A kubeconfig that authenticates as system:serviceaccount:NAMESPACE:SERVICE_ACCOUNT (TokenRequest API)."""
    from kubernetes import client, config

    with config.new_client_from_config(config_file=str(admin_kubeconfig)) as api:
        req = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": duration_s}}
        resp = client.CoreV1Api(api).create_namespaced_service_account_token(service_account, namespace, req)
        token = resp.status.token
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cl = admin["clusters"][0]["cluster"]
    ca = cl.get("certificate-authority-data") or base64.b64encode(
        Path(cl["certificate-authority"]).read_bytes()).decode()
    user = f"system:serviceaccount:{namespace}:{service_account}"
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "sa",
           "clusters": [{"name": "local", "cluster": {"server": cl["server"], "certificate-authority-data": ca}}],
           "users": [{"name": user, "user": {"token": token}}],
           "contexts": [{"name": "sa", "context": {"cluster": "local", "user": user}}]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg))
    out.chmod(0o600)
    return out


@dataclass
class OperatorProcess:
    """`dsv4 operator -A` as a local process with the given kubeconfig; metrics/liveness on loopback."""

    kubeconfig: Path
    log: Path
    timer_interval_s: float = 3.0
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    rec: procs.ProcRecord | None = None
    starts: int = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "dsv4.cli", "operator", "--all-namespaces",
                f"--metrics-port={self.metrics_port}", f"--liveness=http://127.0.0.1:{self.health_port}/healthz"]

    def start(self, timeout_s: float = 60.0) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "DSV4_OPERATOR_TIMER_INTERVAL": str(self.timer_interval_s)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with open(self.log, "a") as fh:
            fh.write(f"\n==== start #{self.starts + 1} {time.strftime('%H:%M:%S')}: {' '.join(self.argv())}\n")
        _, self.rec = procs.spawn("operator", self.argv(), self.log, env=env, cwd=REPO)
        self.starts += 1
        self.wait_healthy(timeout_s)
        return self

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise OperatorError(f"the operator exited; log tail:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise OperatorError(f"the operator's /healthz did not answer within {timeout_s:.0f} s; log tail:\n"
                            f"{self.tail()}")

    def alive(self) -> bool:
        return self.rec is not None and procs.is_alive(self.rec)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizer work, no status patch (a crash, not a shutdown)."""
        if self.rec is not None and procs.is_alive(self.rec):
            import signal

            os.killpg(self.rec.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while procs.is_alive(self.rec) and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.rec is not None:
            procs.stop(self.rec, grace_s=10.0)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
