"""What the API server would answer to a `DSV4Endpoint`, offline: schema defaults, OpenAPI, then CEL.

`admission_errors(obj)` applies the CRD's defaults the way the API server does (an absent field with a
default gets it, recursively), validates the OpenAPI v3 schema (jsonschema, Draft 4 semantics as in
OpenAPI v3.0: `exclusiveMinimum: true` beside `minimum`), and evaluates every `x-kubernetes-validations`
rule with cel-python (`self` = the node the rule sits on; a rule on an absent node is not evaluated, as
in Kubernetes). Each problem is one line `<field path>: <message>`.

Used by the tests (the table of bad objects) and usable before `kubectl apply`; needs the dev extra
(`jsonschema`, `cel-python`), imported lazily.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from dsv4.operator import crdgen


def schema() -> dict[str, Any]:
    return crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted path, schema node) for every node; arrays add `[]`, maps `{}`."""
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def with_defaults(obj: dict[str, Any], root: dict[str, Any] | None = None) -> dict[str, Any]:
    """`obj` with the schema's defaults filled in (object defaults first, then their fields)."""
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

    return fill(root or schema(), obj)


def _node_at(obj: Any, path: str) -> Any:
    for part in [p for p in path.split(".") if p]:
        if part.endswith(("[]", "{}")) or not isinstance(obj, dict) or part not in obj:
            return None  # rules below arrays/maps: none exist in this CRD (a test checks)
        obj = obj[part]
    return obj


def cel_errors(obj: dict[str, Any], root: dict[str, Any] | None = None, old: dict[str, Any] | None = None) -> list[str]:
    """Every CEL rule that `obj` (defaults applied by the caller) breaks, as `<path>: <message>`. Transition
    rules (those reading `oldSelf`) run only for an update, i.e. when `old` (the stored object) is given, unless
    they set `optionalOldSelf` (then on create too, with `oldSelf.hasValue()` false)."""
    import celpy

    env = celpy.Environment()
    out = []
    for path, node in walk(root or schema()):
        for rule in node.get("x-kubernetes-validations", []):
            value = _node_at(obj, path)
            text, transition = rule["rule"], "oldSelf" in rule["rule"]
            old_value = _node_at(old, path) if old is not None else None
            if value is None or (transition and old_value is None and not rule.get("optionalOldSelf")):
                continue
            bindings = {"self": celpy.json_to_cel(value)}
            if rule.get("optionalOldSelf"):  # cel-python has no optionals: oldSelf.hasValue() becomes a boolean
                text = text.replace("oldSelf.hasValue()", "oldSelfHasValue").replace("oldSelf.value()", "oldSelf")
                bindings["oldSelfHasValue"] = celpy.json_to_cel(old_value is not None)
            if transition:
                bindings["oldSelf"] = celpy.json_to_cel(old_value if old_value is not None else {})
            try:
                ok = bool(env.program(env.compile(text)).evaluate(bindings))
            except Exception as e:  # noqa: BLE001 - an evaluation error rejects the object, as in the API server
                ok, rule = False, {**rule, "message": f"{rule['message']} (rule error: {e})"}
            if not ok:
                where = (path + rule["fieldPath"] if "fieldPath" in rule else path).lstrip(".")
                out.append(f"{where or '<root>'}: {rule['message']}")
    return out


def openapi_errors(obj: dict[str, Any], root: dict[str, Any] | None = None) -> list[str]:
    """Type, enum, range, length and pattern problems, as `<path>: <jsonschema message>`."""
    import jsonschema

    out = []
    for e in jsonschema.Draft4Validator(root or schema()).iter_errors(obj):
        path = ".".join(str(p) for p in e.absolute_path)
        out.append(f"{path or '<root>'}: {e.message}")
    return sorted(out)


def admission_errors(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """OpenAPI problems, else CEL problems (the API server runs CEL only on schema-valid objects). `old`: the
    stored object, for an update (transition rules)."""
    root = schema()
    full = with_defaults(obj, root)
    return openapi_errors(full, root) or cel_errors(full, root, with_defaults(old, root) if old else None)
