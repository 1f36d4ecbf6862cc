"""Checks for shipped PromQL: syntax with `promtool` and metric names against the catalog.

`promtool` has no "check this expression" command, so each expression becomes a recording rule in a
temporary rules file and `promtool check rules` parses them all at once; on failure each expression is
checked alone so the report names the broken one.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from dsv4 import metrics_catalog as mc

from . import alerts, dashboards
from .promql import metric_names, substitute_variables


def all_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target, dashboard variable selector and alert rule."""
    out: list[tuple[str, str]] = []
    for build in dashboards.DASHBOARDS:
        d = dashboards.render(build())
        out += dashboards.expressions(d)
        out += [(f"{d['uid']}/variable {name}", q) for name, q in dashboards.variable_selectors(d)]
    for rule in alerts.rule_groups()["groups"][0]["rules"]:
        out.append((f"alert {rule['alert']}", rule["expr"]))
    return out


def unknown_metrics(exprs: Iterable[tuple[str, str]]) -> list[str]:
    """'where: name' for every series an expression reads that the catalog does not list."""
    known = mc.series_index()
    return [f"{where}: {name}" for where, e in exprs for name in sorted(metric_names(e)) if name not in known]


def _rules_file(exprs: list[tuple[str, str]]) -> dict[str, Any]:
    rules = [{"record": f"dsv4:check_{i}", "expr": substitute_variables(e)} for i, (_, e) in enumerate(exprs)]
    return {"groups": [{"name": "dsv4-promql-check", "rules": rules}]}


def _check_rules(promtool: Path, content: dict[str, Any]) -> tuple[bool, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".rules.yaml", delete=False) as fh:
        yaml.safe_dump(content, fh, sort_keys=False)
        path = fh.name
    try:
        proc = subprocess.run([str(promtool), "check", "rules", path], capture_output=True, text=True, timeout=60)
    finally:
        Path(path).unlink(missing_ok=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def promtool_errors(promtool: Path, exprs: list[tuple[str, str]]) -> list[str]:
    """Empty when promtool parses every expression; else 'where: expr: promtool output' per bad one."""
    ok, _ = _check_rules(promtool, _rules_file(exprs))
    if ok:
        return []
    errors = []
    for where, e in exprs:
        ok1, out = _check_rules(promtool, _rules_file([(where, e)]))
        if not ok1:
            errors.append(f"{where}: {e}: {out.strip()}")
    return errors or ["promtool rejected the batch but no single expression: " + _check_rules(
        promtool, _rules_file(exprs))[1]]
