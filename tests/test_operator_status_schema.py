"""Every status the handlers can produce is accepted by the generated CRD's status schema, also after the
JSON merge patch kopf and the ticker send lands on the previous status (the API server validates the
merged object: a required field that ends up missing is `status.plan.maxModelLen: Required value`)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dsv4.operator import admission
from dsv4.operator.autoscaler import Sample
from dsv4.operator.reconcile import Observed, autoscale, occupancy_fields, reconcile

ROOT = Path(__file__).resolve().parents[1]
STATUS_SCHEMA = admission.schema()["properties"]["status"]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `application/merge-patch+json` does on the server)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def status_errors(status: dict[str, Any]) -> list[str]:
    return [f"status.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in jsonschema.Draft4Validator(STATUS_SCHEMA).iter_errors(status)]


def _example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())["spec"]


def _keda() -> dict[str, Any]:
    s = _example("short-chat.yaml")
    s["autoscaling"]["mode"] = "keda"
    return s


def _broken() -> dict[str, Any]:
    s = _example("short-chat.yaml")
    s["replicas"] = 2
    return s


SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "short-chat": ("chat", _example("short-chat.yaml")),
    "long-context-agent": ("agents", _example("long-context-agent.yaml")),
    "plan-invalid": ("too-big", _example("invalid-pro-on-h100.yaml")),
    "spec-invalid": ("chat", _broken()),
    "name-invalid": ("9chat", _example("long-context-agent.yaml")),
    "keda": ("chat", _keda()),
    "tiny-cpu": ("tiny", {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                          "accelerator": {"type": "cpu"}}),
}
OBSERVED = {
    "nothing-yet": Observed(),
    "rolled-out": Observed(deployment={"spec": {"replicas": 2}, "status": {"replicas": 2, "readyReplicas": 2,
                                                                           "updatedReplicas": 2}},
                           ready_pods=["a", "b"]),
    "failed": Observed(deployment={"spec": {"replicas": 3}, "status": {
        "replicas": 3, "readyReplicas": 1,
        "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}},
        ready_pods=["a"]),
    "apply-error": Observed(apply_error="ApiException: (422) Unprocessable Entity"),
    "keda-missing": Observed(keda_available=False),
}


def _lifecycle(name: str, spec: dict[str, Any], obs: Observed) -> list[dict[str, Any]]:
    """The sequence of status patches one endpoint receives: create, then three ticks (autoscaler on)."""
    from dsv4.operator import api

    patches = []
    first = reconcile(name, "ns", "uid", 1, copy.deepcopy(spec), None, obs, 1000.0)
    patches.append(first.status)
    status = copy.deepcopy(first.status)
    try:
        parsed = api.parse_spec(copy.deepcopy(spec))
    except Exception:  # noqa: BLE001 - invalid specs: the ticker skips them
        return patches
    for i, t in enumerate((1015.0, 1030.0, 1045.0)):
        tick_status = copy.deepcopy(status)
        autoscaler_replicas = None
        if parsed.builtin_autoscaling:
            samples = [Sample(t - dt, p, {"csa": 0.9 - 0.3 * i, "swa": 0.2}, 3.0) for dt in range(0, 60, 5)
                       for p in obs.ready_pods]
            res = autoscale(parsed, tick_status, status.get("desiredReplicas") or 1, obs, samples, t)
            tick_status.update(res.status_update)
            autoscaler_replicas = res.decision.desired
        else:
            tick_status.update(occupancy_fields({"csa": 0.5, "hca": 0.1}, 1.0))
        res = reconcile(name, "ns", "uid", 1, copy.deepcopy(spec), tick_status, obs, t, autoscaler_replicas)
        final = {**tick_status, **res.status}
        patches.append(final)
        status = merge_patch(status, final)
    return patches


@pytest.mark.parametrize(("spec_id", "obs_id"), list(itertools.product(SPECS, OBSERVED)))
def test_every_status_patch_and_merged_status_validates(spec_id: str, obs_id: str) -> None:
    name, spec = SPECS[spec_id]
    merged: dict[str, Any] = {}
    for patch in _lifecycle(name, spec, copy.deepcopy(OBSERVED[obs_id])):
        assert status_errors(patch) == [], patch
        merged = merge_patch(merged, patch)
        assert status_errors(merged) == []


def test_the_schema_check_catches_a_missing_required_plan_field() -> None:
    name, spec = SPECS["short-chat"]
    status = reconcile(name, "ns", "uid", 1, copy.deepcopy(spec), None, Observed(), 0.0).status
    assert status["plan"]["maxModelLen"] > 0
    del status["plan"]["maxModelLen"]
    assert any("maxModelLen" in e for e in status_errors(status))
    # and a merge patch carrying null for it (deletion) would break the stored object the same way
    stored = reconcile(name, "ns", "uid", 1, copy.deepcopy(spec), None, Observed(), 0.0).status
    assert any("maxModelLen" in e for e in status_errors(merge_patch(stored, {"plan": {"maxModelLen": None}})))


def test_no_status_field_is_ever_null() -> None:
    """A null in a merge patch deletes the field on the server: statuses must omit, never null, a field."""
    for spec_id, obs_id in itertools.product(SPECS, OBSERVED):
        name, spec = SPECS[spec_id]
        for patch in _lifecycle(name, spec, copy.deepcopy(OBSERVED[obs_id])):
            stack = [patch]
            while stack:
                node = stack.pop()
                for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
                    assert v is not None, (spec_id, obs_id, k)
                    if isinstance(v, dict | list):
                        stack.append(v)


@pytest.mark.slow
def test_tiny_model_on_the_default_h200_status_validates() -> None:
    """The e2e report: `accelerator.type: H200` (the default) with the tiny model. Planning sizes ~124 GiB
    of tiny-model blocks (tens of seconds, memoised by plan_cached); the status it yields is valid."""
    spec = {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"}}
    patches = _lifecycle("tiny", spec, Observed())
    assert patches[0]["plan"]["maxModelLen"] == 32768
    for p in patches:
        assert status_errors(p) == []
