"""Read a runtime pod's `/metrics` text into an autoscaler `Sample`.

Names come from `dsv4.runtime.metrics_catalog`: per-pool occupancy `dsv4:cache_pool_occupancy_ratio{pool}`
and queue depth `vllm:num_requests_waiting`. Parsing uses prometheus_client's text parser; fetching
is a plain HTTP GET with a short timeout (httpx).
"""

from __future__ import annotations

from dsv4.operator.autoscaler import Sample
from dsv4.runtime import metrics_catalog as mc

OCCUPANCY = mc.get("dsv4:cache_pool_occupancy_ratio").name
QUEUE = mc.get("vllm:num_requests_waiting").name
RUNNING = mc.get("vllm:num_requests_running").name


class ScrapeError(RuntimeError):
    """A pod's metrics could not be read or lack the series the autoscaler needs."""


def parse_metrics(text: str, pod: str, time: float) -> Sample:
    """A Sample from Prometheus text exposition; ScrapeError when a needed series is absent.

    Several model_name/engine children of one family are combined: occupancy by max per pool (the
    fullest), queue by sum."""
    from prometheus_client.parser import text_string_to_metric_families

    pools: dict[str, float] = {}
    queue: float | None = None
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and friends on malformed text
        raise ScrapeError(f"{pod}: unparsable /metrics ({e})") from e
    for fam in families:
        for s in fam.samples:
            if s.name == OCCUPANCY:
                pool = s.labels.get(mc.POOL_LABEL)
                if pool:
                    pools[pool] = max(pools.get(pool, 0.0), float(s.value))
            elif s.name == QUEUE:
                queue = (queue or 0.0) + float(s.value)
    if queue is None:
        raise ScrapeError(f"{pod}: /metrics has no {QUEUE}")
    if not pools:
        raise ScrapeError(f"{pod}: /metrics has no {OCCUPANCY}")
    return Sample(time=time, pod=pod, pools=pools, queue=queue)


def fetch(url: str, pod: str, time: float, timeout: float = 3.0) -> Sample:
    """GET `url` (http://<pod-ip>:8000/metrics) and parse it."""
    import httpx

    try:
        r = httpx.get(url, timeout=timeout)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise ScrapeError(f"{pod}: GET {url} failed ({e})") from e
    return parse_metrics(r.text, pod, time)
