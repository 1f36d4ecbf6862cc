"""The DSV4Endpoint CRD: generated from the models, structural, explained, and its CEL rules work."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from dsv4.operator import api, crdgen
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _schema() -> dict[str, Any]:
    return crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_generated_files_match_the_models() -> None:
    stale = crdgen.stale()
    assert not stale, f"run `python -m dsv4.operator.crdgen`: {[str(p) for p in stale]} differ from operator/api.py"
    on_disk = yaml.safe_load(crdgen.CRD_PATH.read_text())
    assert on_disk == crdgen.crd()
    assert crdgen.CHART_CRD_PATH.read_text() == crdgen.CRD_PATH.read_text()


def test_drift_check_detects_an_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_path = tmp_path / "crd.yaml"
    copy_path.write_text(crdgen.render().replace("dsv4ep", "dsv4x"))
    monkeypatch.setattr(crdgen, "targets", lambda: [copy_path])
    assert crdgen.stale() == [copy_path]
    assert crdgen.main(["--check"]) == 1


def test_names_scope_and_subresources() -> None:
    spec = crdgen.crd()["spec"]
    assert spec["group"] == "serving.dsv4.dev"
    assert spec["names"]["kind"] == "DSV4Endpoint"
    assert spec["names"]["plural"] == "dsv4endpoints"
    assert spec["names"]["shortNames"] == ["dsv4ep"]
    v = spec["versions"][0]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert v["subresources"]["status"] == {}
    assert v["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                          "statusReplicasPath": ".status.replicas",
                                          "labelSelectorPath": ".status.selector"}
    cols = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert list(cols) == ["Ready", "URL", "Replicas", "TP", "MaxCache", "Reason", "Age", "Model", "Profile", "Plan"]
    wide = [c["name"] for c in v["additionalPrinterColumns"] if c.get("priority") == 1]
    assert wide == ["Model", "Profile", "Plan"]
    # every printer column and scale path points at a field the schema has
    schema = _schema()
    for path in [*cols.values(), ".spec.replicas", ".status.replicas", ".status.selector"]:
        if path.startswith(".metadata"):
            continue
        node = schema
        for part in jsonpath_parts(path):
            name, _, flt = part.partition("[")
            node = node["properties"][name]
            if flt:  # conditions[?(@.type=="Ready")]: a field of the list's items
                node = node["items"]
        assert node["type"] in ("integer", "string"), path


def jsonpath_parts(path: str) -> list[str]:
    """`.status.conditions[?(@.type=="Ready")].status` -> status, conditions[...], status."""
    return re.findall(r'[^.\[]+(?:\[[^\]]*\])?', path)


def column_values(obj: dict[str, Any]) -> dict[str, Any]:
    """What `kubectl get` shows per column, for the two JSONPath forms the CRD uses."""
    out = {}
    for c in crdgen.PRINTER_COLUMNS:
        node: Any = obj
        for part in jsonpath_parts(c["jsonPath"]):
            name, _, flt = part.partition("[")
            node = (node or {}).get(name)
            if flt:
                want = flt.split('"')[1]
                node = next((x for x in node or [] if x.get("type") == want), None)
        out[c["name"]] = node
    return out


def test_printer_columns_read_what_the_operator_writes() -> None:
    from dsv4.operator.reconcile import Observed, reconcile

    obj = _example("long-context-agent.yaml")
    dep = {"spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 1}}
    obj["status"] = reconcile("agents", "ns", "uid", 1, obj["spec"], None, Observed(deployment=dep), 0.0).status
    cols = column_values(obj)
    assert cols["Ready"] == "True" and cols["URL"] == "http://agents.ns.svc:8000/v1" and cols["Replicas"] == "1/2"
    # Pro on 8 x B200: data-parallel attention with expert parallelism; the TP column names the layout
    assert cols["TP"] == obj["status"]["plan"]["parallelism"] == "DP8+EP" and cols["Reason"] == ""
    assert obj["status"]["plan"]["dataParallelSize"] == 8 and obj["status"]["plan"]["tensorParallelSize"] == 1
    assert cols["Plan"].startswith(f"{cols['TP']}, ")
    # on 8 x H200 DP8+EP does not fit: each data-parallel rank is a TP group (test_operator_planner derives which)
    obj["spec"]["accelerator"]["type"] = "H200"
    obj["status"] = reconcile("agents", "ns", "uid", 2, obj["spec"], None, Observed(deployment=dep), 0.0).status
    cols, p = column_values(obj), obj["status"]["plan"]
    assert p["dataParallelSize"] > 1 and p["tensorParallelSize"] > 1
    assert cols["TP"] == f"DP{p['dataParallelSize']}xTP{p['tensorParallelSize']}+EP"
    bad = _example("invalid-pro-on-h100.yaml")
    bad["status"] = reconcile("too-big", "ns", "uid", 1, bad["spec"], None, Observed(), 0.0).status
    cols = column_values(bad)
    assert cols["Ready"] == "False" and cols["Reason"] == "WeightsDoNotFit"
    # a degraded endpoint names its cause; healthy again, the column empties (merge patch: never a null)
    failing = {**dep, "status": {**dep["status"], "conditions": [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "x"}]}}
    obj["status"] = reconcile("agents", "ns", "uid", 1, obj["spec"], obj["status"], Observed(deployment=failing),
                              1.0).status
    assert column_values(obj)["Reason"] == "ProgressDeadlineExceeded"
    obj["status"] = reconcile("agents", "ns", "uid", 1, obj["spec"], obj["status"], Observed(deployment=dep),
                              2.0).status
    assert column_values(obj)["Reason"] == ""


def test_schema_is_structural_and_every_field_is_described() -> None:
    for path, node in _walk(_schema()):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "title", "$defs"} & set(node), path
        assert "type" in node, f"{path or '<root>'} has no type"
        if node.get("additionalProperties") is False:
            raise AssertionError(f"{path}: additionalProperties false is not structural")
        if node["type"] == "object" and "properties" in node:
            assert "additionalProperties" not in node, path
        if path and not path.endswith(("[]", "{}")) and path != ".metadata":
            assert node.get("description"), f"{path} has no description (kubectl explain)"
        if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(node["exclusiveMinimum"], bool):
            raise AssertionError(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3")


def _rules() -> list[tuple[str, dict[str, str]]]:
    return [(path, r) for path, node in _walk(_schema()) for r in node.get("x-kubernetes-validations", [])]


def _node_at(obj: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def cel_violations(obj: dict[str, Any]) -> list[str]:
    """Evaluate every CEL rule of the schema on `obj` as the API server would (self = the node)."""
    env = celpy.Environment()
    out = []
    for path, rule in _rules():
        node = _node_at(obj, path)
        if node is None:
            continue
        prog = env.program(env.compile(rule["rule"]))
        if not bool(prog.evaluate({"self": celpy.json_to_cel(node)})):
            out.append(rule["message"])
    return out


def with_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    """Apply schema defaults the way the API server does (object defaults, then their fields)."""
    obj = copy.deepcopy(obj)

    def fill(node: dict[str, Any], value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name, sub in (node.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = fill(sub, value[name])
        return value

    return fill(_schema(), obj)


def _example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_schema_and_cel(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    jsonschema.Draft4Validator(_schema()).validate(obj)
    assert cel_violations(with_defaults(obj)) == []
    api.DSV4Endpoint.model_validate(obj)  # pydantic agrees


BAD_CASES = {
    "min-above-max": (lambda s: s.update(autoscaling={"enabled": True, "minReplicas": 5, "maxReplicas": 2}),
                      "must be <= autoscaling.maxReplicas"),
    "both-weight-sources": (lambda s: s["model"]["weights"].update(hostPath={"path": "/m"}),
                            "set exactly one of pvc or hostPath"),
    "custom-profile-missing": (lambda s: s.update(profile={"name": "custom"}),
                               "profile.custom must be set exactly when profile.name is custom"),
    "custom-profile-unordered": (lambda s: s.update(profile={"name": "custom", "custom": {
        "contextP50": 9000, "contextP95": 8000, "contextMax": 10000}}), "contextP50 <= contextP95 <= contextMax"),
    "tp-above-node": (lambda s: s.update(overrides={"tensorParallelSize": 16}),
                      "must be <= accelerator.gpusPerNode"),
    "custom-model-without-config": (lambda s: s["model"].update(variant="custom"),
                                    "model.config (the checkpoint's config.json) is required"),
    "custom-gpu-without-memory": (lambda s: s.update(accelerator={"type": "custom"}),
                                  "accelerator.memoryGiB is required when type is custom"),
    "panic-window-above-stable": (lambda s: s.update(autoscaling={"panicWindowSeconds": 120,
                                                                  "stableWindowSeconds": 60}),
                                  "panicWindowSeconds must be <= autoscaling.stableWindowSeconds"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_cel_and_pydantic_reject_the_same_objects_with_the_same_message(case: str) -> None:
    mutate, message = BAD_CASES[case]
    obj = _example("short-chat.yaml")
    obj["spec"].pop("autoscaling")
    assert cel_violations(with_defaults(obj)) == []
    mutate(obj["spec"])
    jsonschema.Draft4Validator(_schema()).validate(obj)  # shape is fine: only a cross-field rule fails
    violations = cel_violations(with_defaults(obj))
    assert any(message in v for v in violations), violations
    with pytest.raises(ValidationError) as err:
        api.parse_spec(obj["spec"])
    assert message in api.format_validation_error(err.value)


def test_schema_rejects_wrong_types_and_enums() -> None:
    obj = _example("short-chat.yaml")
    validator = jsonschema.Draft4Validator(_schema())
    for mutate in (lambda s: s["model"].update(variant="llama"), lambda s: s.update(replicas=-1),
                   lambda s: s["autoscaling"].update(targetOccupancy=0),
                   lambda s: s["profile"].update(name="chatty")):
        bad = copy.deepcopy(obj)
        mutate(bad["spec"])
        assert list(validator.iter_errors(bad)), "schema accepted an invalid object"


def test_status_model_round_trips_scaling_history_limit() -> None:
    st = api.DSV4EndpointStatus(scaling_history=[api.ScalingDecision(time="t", from_replicas=1, to_replicas=2,
                                                                     reason="r")] * 5)
    assert len(st.wire()["scalingHistory"]) == 5
    with pytest.raises(ValidationError):
        api.DSV4EndpointStatus(scaling_history=[api.ScalingDecision(time="t", from_replicas=1, to_replicas=2,
                                                                    reason="r")] * 6)
    history = _schema()["properties"]["status"]["properties"]["scalingHistory"]
    assert history["maxItems"] == api.MAX_SCALING_HISTORY


def test_object_defaults_satisfy_their_own_schema_and_cel_rules() -> None:
    """The API server validates defaults (including CEL) when the CRD is created: `default: {}` on an
    object whose rule reads a field fails there ("no such key"), so defaults must be complete."""
    env = celpy.Environment()
    checked = 0
    for path, node in _walk(_schema()):
        if "default" not in node:
            continue
        jsonschema.Draft4Validator(node).validate(node["default"])
        for rule in node.get("x-kubernetes-validations", []):
            prog = env.program(env.compile(rule["rule"]))
            assert bool(prog.evaluate({"self": celpy.json_to_cel(node["default"])})), (path, rule["rule"])
            checked += 1
    assert checked >= 1
