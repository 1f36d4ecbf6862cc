"""Read the autoscaler's signals into `Sample`s: from a runtime pod's `/metrics`, or from Prometheus.

Names come from `dsv4.metrics_catalog`: per-pool occupancy `dsv4_cache_pool_occupancy_ratio{pool}`
and queue depth `vllm:num_requests_waiting`. Pods (`autoscaling.metricsSource: pods`, the default): a
plain HTTP GET with a short timeout (httpx), parsed with prometheus_client's text parser. Prometheus
(`metricsSource: prometheus`): three instant queries per endpoint against `autoscaling.prometheusAddress`
(`/api/v1/query`), the series carrying the scrape's `namespace`, `pod` and `dsv4_endpoint` labels (the
catalog's relabelings); a sample's time is the pod's last scrape (`timestamp()`), so the autoscaler's
staleness rule holds when Prometheus stops scraping a pod.
"""

from __future__ import annotations

from typing import Any

from dsv4.operator.autoscaler import Sample

from dsv4 import metrics_catalog as mc

OCCUPANCY = mc.get("dsv4_cache_pool_occupancy_ratio").name
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


def prometheus_queries(namespace: str, name: str) -> dict[str, str]:
    """PromQL per signal, per pod of the endpoint (occupancy per pool, queue summed, last scrape time)."""
    sel = f'{mc.NAMESPACE_LABEL}="{namespace}",{mc.ENDPOINT_LABEL}="{name}"'
    pod, pool = mc.POD_LABEL, mc.POOL_LABEL
    return {
        "occupancy": f"max by ({pod}, {pool}) ({OCCUPANCY}{{{sel}}})",
        "queue": f"sum by ({pod}) ({QUEUE}{{{sel}}})",
        "time": f"max by ({pod}) (timestamp({QUEUE}{{{sel}}}))",
    }


def samples_from_prometheus(results: dict[str, list[dict[str, Any]]], ready_pods: list[str]) -> list[Sample]:
    """Samples for the ready pods from instant-query vectors (`data.result` of each query in
    `prometheus_queries`). A pod missing a signal gets no sample (the autoscaler then holds)."""
    def by_pod(key: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for r in results.get(key, []):
            metric = r.get("metric") or {}
            out.setdefault(metric.get(mc.POD_LABEL, ""), []).append((metric, float(r["value"][1])))
        return out

    occ, queue, when = by_pod("occupancy"), by_pod("queue"), by_pod("time")
    samples = []
    for pod in ready_pods:
        pools = {m[mc.POOL_LABEL]: v for m, v in occ.get(pod, []) if m.get(mc.POOL_LABEL)}
        if not pools or pod not in queue or pod not in when:
            continue
        samples.append(Sample(time=max(v for _, v in when[pod]), pod=pod, pools=pools,
                              queue=sum(v for _, v in queue[pod])))
    return samples


def fetch_prometheus(address: str, namespace: str, name: str, ready_pods: list[str],
                     timeout: float = 3.0) -> list[Sample]:
    """Run the three queries against Prometheus at `address`; ScrapeError when it cannot answer."""
    import httpx

    results = {}
    for key, query in prometheus_queries(namespace, name).items():
        try:
            r = httpx.get(f"{address.rstrip('/')}/api/v1/query", params={"query": query}, timeout=timeout)
            r.raise_for_status()
            body = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ScrapeError(f"Prometheus {address}: query {key} failed ({e})") from e
        if body.get("status") != "success" or (body.get("data") or {}).get("resultType") != "vector":
            raise ScrapeError(f"Prometheus {address}: query {key}: {body.get('error') or body.get('status')}")
        results[key] = body["data"]["result"]
    return samples_from_prometheus(results, ready_pods)
