"""Every benchmark writes the same three files: `<stem>.json` (the raw figures), `<stem>.md` (the table the
docs quote) and `<stem>.png` (the plot). Smoke runs append `_smoke` to the stem (gitignored)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_triplet(out: dict, out_dir: Path, stem: str, markdown: Callable[[dict], str],
                  plot: Callable[[dict, Path], None]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem += "_smoke" if out.get("smoke") else ""
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(out, indent=1))
    paths["md"].write_text(markdown(out) + "\n")
    plot(out, paths["png"])
    return paths
