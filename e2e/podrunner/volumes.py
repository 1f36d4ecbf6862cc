"""A pod's volumes as local files: configMap, secret, projected and downwardAPI volumes are written into
the pod's directory, emptyDir / PVC / ephemeral are empty directories, hostPath is the host path."""

from __future__ import annotations

from pathlib import Path

from dsv4.e2e.podrunner.env import field_value
from dsv4.e2e.podrunner.objects import ObjectReader
from dsv4.e2e.podrunner.paths import container_mounts, rewrite_paths
from dsv4.e2e.podrunner.state import PodEntry


def write_keys(target: Path, data: dict[str, bytes], src: dict) -> None:
    items = src.get("items")
    pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
    for key, rel in pairs:
        if key not in data:
            if src.get("optional"):
                continue
            raise RuntimeError(f"key {key!r} is missing from {src.get('name')!r}")
        p = target / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data[key])


def materialise(e: PodEntry, objects: ObjectReader) -> dict[str, str]:
    """Materialise the pod's volumes; returns volume name -> local directory (or host path)."""
    out: dict[str, str] = {}
    base = e.dir / "volumes"
    for v in e.pod["spec"].get("volumes") or []:
        name = v["name"]
        target = base / name
        if "hostPath" in v:
            out[name] = v["hostPath"]["path"]
            continue
        target.mkdir(parents=True, exist_ok=True)
        out[name] = str(target)
        if "configMap" in v:
            write_keys(target, objects.configmap_data(e.namespace, v["configMap"]), v["configMap"])
        elif "secret" in v:
            src = v["secret"]
            write_keys(target, objects.secret_data(e.namespace, src.get("secretName"), src.get("optional")), src)
        elif "downwardAPI" in v:
            for item in v["downwardAPI"].get("items") or []:
                if "fieldRef" in item:
                    (target / item["path"]).write_text(field_value(e, item["fieldRef"]["fieldPath"]))
        elif "projected" in v:
            for src in v["projected"].get("sources") or []:
                if "configMap" in src:
                    write_keys(target, objects.configmap_data(e.namespace, src["configMap"]), src["configMap"])
                elif "secret" in src:
                    s = src["secret"]
                    write_keys(target, objects.secret_data(e.namespace, s.get("name"), s.get("optional")), s)
                # serviceAccountToken / downwardAPI in projections: left empty (no in-cluster API access)
        # emptyDir, persistentVolumeClaim, ephemeral: an empty directory
    return out


def rewrite_volume_files(e: PodEntry, vols: dict[str, str]) -> None:
    """ConfigMap/Secret files often name other mounts (`model: /models`): rewrite those paths too."""
    mounts = []
    for c in [*(e.pod["spec"].get("initContainers") or []), *e.pod["spec"]["containers"]]:
        mounts += container_mounts(c, vols, strict=False)
    for v in e.pod["spec"].get("volumes") or []:
        if not any(k in v for k in ("configMap", "secret", "projected")):
            continue
        for f in Path(vols[v["name"]]).rglob("*"):
            if not f.is_file():
                continue
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
            new = rewrite_paths(text, mounts)
            if new != text:
                f.write_text(new)
