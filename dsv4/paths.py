"""Where dsv4 keeps its caches: `$XDG_CACHE_HOME/dsv4`, else `~/.cache/dsv4` (models, the control-plane build,
tools, inductor artefacts). One definition for the runtime, the benchmarks and the e2e tooling."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "dsv4"
