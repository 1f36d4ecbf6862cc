"""`dsv4 observability generate [--check]`: write the generated dashboards and alert rules into the chart.

Files written (all generated; a test regenerates and compares them, so never edit them by hand):

- `helm/dsv4-operator/dashboards/<uid>.json`   Grafana dashboards (shipped as ConfigMaps by the chart)
- `helm/dsv4-operator/rules/dsv4-alerts.rules.yaml`   plain Prometheus rules with default thresholds
- `helm/dsv4-operator/templates/prometheusrule.yaml`   the PrometheusRule template (thresholds from values)

`--check` writes nothing and exits 1 listing the files that differ from what the code generates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "dsv4-operator"


def generated_files(chart_dir: Path = CHART_DIR) -> dict[Path, str]:
    """Path -> content of every generated file."""
    from . import alerts, dashboards

    out = {chart_dir / "dashboards" / name: text for name, text in dashboards.render_all().items()}
    out[chart_dir / "rules" / "dsv4-alerts.rules.yaml"] = alerts.rules_file_text()
    out[chart_dir / "templates" / "prometheusrule.yaml"] = alerts.helm_template()
    return out


def stale_files(chart_dir: Path = CHART_DIR) -> list[str]:
    """Generated files that are missing or differ, plus dashboards on disk the code no longer makes."""
    files = generated_files(chart_dir)
    stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
    dash_dir = chart_dir / "dashboards"
    if dash_dir.is_dir():
        stale += [str(p) + " (not generated)" for p in sorted(dash_dir.glob("*.json")) if p not in files]
    return stale


def write(chart_dir: Path = CHART_DIR) -> list[Path]:
    written = []
    for path, text in generated_files(chart_dir).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="write the dashboards and alert rules into the Helm chart")
    gen.add_argument("--chart-dir", type=Path, default=CHART_DIR, help="chart folder (default: %(default)s)")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 if any generated file is stale")


def run(args: argparse.Namespace) -> int:
    if args.check:
        stale = stale_files(args.chart_dir)
        for p in stale:
            print(f"stale: {p}")
        if stale:
            print("run `dsv4 observability generate` and commit the result")
        return 1 if stale else 0
    for p in write(args.chart_dir):
        print(f"wrote {p}")
    return 0
