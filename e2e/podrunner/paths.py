"""Container paths without a mount namespace: every mountPath is rewritten to the directory that backs it."""

from __future__ import annotations

import re
from pathlib import Path

Mounts = list[tuple[str, str]]  # (container mountPath, local directory)


def rewrite_paths(text: str, mounts: Mounts) -> str:
    """Replace each container mountPath in TEXT with its local directory, in one pass: the longest mountPath
    that matches at a position wins, and a replacement is never rewritten again (a pod directory under /tmp
    stays intact when /tmp is also a mountPath)."""
    if not mounts:
        return text
    local_of = {(mp.rstrip("/") or "/"): local for mp, local in mounts}
    alternatives = "|".join(re.escape(mp) for mp in sorted(local_of, key=len, reverse=True))
    pattern = r"(?<![\w.\-/])(?:" + alternatives + r")(?=/|$|[^\w.\-])"
    return re.sub(pattern, lambda m: local_of[m.group(0)], text)


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
