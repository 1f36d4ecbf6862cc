"""Dashboards and alert rules: generated files do not drift, every expression is valid PromQL (promtool)
and reads only catalogued metrics, and the alerts fire on synthetic series (`promtool test rules`)."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from dsv4.e2e import tools
from dsv4.operator.observability import alerts, dashboards, generate, validate
from dsv4.operator.observability.promql import metric_names, substitute_variables

from dsv4 import metrics_catalog as mc

CHART = generate.CHART_DIR


@pytest.fixture(scope="module")
def promtool() -> Path:
    return tools.ensure_promtool()  # installs Debian's prometheus when missing; never skips


def test_generated_files_match_the_code():
    assert generate.stale_files() == [], "run `dsv4 observability generate`"


def test_check_mode_detects_drift(tmp_path):
    generate.write(tmp_path)
    assert generate.stale_files(tmp_path) == []
    victim = tmp_path / "dashboards" / "dsv4-cache.json"
    victim.write_text(victim.read_text().replace("dsv4_cache_pool_used_bytes", "dsv4_cache_pool_bytes"))
    (tmp_path / "dashboards" / "hand-made.json").write_text("{}")
    stale = generate.stale_files(tmp_path)
    assert str(victim) in stale and any("hand-made.json" in s for s in stale)


def test_every_expression_is_valid_promql(promtool):
    exprs = validate.all_expressions()
    assert len(exprs) > 40
    assert validate.promtool_errors(promtool, exprs) == []


def test_promtool_check_rejects_broken_promql(promtool):
    errors = validate.promtool_errors(promtool, [("ok", "up"), ("bad", 'sum by (pod (up{pod=~"$pod"})')])
    assert len(errors) == 1 and errors[0].startswith("bad:")


def test_every_expression_reads_only_catalogued_metrics():
    exprs = validate.all_expressions()
    assert validate.unknown_metrics(exprs) == []
    assert validate.unknown_metrics([("x", 'rate(vllm:gpu_cache_usage_perc{pod="a"}[5m])')]) == [
        "x: vllm:gpu_cache_usage_perc"
    ]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('histogram_quantile(0.99, sum by (le, pod) (rate(a_bucket{x=~"$x"}[$__rate_interval])))', {"a_bucket"}),
        ("a / on(ns, ep) group_left(pool) b > bool 3 and c offset 5m", {"a", "b", "c"}),
        ('sum without (pod) (increase(vllm:x_total{phase="total"}[1h])) unless up', {"vllm:x_total", "up"}),
        ('{__name__="dsv4:foo", pod="by"}', {"dsv4:foo"}),
        ("max(dsv4_operator_endpoint_ready) == 0", {"dsv4_operator_endpoint_ready"}),
    ],
)
def test_metric_names_parser(expr, names):
    assert metric_names(expr) == names


def test_substitute_variables_keeps_promql_valid():
    assert substitute_variables('rate(x{a=~"$namespace"}[$__rate_interval])') == 'rate(x{a=~"namespace"}[5m])'


def test_every_metric_is_shown_or_alerted():
    """Every catalogued metric appears somewhere (cache_config_info is read by routers, not plotted)."""
    used = set()
    for _, e in validate.all_expressions():
        for name in metric_names(e):
            fam = mc.family_of_series(name)
            if fam:
                used.add(fam.name)
    missing = {m.name for m in mc.METRICS} - used - {"vllm:cache_config_info"}
    assert not missing, missing


@pytest.mark.parametrize("build", dashboards.DASHBOARDS, ids=lambda b: b.__name__)
def test_dashboard_structure(build):
    d = json.loads((CHART / "dashboards" / f"{build().uid}.json").read_text())
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "namespace", "endpoint", "pod", "job", "instance"]
    assert d["editable"] is False
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["label"] == "Data source"
    for name in ("job", "instance"):  # dashboard-linter's convention: match-all by default, multi-select
        assert variables[name]["allValue"] == ".+" and variables[name]["multi"], name
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 5
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):  # panels never overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["description"].strip(), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            for selector in re.findall(r"\{[^{}]*\}", t["expr"]):  # every selector filters on job and instance
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, (p["title"], t["expr"])
            # runtime panels filter on all three variables, operator panels on namespace + endpoint
            families = [mc.family_of_series(n) for n in metric_names(t["expr"])]
            if any(f is not None and f.component == mc.RUNTIME for f in families):
                for var in ("$namespace", "$endpoint", "$pod"):
                    assert var in t["expr"], (p["title"], t["expr"])
            elif "dsv4_namespace" in t["expr"]:
                assert "$namespace" in t["expr"] and "$endpoint" in t["expr"]


def test_cache_dashboard_splits_every_metric_by_pool():
    d = dashboards.render(dashboards.cache())
    for where, e in dashboards.expressions(d):
        fams = {mc.family_of_series(n) for n in metric_names(e)}
        if any(f and "pool" in f.labels for f in fams):
            assert re.search(r"by \([^)]*\bpool\b", e), where


def test_default_thresholds_match_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["thresholds"]
    t = alerts.Thresholds()
    assert values == {alerts.Thresholds.helm_names()[k]: getattr(t, k) for k in alerts.Thresholds.helm_names()}


def _fires(at: str, name: str, labels: dict[str, str], value: str) -> dict:
    """An alert_rule_test entry expecting one alert; annotations rendered from the rule's templates."""
    rule = next(r for r in alerts.rule_groups()["groups"][0]["rules"] if r["alert"] == name)

    def render(text: str) -> str:
        text = text.replace("{{ $value | humanize }}", value)
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)

    return {"eval_time": at, "alertname": name, "exp_alerts": [{
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()},
    }]}  # fmt: skip


def test_alerts_fire_on_synthetic_series(promtool, tmp_path):
    """`promtool test rules`: each alert fires when its condition holds long enough and not before."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(alerts.rules_file_text())
    t = alerts.Thresholds()
    over_pool = t.cache_pool_occupancy + (1 - t.cache_pool_occupancy) / 2  # 0.975 -> humanized "975m"
    under_pool = t.cache_pool_occupancy / 2
    ep = 'namespace="ml", dsv4_endpoint="chat"'
    op = 'dsv4_namespace="ml", dsv4_endpoint="chat"'
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f'dsv4_cache_pool_occupancy_ratio{{{ep}, pod="p0", pool="csa"}}',
                 "values": f"{over_pool}x30"},
                {"series": f'dsv4_cache_pool_occupancy_ratio{{{ep}, pod="p1", pool="csa"}}',
                 "values": f"{under_pool}x30"},
                {"series": f'dsv4_cache_pool_occupancy_ratio{{{ep}, pod="p0", pool="swa"}}',
                 "values": f"{under_pool}x30"},
                {"series": f'vllm:num_requests_waiting{{{ep}, pod="p0"}}', "values": f"{t.queue_depth + 1}x30"},
                {"series": f'dsv4_operator_endpoint_ready{{{op}}}', "values": "1x5 0x25"},
                {"series": f'dsv4_operator_endpoint_desired_replicas{{{op}}}', "values": "4x30"},
                {"series": f'dsv4_operator_endpoint_max_replicas{{{op}}}', "values": "4x30"},
                {"series": f'dsv4_operator_endpoint_ready_replicas{{{op}}}', "values": "4x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "DSV4CachePoolSaturation", "exp_alerts": []},
                _fires("12m", "DSV4CachePoolSaturation", {"namespace": "ml", "dsv4_endpoint": "chat", "pool": "csa"},
                       "975m"),
                _fires("6m", "DSV4QueueBuildup", {"namespace": "ml", "dsv4_endpoint": "chat"}, "51"),
                {"eval_time": "10m", "alertname": "DSV4EndpointNotReady", "exp_alerts": []},
                _fires("20m", "DSV4EndpointNotReady", {"dsv4_namespace": "ml", "dsv4_endpoint": "chat"}, "0"),
                _fires("20m", "DSV4AutoscalerPinnedAtMax", {"dsv4_namespace": "ml", "dsv4_endpoint": "chat"}, "4"),
                {"eval_time": "20m", "alertname": "DSV4EndpointDegraded", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "DSV4TTFTP99OverSLO", "exp_alerts": []},
            ],
        }],
    }  # fmt: skip
    tests_file = tmp_path / "tests.yaml"
    tests_file.write_text(yaml.safe_dump(test, sort_keys=False))
    proc = subprocess.run([str(promtool), "test", "rules", str(tests_file)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, textwrap.shorten(proc.stdout + proc.stderr, 4000)
