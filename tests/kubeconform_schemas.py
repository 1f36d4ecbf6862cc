"""A local schema folder for kubeconform, written without network access.

kubeconform fetches its Kubernetes JSON schemas from GitHub by default; here they come from two local sources:

- the Kubernetes OpenAPI as JSON Schema, bundled (per release, strict variant) by the `kubernetes-validate`
  dev dependency. Its files point into a shared `_definitions.json` through absolute `/api/...` references
  that kubeconform cannot follow, so each kind is written standalone: the definitions it reaches are copied
  into its own `$defs` and every `$ref` made local.
- our CRD: `openAPIV3Schema` of `DSV4Endpoint` turned into JSON Schema 2020-12 (OpenAPI's boolean
  `exclusiveMinimum`/`nullable`, object properties closed as `kubectl --validate=strict` closes them).

`schema_locations(folder)` gives the `-schema-location` templates that find them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

STANDALONE = "{{ .NormalizedKubernetesVersion }}"
SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
_REF_PREFIXES = ("/api/_definitions.json#/$defs/", "#/$defs/")  # from a kind's file, inside _definitions.json


def schema_locations(folder: Path) -> list[str]:
    """kubeconform `-schema-location` templates for what `write_*` put under `folder`."""
    return [
        f"{folder}/{STANDALONE}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        f"{folder}/crds/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
    ]


def _kind_file(kind: str, api_version: str) -> str:
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix}.json"


def _definition_name(ref: Any) -> str | None:
    for prefix in _REF_PREFIXES:
        if str(ref).startswith(prefix):
            return str(ref)[len(prefix) :]
    return None


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        name = _definition_name(node.get("$ref"))
        found = {name} if name else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


def _localise(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _localise(v) for k, v in node.items()}
        name = _definition_name(out.get("$ref"))
        if name:
            out["$ref"] = f"#/$defs/{name}"
        return out
    if isinstance(node, list):
        return [_localise(v) for v in node]
    return node


def standalone_schema(k8s_version: str, kind: str, api_version: str) -> dict[str, Any]:
    """The strict schema of one built-in kind with every definition it reaches inlined under `$defs`."""
    src = SCHEMA_DIR / f"v{k8s_version}-local-strict"
    schema = json.loads((src / _kind_file(kind, api_version)).read_text())
    definitions = json.loads((src / "_definitions.json").read_text())["$defs"]
    wanted, todo = set(), _refs(schema)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo |= _refs(definitions[name]) - wanted
    out = _localise({k: v for k, v in schema.items() if k != "$id"})
    out["$defs"] = {name: _localise(definitions[name]) for name in sorted(wanted)}
    return out


def write_kubernetes_schemas(folder: Path, k8s_version: str, objects: list[dict[str, Any]]) -> None:
    """Standalone schemas for the built-in kinds among `objects` under `folder/v<version>/`."""
    out = folder / f"v{k8s_version}"
    out.mkdir(parents=True, exist_ok=True)
    for kind, api_version in {(o["kind"], o["apiVersion"]) for o in objects}:
        name = _kind_file(kind, api_version)
        if (SCHEMA_DIR / f"v{k8s_version}-local-strict" / name).is_file():
            (out / name).write_text(json.dumps(standalone_schema(k8s_version, kind, api_version)))


def openapi_to_json_schema(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema 2020-12, objects with `properties` closed (strict)."""
    if isinstance(node, list):
        return [openapi_to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_json_schema(v) for k, v in node.items() if k not in ("nullable", "exclusiveMinimum",
                                                                             "exclusiveMaximum")}  # fmt: skip
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if node.get(exclusive) is True and bound in node:
            out[exclusive] = out.pop(bound)
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
        out["additionalProperties"] = False
    return out


def write_crd_schemas(folder: Path, crd_path: Path) -> None:
    """`folder/crds/<group>/<kind>_<version>.json` for every served version of the CRD at `crd_path`."""
    crd = yaml.safe_load(crd_path.read_text())
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        props = schema.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        # ObjectMeta is the API server's to check, not the CRD's: left open
        props["metadata"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        out = folder / "crds" / group / f"{kind.lower()}_{version['name']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **openapi_to_json_schema(schema)}
        out.write_text(json.dumps(schema))
