"""A real Prometheus (Debian's `prometheus` package) scraping the local cluster's pods and the operator.

Runtime pods are discovered from the API server the way `kubernetes_sd_configs` (role pod) would do it,
but through a `file_sd` file: Debian builds Prometheus without the Kubernetes service discovery, so a
companion process (`dsv4.e2e.pod_sd`, started and stopped with Prometheus) watches the pods (admin
credentials) and rewrites the file on every pod change, one target per container port with the same
`__meta_kubernetes_*` labels. The relabelling is exactly the rules the project documents
(`metrics_catalog.runtime_scrape_relabelings("prometheus")`: keep pods with the `dsv4.io/endpoint`
label, copy it into `dsv4_endpoint`, add `namespace` and `pod`), plus a keep on ready pods and the
container port named `http`. Pod IPs are reachable from the host (docs/local-cluster.md), so
Prometheus scrapes the real `dsv4 serve` processes. The operator's metrics port is a static target. The shipped
alert rules are loaded as a rules file, so Prometheus' own rule engine evaluates every alert expression.

    p = Prometheus.for_cluster(cluster, work_dir, operator_target="127.0.0.1:PORT").start()  # + pod_sd
    p.query('up{job="dsv4-runtime"}')   # -> list of {"metric": ..., "value": [t, "v"]}
    p.rules()                            # /api/v1/rules groups (health, lastError, state per rule)
    p.stop()
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dsv4.e2e import procs, tools
from dsv4.e2e.opproc import free_port

RUNTIME_JOB = "dsv4-runtime"
OPERATOR_JOB = "dsv4-operator"


class PrometheusError(RuntimeError):
    """Prometheus could not be installed/started, or a query failed; the message has Prometheus' error."""


def ensure_prometheus() -> Path:
    """The `prometheus` binary from Debian's package (installed with promtool by `dsv4.e2e.tools`)."""
    tools.ensure_promtool()
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if not found:
        raise PrometheusError("Debian's prometheus package is installed but the prometheus binary is not on PATH")
    return Path(found)


def _meta_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def file_sd_targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """file_sd entries for running pods with an IP: one per container port, labelled like kubernetes_sd role pod."""
    out = []
    for pod in pods:
        meta, st = pod.get("metadata") or {}, pod.get("status") or {}
        ip = st.get("podIP")
        if not ip or meta.get("deletionTimestamp") or st.get("phase") != "Running":
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
        base = {"__meta_kubernetes_namespace": meta.get("namespace", ""),
                "__meta_kubernetes_pod_name": meta.get("name", ""),
                "__meta_kubernetes_pod_ip": ip,
                "__meta_kubernetes_pod_ready": "true" if ready else "false",
                "__meta_kubernetes_pod_node_name": (pod.get("spec") or {}).get("nodeName", "")}
        for k, v in (meta.get("labels") or {}).items():
            base[f"__meta_kubernetes_pod_label_{_meta_name(k)}"] = v
            base[f"__meta_kubernetes_pod_labelpresent_{_meta_name(k)}"] = "true"
        for c in (pod.get("spec") or {}).get("containers") or []:
            for port in c.get("ports") or []:
                out.append({"targets": [f"{ip}:{port['containerPort']}"],
                            "labels": {**base, "__meta_kubernetes_pod_container_name": c["name"],
                                       "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                                       "__meta_kubernetes_pod_container_port_number": str(port["containerPort"])}})
    return out


def scrape_config(targets_file: Path, operator_target: str | None, rules_file: Path | None,
                  interval: str = "1s") -> dict[str, Any]:
    """prometheus.yml for the local cluster (pure: tested without a cluster)."""
    from dsv4 import metrics_catalog as mc

    runtime_job = {
        "job_name": RUNTIME_JOB,
        "scrape_interval": interval, "scrape_timeout": interval,
        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_ready"], "regex": "true", "action": "keep"},
            *mc.runtime_scrape_relabelings("prometheus"),
        ],
    }
    cfg: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [runtime_job],
    }
    if operator_target:
        cfg["scrape_configs"].append({"job_name": OPERATOR_JOB, "scrape_interval": interval,
                                      "scrape_timeout": interval,
                                      "static_configs": [{"targets": [operator_target]}]})
    if rules_file is not None:
        cfg["rule_files"] = [str(rules_file)]
    return cfg


@dataclass
class Prometheus:
    work_dir: Path
    kubeconfig: Path                        # the pods are discovered with these credentials (pod_sd)
    operator_target: str | None = None
    rules_text: str | None = None           # a rules file (e.g. the shipped alerts) to evaluate
    interval: str = "1s"
    port: int = field(default_factory=free_port)
    rec: procs.ProcRecord | None = None
    sd_rec: procs.ProcRecord | None = None  # the pod_sd process feeding targets_file

    @classmethod
    def for_cluster(cls, cluster, work_dir: Path, **kw) -> Prometheus:
        return cls(work_dir=work_dir, kubeconfig=cluster.kubeconfig, **kw)

    @property
    def targets_file(self) -> Path:
        return self.work_dir / "targets" / "pods.json"

    def _start_discovery(self, timeout_s: float) -> None:
        argv = [sys.executable, "-m", "dsv4.e2e.pod_sd", "--kubeconfig", str(self.kubeconfig),
                "--out", str(self.targets_file)]
        _, self.sd_rec = procs.spawn("prometheus-pod-sd", argv, self.work_dir / "pod_sd.log")
        deadline = time.monotonic() + timeout_s
        while not self.targets_file.exists():
            if not procs.is_alive(self.sd_rec) or time.monotonic() > deadline:
                raise PrometheusError(f"pod discovery did not write {self.targets_file}; log:\n"
                                      f"{self.log_tail('pod_sd.log')}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Prometheus:
        """Start pod discovery, then Prometheus; wait for /-/ready. On failure both are stopped again."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> Prometheus:
        binary = ensure_prometheus()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        rules = None
        if self.rules_text:
            rules = self.work_dir / "rules.yaml"
            rules.write_text(self.rules_text)
        cfg_file = self.work_dir / "prometheus.yml"
        self._start_discovery(timeout_s)
        cfg_file.write_text(yaml.safe_dump(scrape_config(self.targets_file, self.operator_target, rules,
                                                         self.interval)))
        argv = [str(binary), f"--config.file={cfg_file}", f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                "--log.level=warn"]
        _, self.rec = procs.spawn("prometheus", argv, self.work_dir / "prometheus.log")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not procs.is_alive(self.rec):
                raise PrometheusError(f"prometheus exited; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise PrometheusError(f"prometheus not ready within {timeout_s:.0f} s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.rec is not None:
            procs.stop(self.rec, grace_s=10.0)
        if self.sd_rec is not None:
            procs.stop(self.sd_rec, grace_s=5.0)

    def log_tail(self, log: str = "prometheus.log", n: int = 30) -> str:
        p = self.work_dir / log
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else "(no log)"

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params or ''}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; PrometheusError (with Prometheus' message) when the expression does not evaluate."""
        data = self._api("/api/v1/query", {"query": expr})
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def targets(self) -> list[dict[str, Any]]:
        return self._api("/api/v1/targets")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return self._api("/api/v1/rules")["groups"]
