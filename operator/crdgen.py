"""Generate the `DSV4Endpoint` CustomResourceDefinition from the pydantic models in `api.py`.

    python -m dsv4.operator.crdgen            # write crds/ and the Helm chart's crds/ copy
    python -m dsv4.operator.crdgen --check    # exit 1 when either file differs from the models

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema. The
conversion: inline every `$ref`; turn `anyOf: [X, null]` (optional fields) into X; drop `title`
and `additionalProperties: false` (pruning does that job); keep `additionalProperties: {schema}` for
maps; turn `additionalProperties: true` into `x-kubernetes-preserve-unknown-fields`; rewrite the
2020-12 numeric `exclusiveMinimum: n` as OpenAPI v3 `minimum: n, exclusiveMinimum: true`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from dsv4.operator import api

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = f"{api.GROUP}_{api.PLURAL}.yaml"
CRD_PATH = ROOT / "crds" / CRD_FILE
CHART_CRD_PATH = ROOT / "helm" / "dsv4-operator" / "crds" / CRD_FILE

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status",
     "description": "At least one replica serves."},
    {"name": "URL", "type": "string", "jsonPath": ".status.endpoint", "description": "OpenAI-compatible API."},
    {"name": "Replicas", "type": "string", "jsonPath": ".status.replicaCounts", "description": "Ready/desired."},
    {"name": "TP", "type": "string", "jsonPath": ".status.plan.parallelism",
     "description": "GPUs per replica and their layout (TP8: one tensor-parallel group; DP8+EP: 8 data-parallel "
                    "attention ranks with expert parallelism; DP2xTP4+EP: 2 such ranks of 4 tensor-parallel GPUs)."},
    {"name": "MaxCache", "type": "string", "jsonPath": ".status.maxCacheOccupancy",
     "description": "Fullest cache pool and its occupancy."},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason",
     "description": "Why the endpoint is degraded or invalid."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # -o wide
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.variant", "description": "Model variant.",
     "priority": 1},
    {"name": "Profile", "type": "string", "jsonPath": ".spec.profile.name", "description": "Workload profile.",
     "priority": 1},
    {"name": "Plan", "type": "string", "jsonPath": ".status.planSummary", "description": "The plan in one line.",
     "priority": 1},
]

_DROP = {"title", "discriminator"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:  # inline, keeping sibling keys (description, default) of the referring field
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        target.update({k: v for k, v in node.items() if k in ("description", "default")})
        node = target
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express anyOf {node['anyOf']} structurally")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.get("default", 0) is None:
            rest.pop("default")
        merged = _structural(variants[0], defs)
        merged.update({k: v for k, v in rest.items() if k not in _DROP})
        return _structural(merged, defs)
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in _DROP:
            continue
        if k == "properties":
            out[k] = {name: _structural(sub, defs) for name, sub in v.items()}
        elif k == "additionalProperties":
            if v is True or v == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(v, dict):
                out[k] = _structural(v, defs)
            # False: dropped (structural schemas prune unknown fields instead)
        elif k == "exclusiveMinimum" and not isinstance(v, bool):
            out["minimum"] = v
            out["exclusiveMinimum"] = True
        elif k == "exclusiveMaximum" and not isinstance(v, bool):
            out["maximum"] = v
            out["exclusiveMaximum"] = True
        elif k in ("items", "x-kubernetes-validations", "enum", "required", "default"):
            out[k] = _structural(v, defs) if k == "items" else v
        else:
            out[k] = _structural(v, defs) if isinstance(v, dict | list) else v
    if out.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out["type"] = "object"
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)
    return out


def openapi_schema() -> dict[str, Any]:
    """The CRD's `openAPIV3Schema`: spec and status from the models, with descriptions everywhere."""
    raw = api.DSV4Endpoint.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    spec = _structural({"$ref": "#/$defs/DSV4EndpointSpec"}, defs)
    status = _structural({"$ref": "#/$defs/DSV4EndpointStatus"}, defs)
    spec["description"] = api.DSV4Endpoint.model_fields["spec"].description
    status["description"] = api.DSV4Endpoint.model_fields["status"].description
    return {
        "type": "object",
        "description": "DSV4Endpoint serves a DeepSeek-V4-class model behind an OpenAI-compatible API: "
                       "the operator plans TP, batching and cache policy from the workload profile, "
                       "runs the pods and scales them on per-pool cache occupancy and queue depth.",
        "required": ["spec"],
        "x-kubernetes-validations": copy.deepcopy(api.NAME_RULES + api.SCALE_RULES),
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object (serving.dsv4.dev/v1alpha1)."},
            "kind": {"type": "string", "description": "Kind of this object (DSV4Endpoint)."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "annotations": {"dsv4.dev/generated-by": "python -m dsv4.operator.crdgen (do not edit)"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["dsv4", "all"],
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": openapi_schema()},
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector",
                    },
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def render() -> str:
    header = "# Generated by `python -m dsv4.operator.crdgen` from operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def targets() -> list[Path]:
    return [CRD_PATH, CHART_CRD_PATH]


def write() -> list[Path]:
    text = render()
    for path in targets():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return targets()


def stale() -> list[Path]:
    """Generated files that are missing or differ from what the models generate."""
    text = render()
    return [p for p in targets() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.operator.crdgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the generated files are out of date")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for p in bad:
            print(f"{p} is out of date: run python -m dsv4.operator.crdgen", file=sys.stderr)
        return 1 if bad else 0
    for p in write():
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
