"""Small PromQL helpers shared by the dashboards and the alerts: label selectors, rates, quantiles, and
`metric_names(expr)`, which lists the series an expression reads (used by tests to check every name
against `dsv4.metrics_catalog`).

Selectors use Grafana template variables: runtime series are filtered on the scrape's `namespace` and
`pod` and on `dsv4_endpoint` (relabelled from the pod label `dsv4.io/endpoint`); operator series carry
`dsv4_namespace` and `dsv4_endpoint` themselves.
"""

from __future__ import annotations

import re

from dsv4 import metrics_catalog as mc

RATE_WINDOW = "$__rate_interval"

# Every dashboard selector: the scrape's job and instance (grafana dashboard-linter's convention; "All" is `.+`).
SCRAPE_SEL = 'job=~"$job", instance=~"$instance"'
# Runtime series: one pod of one endpoint in one namespace.
RUNTIME_SEL = (
    f'{mc.NAMESPACE_LABEL}=~"$namespace", {mc.ENDPOINT_LABEL}=~"$endpoint", {mc.POD_LABEL}=~"$pod", {SCRAPE_SEL}'
)
# Operator series about one endpoint.
OPERATOR_SEL = f'{mc.ENDPOINT_NAMESPACE_LABEL}=~"$namespace", {mc.ENDPOINT_LABEL}=~"$endpoint", {SCRAPE_SEL}'

# Group runtime series per endpoint (alerts and endpoint-level panels).
BY_ENDPOINT = f"{mc.NAMESPACE_LABEL}, {mc.ENDPOINT_LABEL}"
OP_BY_ENDPOINT = f"{mc.ENDPOINT_NAMESPACE_LABEL}, {mc.ENDPOINT_LABEL}"


def sel(metric: str, selector: str = RUNTIME_SEL, extra: str = "") -> str:
    """`metric{selector, extra}`; the metric must be a catalogued series."""
    if metric not in mc.series_index():
        raise KeyError(f"{metric!r} is not a series of dsv4.metrics_catalog")
    inner = ", ".join(p for p in (selector, extra) if p)
    return f"{metric}{{{inner}}}" if inner else metric


def rate(metric: str, selector: str = RUNTIME_SEL, window: str = RATE_WINDOW, extra: str = "") -> str:
    return f"rate({sel(metric, selector, extra)}[{window}])"


def quantile(q: float, histogram: str, by: str = "", selector: str = RUNTIME_SEL, window: str = RATE_WINDOW) -> str:
    """histogram_quantile(q, sum by (le, <by>) (rate(<histogram>_bucket{...}[window])))."""
    spec = mc.get(histogram)
    if spec.kind != mc.HISTOGRAM:
        raise ValueError(f"{histogram} is a {spec.kind}, not a histogram")
    group = ", ".join(p for p in ("le", by) if p)
    return f"histogram_quantile({q}, sum by ({group}) ({rate(histogram + '_bucket', selector, window)}))"


_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "inf", "nan", "atan2",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and literals removed).

    A small tokenizer, not a full parser: strings, `{...}` matchers, `[...]` ranges and the label
    lists of by/without/on/ignoring/group_* are dropped first; what remains and is not followed by
    `(` is a metric name. Also handles the `{__name__="x"}` form.
    """
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    for m in _IDENT.finditer(text):
        word = m.group(1)
        rest = text[m.end() :].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def substitute_variables(expr: str) -> str:
    """Replace Grafana variables so promtool can parse the expression ($__rate_interval -> 5m, $x -> x)."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)\}?", r"\1", expr)
