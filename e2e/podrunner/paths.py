"""Container paths without a mount namespace: every mountPath is rewritten to the directory that backs it."""

from __future__ import annotations

import re
from pathlib import Path

Mounts = list[tuple[str, str]]  # (container mountPath, local directory)


def rewrite_paths(text: str, mounts: Mounts) -> str:
    """Replace each container mountPath (longest first) in TEXT with its local directory."""
    for mount_path, local in sorted(mounts, key=lambda m: -len(m[0])):
        mp = mount_path.rstrip("/") or "/"
        pattern = r"(?<![\w.\-/])" + re.escape(mp) + r"(?=/|$|[^\w.\-])"
        text = re.sub(pattern, lambda _m, loc=local: loc, text)
    return text


def container_mounts(container: dict, vols: dict[str, str], *, strict: bool = True) -> Mounts:
    """(mountPath, local directory) of each of the container's volumeMounts (subPath appended); a mount of an
    unknown volume is an error when STRICT, else skipped."""
    mounts = []
    for vm in container.get("volumeMounts") or []:
        local = vols.get(vm["name"])
        if local is None:
            if not strict:
                continue
            raise RuntimeError(f"container {container['name']!r} mounts unknown volume {vm['name']!r}")
        if vm.get("subPath"):
            local = str(Path(local) / vm["subPath"])
        mounts.append((vm["mountPath"], local))
    return mounts
