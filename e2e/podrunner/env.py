"""A container's environment and command line: env / envFrom, fieldRef, resourceFieldRef, `$(VAR)` expansion."""

from __future__ import annotations

import math
import os
import re

from dsv4.e2e import podnet
from dsv4.e2e.podrunner.objects import ObjectReader
from dsv4.e2e.podrunner.paths import Mounts, rewrite_paths
from dsv4.e2e.podrunner.state import PodEntry

_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined vars are substituted, `$$` escapes, unknown refs stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_RE.sub(sub, text)


def resource_value(container: dict, resource: str, divisor: str | None) -> str:
    """resourceFieldRef: limits.cpu etc., rounded up to the divisor as the kubelet does."""
    from kubernetes.utils import parse_quantity

    kind, _, name = resource.partition(".")
    q = (container.get("resources") or {}).get(kind, {}).get(name)
    if q is None and kind == "requests":
        q = (container.get("resources") or {}).get("limits", {}).get(name)
    if q is None:
        q = {"cpu": "128", "memory": "2Ti", "ephemeral-storage": "10Ti"}.get(name, "0")  # node allocatable
    d = parse_quantity(divisor or "1")
    return str(math.ceil(parse_quantity(q) / d))


def field_value(e: PodEntry, path: str) -> str:
    """fieldRef (env or downwardAPI volume) of the pod E."""
    meta = e.pod["metadata"]
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": e.node, "spec.serviceAccountName": e.pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": e.net.ip if e.net else "", "status.podIPs": e.net.ip if e.net else "",
        "status.hostIP": podnet.GATEWAY, "status.hostIPs": podnet.GATEWAY,
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        d = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
    raise ValueError(f"fieldRef.fieldPath {path!r} is not supported by the pod runner")


def container_env(e: PodEntry, c: dict, mounts: Mounts, objects: ObjectReader, venv_bin: str) -> dict[str, str]:
    """The host environment (minus KUBECONFIG, venv first on PATH) overlaid by the container's env/envFrom."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env["HOSTNAME"] = e.name
    env["DSV4_POD_DIR"] = str(e.dir)
    declared: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            ref = src["configMapRef"]
            data = objects.configmap_data(e.namespace, {"name": ref["name"], "optional": ref.get("optional")})
        else:
            ref = src["secretRef"]
            data = objects.secret_data(e.namespace, ref["name"], ref.get("optional"))
        declared.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
    for item in c.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            declared[name] = expand(item.get("value", ""), declared)
            continue
        vf = item["valueFrom"]
        if "fieldRef" in vf:
            declared[name] = field_value(e, vf["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
            kind = "configMap" if "configMapKeyRef" in vf else "secret"
            ref = vf[f"{kind}KeyRef"]
            data = (objects.configmap_data(e.namespace, {"name": ref["name"], "optional": ref.get("optional")})
                    if kind == "configMap" else objects.secret_data(e.namespace, ref["name"], ref.get("optional")))
            if ref["key"] in data:
                declared[name] = data[ref["key"]].decode(errors="replace")
            elif not ref.get("optional"):
                raise RuntimeError(f"env {name}: key {ref['key']!r} missing from {kind} {ref['name']!r}")
        elif "resourceFieldRef" in vf:
            ref = vf["resourceFieldRef"]
            declared[name] = resource_value(c, ref["resource"], ref.get("divisor"))
    env.update({k: rewrite_paths(v, mounts) for k, v in declared.items()})
    return env


def container_argv(c: dict, env: dict[str, str], mounts: Mounts) -> list[str]:
    """command + args, `$(VAR)`-expanded and with mount paths rewritten; the image is never used."""
    if not c.get("command"):
        raise RuntimeError(f"container {c['name']!r} has no command: the pod runner runs no images, "
                           "so every container must set `command`")
    return [rewrite_paths(expand(a, env), mounts) for a in [*c["command"], *(c.get("args") or [])]]
