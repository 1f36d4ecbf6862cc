"""`dsv4 plan` and `dsv4 operator` from the command line; kopf wiring of the handler module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kopf
import pytest
import yaml
from dsv4.operator import api

from tests.concurrency import errors_in_threads

ROOT = Path(__file__).resolve().parents[1]


def dsv4(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_plan_prints_choices_with_reasons() -> None:
    res = dsv4("plan", "-f", "examples/short-chat.yaml")
    assert res.returncode == 0, res.stderr
    for key in ("layout", "tensorParallelSize", "dataParallelSize", "cachePolicy", "sessionsPerReplica",
                "initialReplicas", "# "):
        assert key in res.stdout
    # the pod's resources and QoS class, explained
    assert "qosClass             Burstable" in res.stdout and "/dev/shm" in res.stdout and "memory=" in res.stdout


def test_plan_json_and_manifests() -> None:
    res = dsv4("plan", "-f", "examples/long-context-agent.yaml", "-o", "json")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    # Pro on 8 x B200: 8 data-parallel attention ranks with their own caches hold the most sessions per GPU
    assert p["name"] == "agents" and p["layout"] == "dp-ep" and p["parallelism"] == "DP8+EP"
    assert (p["tensor_parallel_size"], p["data_parallel_size"], p["initial_replicas"]) == (1, 8, 2)
    res = dsv4("plan", "-f", "examples/long-context-agent.yaml", "-o", "manifests", "--namespace", "x")
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    config = yaml.safe_load(docs[0]["data"]["config.yaml"])
    assert (config["tp"], config["dp"], config["ep"]) == (1, 8, True)
    assert {d["metadata"]["namespace"] for d in docs} == {"x"}


def test_plan_of_an_infeasible_endpoint_fails_with_the_reason() -> None:
    res = dsv4("plan", "-f", "examples/invalid-pro-on-h100.yaml")
    assert res.returncode == 1
    assert "WeightsDoNotFit" in res.stderr and "need more GPUs per replica" in res.stderr


def test_plan_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: serving.dsv4.dev/v1alpha1\nkind: DSV4Endpoint\nmetadata: {name: b}\n"
                   "spec: {model: {variant: flash}, profile: {name: short-chat}}\n")
    res = dsv4("plan", "-f", str(bad))
    assert res.returncode == 1 and "model.weights is required" in res.stderr
    res = dsv4("plan", "-f", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_operator_needs_a_scope() -> None:
    res = dsv4("operator")
    assert res.returncode == 2 and "-A" in res.stdout
    assert dsv4("operator", "--help").returncode == 0


def test_handlers_are_registered_and_storage_uses_the_project_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv4.operator import handlers

    reg = kopf.get_default_registry()
    changing = {h.id for h in reg._changing.get_all_handlers()}
    assert {"on_create", "on_update", "on_resume"} <= changing
    assert "track" in {h.id for h in reg._watching.get_all_handlers()}
    # no timers/daemons and no mandatory delete handler: kopf adds no finalizer (deletion never waits for us)
    assert not list(reg._spawning.get_all_handlers())
    assert not any(h.requires_finalizer for h in reg._changing.get_all_handlers())
    monkeypatch.setattr(handlers, "METRICS_PORT", 0)
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings)
    assert settings.persistence.progress_storage.prefix == api.GROUP
    assert settings.persistence.diffbase_storage.prefix == api.GROUP
    assert settings.persistence.finalizer.startswith(api.GROUP)


def test_operator_metrics_are_created_once_under_concurrent_first_use() -> None:
    """kopf runs sync handlers in worker threads; the first handlers race to create the collectors."""
    from dsv4.operator import telemetry

    telemetry._COLLECTORS = None
    import prometheus_client as pc

    # start from a registry without our families (one collector owns several names: _total, _created)
    ours = {c for n, c in list(pc.REGISTRY._names_to_collectors.items()) if n.startswith("dsv4_operator_")}
    for collector in ours:
        pc.REGISTRY.unregister(collector)
    def use() -> None:
        telemetry.collectors()["dsv4_operator_reconciles_total"].labels(handler="timer", result="success").inc()

    assert errors_in_threads(use, 8) == []
    assert pc.REGISTRY.get_sample_value("dsv4_operator_reconciles_total", {"handler": "timer",
                                                                          "result": "success"}) == 8
