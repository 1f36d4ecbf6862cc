"""Invalid DSV4Endpoints: a table of bad objects → the message the API server gives (OpenAPI schema or CEL,
evaluated offline by `dsv4.operator.admission` with jsonschema and cel-python), the same objects rejected by
the pydantic models (the operator and `dsv4 plan`), and what CEL cannot express → PlanValid=False, no
children, no exception, one Warning event."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsv4.operator import admission, api
from dsv4.operator.reconcile import Observed, reconcile
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict[str, Any]:
    """A valid object (short-chat example without autoscaling, so replicas may be set)."""
    obj = yaml.safe_load((ROOT / "examples" / "short-chat.yaml").read_text())
    obj["spec"].pop("autoscaling")
    return obj


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = obj
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


# id -> (mutation, field path in the message, fragment naming the rule or the limit)
BAD: dict[str, tuple[Callable[[dict[str, Any]], None], str, str]] = {
    # --- CEL (x-kubernetes-validations): cross-field rules
    "replicas-and-autoscaler": (lambda o: o["spec"].update(replicas=2, autoscaling={"enabled": True}),
                                "spec.replicas", "the autoscaler owns replicas"),
    "min-above-max": (_set("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
                      "spec.autoscaling", "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
    "panic-above-stable": (_set("spec.autoscaling", {"panicWindowSeconds": 120, "stableWindowSeconds": 60}),
                           "spec.autoscaling", "panicWindowSeconds must be <= autoscaling.stableWindowSeconds"),
    "two-weight-sources": (_set("spec.model.weights.hostPath", {"path": "/m"}),
                           "spec.model.weights", "set exactly one of pvc or hostPath"),
    "no-weights": (lambda o: o["spec"]["model"].pop("weights"),
                   "spec.model", "model.weights is required unless model.variant is tiny"),
    "custom-model-no-config": (_set("spec.model.variant", "custom"),
                               "spec.model", "model.config (the checkpoint's config.json) is required"),
    "custom-profile-missing": (_set("spec.profile", {"name": "custom"}),
                               "spec.profile", "profile.custom must be set exactly when profile.name is custom"),
    "custom-profile-unordered": (_set("spec.profile", {"name": "custom", "custom": {
        "contextP50": 9000, "contextP95": 8000, "contextMax": 10000}}),
        "spec.profile.custom", "contextP50 <= contextP95 <= contextMax"),
    "custom-gpu-no-memory": (_set("spec.accelerator", {"type": "custom"}),
                             "spec.accelerator", "accelerator.memoryGiB is required when type is custom"),
    "tp-above-node": (_set("spec.overrides", {"tensorParallelSize": 16}),
                      "spec", "overrides.tensorParallelSize must be <= accelerator.gpusPerNode"),
    "dp-above-node": (_set("spec.overrides", {"dataParallelSize": 16}),
                      "spec", "overrides.dataParallelSize must be <= accelerator.gpusPerNode"),
    "dp-times-tp-above-node": (_set("spec.overrides", {"dataParallelSize": 4, "tensorParallelSize": 4}),
                               "spec", "overrides.dataParallelSize x overrides.tensorParallelSize must be <= "
                                       "accelerator.gpusPerNode"),
    "dp-size-with-layout-tp": (_set("spec.overrides", {"dataParallelSize": 2, "layout": "tp"}),
                               "spec.overrides", "it excludes layout tp"),
    "name-too-long": (_set("metadata.name", "a" * 64), "<root>", "at most 63 characters"),
    "name-starts-with-digit": (_set("metadata.name", "1chat"), "<root>", "DNS-1035 label"),
    "name-with-dot": (_set("metadata.name", "chat.v4"), "<root>", "DNS-1035 label"),
    # --- OpenAPI schema: types, enums, ranges, lengths, patterns (the limit is in the message)
    "replicas-negative": (_set("spec.replicas", -1), "spec.replicas", "0"),
    "replicas-huge": (_set("spec.replicas", 5000), "spec.replicas", "1000"),
    "replicas-wrong-type": (_set("spec.replicas", "two"), "spec.replicas", "integer"),
    "unknown-variant": (_set("spec.model.variant", "llama"), "spec.model.variant", "flash"),
    "unknown-profile": (_set("spec.profile.name", "chatty"), "spec.profile.name", "short-chat"),
    "occupancy-zero": (_set("spec.autoscaling", {"targetOccupancy": 0}), "spec.autoscaling.targetOccupancy", "0"),
    "occupancy-above-one": (_set("spec.autoscaling", {"targetOccupancy": 1.5}),
                            "spec.autoscaling.targetOccupancy", "1"),
    "gpus-per-node-zero": (_set("spec.accelerator.gpusPerNode", 0), "spec.accelerator.gpusPerNode", "1"),
    "max-model-len-tiny": (_set("spec.overrides", {"maxModelLen": 8}), "spec.overrides.maxModelLen", "16"),
    "dp-size-one": (_set("spec.overrides", {"dataParallelSize": 1}), "spec.overrides.dataParallelSize", "2"),
    "unknown-layout": (_set("spec.overrides", {"layout": "pp"}), "spec.overrides.layout", "dp-ep"),
    "prefix-reuse-above-one": (_set("spec.profile", {"name": "custom", "custom": {
        "contextP50": 1, "contextP95": 2, "contextMax": 3, "prefixReuseRatio": 1.5}}),
        "spec.profile.custom.prefixReuseRatio", "1"),
    "grace-below-prestop": (_set("spec.terminationGracePeriodSeconds", 10),
                            "spec.terminationGracePeriodSeconds", "20"),
    "secret-name-uppercase": (_set("spec.apiKeySecret", {"name": "My_Key"}), "spec.apiKeySecret.name",
                              api.DNS_SUBDOMAIN),
    "secret-key-path": (_set("spec.apiKeySecret", {"name": "k", "key": "../etc/passwd"}),
                        "spec.apiKeySecret.key", api.SECRET_KEY),
    "pvc-name-uppercase": (_set("spec.model.weights.pvc.claimName", "Weights"),
                           "spec.model.weights.pvc.claimName", api.DNS_SUBDOMAIN),
    "host-path-relative": (lambda o: o["spec"]["model"].update(weights={"hostPath": {"path": "models/v4"}}),
                           "spec.model.weights.hostPath.path", "^/"),
    "memory-not-a-quantity": (_set("spec.placement", {"resources": {"requests": {"memory": "lots"}}}),
                              "spec.placement.resources.requests.memory", "[KMGTPE]i"),
    "node-selector-value": (_set("spec.placement", {"nodeSelector": {"gpu": "H200 SXM"}}),
                            "spec.placement.nodeSelector.gpu", api.LABEL_VALUE),
    "priority-class-name": (_set("spec.placement", {"priorityClassName": "High Priority"}),
                            "spec.placement.priorityClassName", api.DNS_SUBDOMAIN),
    "gpu-resource-no-domain": (_set("spec.accelerator.resourceName", "gpu"), "spec.accelerator.resourceName",
                               api.EXTENDED_RESOURCE),
    "image-with-space": (_set("spec.image", "dsv4 latest"), "spec.image", "\\S"),
    "prometheus-no-scheme": (_set("spec.autoscaling", {"mode": "keda", "prometheusAddress": "prom:9090"}),
                             "spec.autoscaling.prometheusAddress", "https?://"),
    "service-port-high": (_set("spec.service", {"port": 70000}), "spec.service.port", "65535"),
}


# Rules only the API server applies: they depend on the object's history, not the spec alone.
API_SERVER_ONLY = {"replicas-and-autoscaler"}


def test_the_base_object_is_admitted() -> None:
    assert admission.admission_errors(base()) == []
    api.DSV4Endpoint.model_validate(base())


@pytest.mark.parametrize("overrides", [{"dataParallelSize": 2, "tensorParallelSize": 4},
                                       {"layout": "dp-ep", "tensorParallelSize": 4}, {"dataParallelSize": 8}])
def test_data_parallel_ranks_with_tp_inside_are_admitted(overrides: dict[str, Any]) -> None:
    obj = base()
    obj["spec"]["overrides"] = overrides
    assert admission.admission_errors(obj) == []
    api.DSV4Endpoint.model_validate(obj)


@pytest.mark.parametrize("case", sorted(BAD))
def test_admission_rejects_with_a_message_naming_field_and_limit(case: str) -> None:
    mutate, path, fragment = BAD[case]
    obj = base()
    mutate(obj)
    errors = admission.admission_errors(obj)
    assert errors, f"{case}: the API server would admit {obj['spec']}"
    assert any(e.startswith(f"{path}:") and fragment in e for e in errors), errors


@pytest.mark.parametrize("case", sorted(BAD))
def test_pydantic_rejects_the_same_objects(case: str) -> None:
    """The operator (and `dsv4 plan`) reject exactly what the CRD rejects, so an old CRD or disabled CEL
    still yields PlanValid=False instead of a crash."""
    mutate, path, _ = BAD[case]
    obj = base()
    mutate(obj)
    if case in API_SERVER_ONLY:  # the operator itself writes this state (spec.replicas mirrors its decision)
        api.DSV4Endpoint.model_validate(obj)
        return
    with pytest.raises(ValidationError) as err:
        api.DSV4Endpoint.model_validate(obj)
    if path.startswith("spec.") and path.count(".") >= 1:
        assert path.split(".")[1] in str(err.value), str(err.value)


def test_every_cel_rule_sits_on_an_object_the_table_reaches() -> None:
    rules = [(p, r["message"]) for p, n in admission.walk(admission.schema()) for r in n.get(
        "x-kubernetes-validations", [])]
    assert not [p for p, _ in rules if "[]" in p or "{}" in p], "rules below arrays/maps are not evaluated"
    covered = {fragment for _, _, fragment in BAD.values()}
    for path, message in rules:
        assert any(f in message for f in covered), f"no bad object in the table breaks {path}: {message}"


# --- what CEL cannot express: the planner's verdict, reported in status ---------------------------
PLAN_INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "pro-on-h100": ({"model": {"variant": "pro", "weights": {"pvc": {"claimName": "w"}}},
                     "profile": {"name": "coding-agent"}, "accelerator": {"type": "H100"}}, "WeightsDoNotFit"),
    "tp-not-dividing-heads": ({"model": {"variant": "flash", "weights": {"pvc": {"claimName": "w"}}},
                               "profile": {"name": "short-chat"}, "overrides": {"tensorParallelSize": 3}},
                              "InvalidTensorParallel"),
    "dp-not-dividing-experts": ({"model": {"variant": "flash", "weights": {"pvc": {"claimName": "w"}}},
                                 "profile": {"name": "short-chat"}, "overrides": {"dataParallelSize": 3}},
                                "InvalidDataParallel"),
    "dp-times-tp-not-dividing-experts": ({"model": {"variant": "flash", "weights": {"pvc": {"claimName": "w"}}},
                                          "profile": {"name": "short-chat"},
                                          "overrides": {"dataParallelSize": 3, "tensorParallelSize": 2}},
                                         "InvalidDataParallel"),
    "context-beyond-model": ({"model": {"variant": "pro", "weights": {"pvc": {"claimName": "w"}}},
                              "profile": {"name": "custom", "custom": {"contextP50": 1000, "contextP95": 2000,
                                                                      "contextMax": 2_000_000}}},
                             "ContextDoesNotFit"),
    "itl-unreachable": ({"model": {"variant": "pro", "weights": {"pvc": {"claimName": "w"}}},
                         "profile": {"name": "custom", "custom": {"contextP50": 1000, "contextP95": 2000,
                                                                 "contextMax": 4000, "itlTargetMs": 1}}},
                        "LatencyTargetUnreachable"),
    "custom-config-garbage": ({"model": {"variant": "custom", "config": {"hidden_size": "wide"},
                                         "weights": {"pvc": {"claimName": "w"}}},
                               "profile": {"name": "short-chat"}}, "InvalidModelConfig"),
}


@pytest.mark.parametrize("case", sorted(PLAN_INVALID))
def test_plan_invalid_specs_pass_admission_and_report_planvalid_false(case: str) -> None:
    spec, reason = PLAN_INVALID[case]
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "ep"}, "spec": spec}
    assert admission.admission_errors(obj) == []
    r = reconcile("ep", "ns", "uid", 3, copy.deepcopy(spec), None, Observed(), 100.0)
    pv = next(c for c in r.status["conditions"] if c["type"] == "PlanValid")
    assert (pv["status"], pv["reason"]) == ("False", reason), pv
    assert r.objects == [] and r.error == pv["message"]
    assert [(t, why) for t, why, _ in r.events] == [("Warning", reason)]
    assert reconcile("ep", "ns", "uid", 3, copy.deepcopy(spec), r.status, Observed(), 200.0).events == []


def test_invalid_name_is_reported_when_cel_did_not_run() -> None:
    spec = base()["spec"]
    r = reconcile("1-chat", "ns", "uid", 1, spec, None, Observed(), 0.0)
    pv = next(c for c in r.status["conditions"] if c["type"] == "PlanValid")
    assert (pv["status"], pv["reason"]) == ("False", "InvalidName") and "DNS-1035" in pv["message"]
    assert r.objects == []


def test_a_planner_bug_is_a_condition_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv4.operator import reconcile as rec

    def boom(_spec: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(rec, "plan_cached", boom)
    r = rec.reconcile("chat", "ns", "uid", 1, base()["spec"], None, Observed(), 0.0)
    pv = next(c for c in r.status["conditions"] if c["type"] == "PlanValid")
    assert (pv["status"], pv["reason"]) == ("False", "PlanFailed") and "ZeroDivisionError" in pv["message"]
    assert r.objects == []


# --- transition rules: what an update may change (`/scale` PUT, `kubectl scale`, `kubectl apply`) ------------
def autoscaled(replicas: int | None, desired: int | None, mode: str = "builtin") -> dict[str, Any]:
    obj = base()
    obj["spec"]["autoscaling"] = {"enabled": True, "mode": mode, "minReplicas": 1, "maxReplicas": 8}
    if replicas is not None:
        obj["spec"]["replicas"] = replicas
    if desired is not None:
        obj["status"] = {"desiredReplicas": desired}
    return obj


@pytest.mark.parametrize("mode", ["builtin", "keda"])
def test_under_autoscaling_only_the_autoscalers_decision_may_be_written_to_spec_replicas(mode: str) -> None:
    stored = autoscaled(3, 3, mode)
    # kubectl scale dsv4ep/chat --replicas=5 (a PUT on /scale): refused, naming the field and the way out
    errors = admission.admission_errors(autoscaled(5, 3, mode), old=stored)
    assert errors == [f"spec.replicas: {api.SCALE_MESSAGE}"]
    # the operator mirroring a new decision: status.desiredReplicas already says 5
    assert admission.admission_errors(autoscaled(5, 5, mode), old=autoscaled(3, 5, mode)) == []
    # unrelated updates (status writes, spec edits) keep the old value: admitted
    assert admission.admission_errors(autoscaled(3, 7, mode), old=stored) == []
    # first write of the mirror, before any status: refused unless it equals the decision
    assert admission.admission_errors(autoscaled(4, None, mode), old=autoscaled(None, None, mode))
    assert admission.admission_errors(autoscaled(4, 4, mode), old=autoscaled(None, 4, mode)) == []
    # create: replicas together with autoscaling is refused (optionalOldSelf: the rule runs without an old object)
    assert admission.admission_errors(autoscaled(5, None, mode)) == [f"spec.replicas: {api.SCALE_MESSAGE}"]
    assert admission.admission_errors(autoscaled(None, None, mode)) == []


def test_without_autoscaling_spec_replicas_is_free_to_change() -> None:
    old, new = base(), base()
    old["spec"]["replicas"], new["spec"]["replicas"] = 2, 6
    assert admission.admission_errors(new, old=old) == []
