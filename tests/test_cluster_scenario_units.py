"""Fast checks (no cluster) of the scenario harness: Prometheus file_sd targets and config, the operator
process command line, the e2e overlays' plans, the demo's argument checks, and the operator's serialised
discovery (the KeyError: 'resources' race the e2e suite found)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from dsv4.e2e import opproc, prom

REPO = Path(__file__).resolve().parents[1]


def _pod(name: str, ready: bool = True, phase: str = "Running", ip: str | None = "10.244.1.2", **meta) -> dict:
    return {"metadata": {"name": name, "namespace": "ns1", "labels": {"dsv4.io/endpoint": "chat", "app": "x"}, **meta},
            "spec": {"nodeName": "dsv4-gpu-0", "containers": [
                {"name": "engine", "ports": [{"name": "http", "containerPort": 8000}, {"containerPort": 9000}]}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_file_sd_targets_carry_kubernetes_sd_meta_labels():
    out = prom.file_sd_targets([_pod("a"), _pod("b", ready=False), _pod("c", phase="Pending"), _pod("d", ip=None),
                                _pod("e", deletionTimestamp="2026-01-01T00:00:00Z")])
    assert [t["targets"] for t in out] == [["10.244.1.2:8000"], ["10.244.1.2:9000"], ["10.244.1.2:8000"],
                                           ["10.244.1.2:9000"]]
    lb = out[0]["labels"]
    assert lb["__meta_kubernetes_pod_label_dsv4_io_endpoint"] == "chat"
    assert lb["__meta_kubernetes_namespace"] == "ns1" and lb["__meta_kubernetes_pod_name"] == "a"
    assert lb["__meta_kubernetes_pod_container_port_name"] == "http" and lb["__meta_kubernetes_pod_ready"] == "true"
    assert out[2]["labels"]["__meta_kubernetes_pod_ready"] == "false"


def test_scrape_config_uses_the_documented_relabelings(tmp_path):
    from dsv4 import metrics_catalog as mc

    cfg = prom.scrape_config(tmp_path / "t.json", "127.0.0.1:8080", tmp_path / "r.yaml", interval="2s")
    runtime, op = cfg["scrape_configs"]
    assert runtime["file_sd_configs"][0]["files"] == [str(tmp_path / "t.json")]
    assert runtime["relabel_configs"][-4:] == mc.runtime_scrape_relabelings("prometheus")
    assert op["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]
    assert cfg["rule_files"] == [str(tmp_path / "r.yaml")] and cfg["global"]["scrape_interval"] == "2s"
    assert "rule_files" not in prom.scrape_config(tmp_path / "t.json", None, None)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_promtool_accepts_the_generated_config(tmp_path):
    from dsv4.operator.observability import alerts

    (tmp_path / "t.json").write_text("[]")
    (tmp_path / "r.yaml").write_text(alerts.rules_file_text())
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(prom.scrape_config(tmp_path / "t.json", "127.0.0.1:8080", tmp_path / "r.yaml")))
    r = subprocess.run(["promtool", "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_operator_process_runs_the_charts_command_line(tmp_path):
    op = opproc.OperatorProcess(tmp_path / "kc", tmp_path / "log")
    argv = op.argv()
    assert argv[1:4] == ["-m", "dsv4.cli", "operator"] and "--all-namespaces" in argv
    chart = (REPO / "helm/dsv4-operator/templates/deployment.yaml").read_text()
    for flag in ("--all-namespaces", "--metrics-port=", "--liveness=http://"):
        assert flag in chart and any(a.startswith(flag) for a in argv), flag
    assert op.metrics_port != op.health_port
    assert not op.alive()


@pytest.mark.parametrize("name", ["short-chat", "long-context-agent"])
def test_e2e_overlays_plan_on_cpu_and_keep_the_profile(name):
    from dsv4.operator import api
    from dsv4.operator.planner import plan

    overlay = yaml.safe_load((REPO / "examples/e2e" / f"{name}.yaml").read_text())
    original = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    assert overlay["spec"]["profile"]["name"] == original["spec"]["profile"]["name"]
    assert overlay["spec"]["accelerator"]["type"] == "cpu" and overlay["spec"]["model"]["variant"] == "tiny"
    p = plan(api.parse_spec(overlay["spec"]))
    assert p.cache_bytes_per_gpu < 1 << 30  # small enough for several pods on a 24 GB host


def test_demo_rejects_bad_max_tokens(capsys):
    from dsv4 import demo

    with pytest.raises(SystemExit):
        demo.main(["--max-tokens", "0"])
    assert "--max-tokens must be >= 1, got 0" in capsys.readouterr().err


def test_demo_failure_names_the_real_pod_log_and_its_last_line(monkeypatch, tmp_path):
    from dsv4 import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    log = tmp_path / "cache/dsv4/cluster/demo/pods/default_chat-6d9f-abc_1234abcd/logs/dsv4.log"
    log.parent.mkdir(parents=True)
    log.write_text("loading\nFileNotFoundError: config.yaml does not exist\n")
    hints = demo.failure_hints()
    assert hints[0] == f"pod log {log}: last line 'FileNotFoundError: config.yaml does not exist'"
    assert "kubectl logs -n default deploy/chat" in hints[1]
    assert hints[2].startswith(f"operator and control-plane logs: {tmp_path / 'cache/dsv4/cluster/demo/logs'}")


def test_operator_discovery_lookups_are_serialised(monkeypatch):
    from dsv4.operator import kube

    active, peak = [0], [0]

    class Resources:
        def get(self, **kw):
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            time.sleep(0.01)
            active[0] -= 1
            return kw["kind"]

    class Dyn:
        resources = Resources()

    monkeypatch.setattr(kube, "_dyn", lambda: Dyn())
    threads = [threading.Thread(target=kube._resource, args=("v1", f"K{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


def test_reliability_doc_commands_name_real_tests():
    text = (REPO / "docs/reliability.md").read_text()
    section = text[text.index("## Operator"):]
    ids = re.findall(r"(e2e/tests/test_e2e_\w+\.py::\w+)", section)
    assert ids
    src = {f: (REPO / f).read_text() for f in {i.split("::")[0] for i in ids}}
    for i in ids:
        f, name = i.split("::")
        assert f"def {name}(" in src[f], i
