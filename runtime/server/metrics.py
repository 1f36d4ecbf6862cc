"""The Prometheus exporter of `dsv4 serve`, built from `dsv4.metrics_catalog` (names, types, labels,
help and buckets all come from there; nothing is declared here).

`EngineMetrics` is the engine's observer: it is called from the engine thread after each step (gauges,
step phases, cache pools, counters from cache deltas) and per request event (queue time, batching wait,
TTFT, inter-token latency, e2e, finish reason). prometheus_client is thread-safe, so `/metrics` renders
from the HTTP thread at any time.
"""

from __future__ import annotations

from typing import Any

from dsv4.runtime.engine.engine import EngineObserver, StepInfo
from dsv4.runtime.engine.request import Request, Sequence

from dsv4 import metrics_catalog as catalog

ERROR_CODES = (400, 401, 404, 408, 413, 429, 500, 503)


def pool_stats(cache_stats: Any) -> dict[str, Any]:
    """Per-pool stats objects of a CacheStats (mapping pool name -> object with the pool fields)."""
    pools = getattr(cache_stats, "pools", None)
    if pools is None and isinstance(cache_stats, dict):
        pools = cache_stats.get("pools")
    return dict(pools or {})


def _get(obj: Any, name: str, default: Any = 0) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


class EngineMetrics(EngineObserver):
    def __init__(self, model_name: str, cache_info: dict[str, str]):
        self.labels = {catalog.MODEL_LABEL: model_name, catalog.ENGINE_LABEL: "0"}
        self.c = catalog.make_collectors(catalog.RUNTIME, constant_labels=self.labels)
        self.registry = self.c["__registry__"]
        self.c["vllm:cache_config_info"].labels(**cache_info).set(1)
        for code in ERROR_CODES:  # series exist (at 0) before the first error
            self.c["dsv4_request_errors_total"].labels(code=str(code))
        self._prev_queries = 0
        self._prev_hits = 0
        self.data_parallel = False  # True: a DataParallelEngine reports each rank (update_rank, on_dispatch)
        self._prev_rank_hits: dict[str, int] = {}
        self._prev_evictions: dict[str, int] = {}
        self._generation_tokens = self.c["vllm:generation_tokens_total"].labels()
        self._ttft = self.c["vllm:time_to_first_token_seconds"].labels()
        self._itl = self.c["vllm:inter_token_latency_seconds"].labels()

    # ---- helpers -------------------------------------------------------------------------------------
    def m(self, name: str) -> Any:
        return self.c[name]

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def request_error(self, code: int) -> None:
        self.c["dsv4_request_errors_total"].labels(code=str(code)).inc()

    def update_cache(self, cache_stats: Any) -> None:
        if cache_stats is None:
            return
        occ_max = 0.0
        for pool, ps in pool_stats(cache_stats).items():
            occ = float(_get(ps, "occupancy", 0.0))
            occ_max = max(occ_max, occ)
            self.c["dsv4_cache_pool_occupancy_ratio"].labels(pool=pool).set(occ)
            self.c["dsv4_cache_pool_used_bytes"].labels(pool=pool).set(_get(ps, "bytes_used"))
            self.c["dsv4_cache_pool_allocated_bytes"].labels(pool=pool).set(_get(ps, "bytes_allocated"))
            self.c["dsv4_cache_pool_tokens_held"].labels(pool=pool).set(_get(ps, "tokens_held"))
            ev = int(_get(ps, "evictions", 0))
            prev = self._prev_evictions.get(pool, 0)
            if ev > prev:
                self.c["dsv4_cache_pool_evictions_total"].labels(pool=pool).inc(ev - prev)
            self._prev_evictions[pool] = ev
        evictions = _get(cache_stats, "evictions", None)
        if isinstance(evictions, dict):  # evictions reported at the top level, per pool
            for pool, ev in evictions.items():
                prev = self._prev_evictions.get(pool, 0)
                if int(ev) > prev:
                    self.c["dsv4_cache_pool_evictions_total"].labels(pool=pool).inc(int(ev) - prev)
                self._prev_evictions[pool] = int(ev)
        self.c["vllm:kv_cache_usage_perc"].set(occ_max)
        q = int(_get(cache_stats, "prefix_queries_tokens", 0))
        h = int(_get(cache_stats, "prefix_hit_tokens", 0))
        if q > self._prev_queries:
            self.c["vllm:prefix_cache_queries_total"].inc(q - self._prev_queries)
        if h > self._prev_hits:
            self.c["vllm:prefix_cache_hits_total"].inc(h - self._prev_hits)
        self._prev_queries, self._prev_hits = max(q, self._prev_queries), max(h, self._prev_hits)
        self.c["dsv4_swa_checkpoints_kept"].set(int(_get(cache_stats, "swa_checkpoints_kept", 0)))

    def init_ranks(self, ranks: int, cache_stats: Any) -> None:
        """Every rank's series exist from the start (counters at 0): dashboards and alerts see each rank."""
        for k in range(ranks):
            for reason in catalog.DISPATCH_REASONS:
                self.c["dsv4_rank_dispatched_requests_total"].labels(rank=str(k), reason=reason)
            self.update_rank(k, 0, 0, cache_stats)

    def update_rank(self, rank: int, num_running: int, num_waiting: int, cache_stats: Any) -> None:
        """The `rank`-labelled series of one data-parallel attention rank."""
        r = str(rank)
        self.c["dsv4_rank_requests_running"].labels(rank=r).set(num_running)
        self.c["dsv4_rank_requests_waiting"].labels(rank=r).set(num_waiting)
        for pool, ps in pool_stats(cache_stats).items():
            self.c["dsv4_rank_cache_pool_occupancy_ratio"].labels(rank=r, pool=pool).set(
                float(_get(ps, "occupancy", 0.0)))
        hits = int(_get(cache_stats, "prefix_hit_tokens", 0))
        prev = self._prev_rank_hits.get(r, 0)
        counter = self.c["dsv4_rank_prefix_cache_hit_tokens_total"].labels(rank=r)
        if hits > prev:
            counter.inc(hits - prev)
        self._prev_rank_hits[r] = max(hits, prev)

    def on_dispatch(self, rank: int, reason: str) -> None:
        self.c["dsv4_rank_dispatched_requests_total"].labels(rank=str(rank), reason=reason).inc()

    # ---- observer hooks (engine thread) ---------------------------------------------------------------
    def on_step(self, info: StepInfo, cache_stats: Any) -> None:
        for phase, secs in info.durations.items():
            self.c["dsv4_step_duration_seconds"].labels(phase=phase).observe(secs)
        if info.num_preempted:
            self.c["vllm:num_preemptions_total"].inc(info.num_preempted)
        self.c["vllm:num_requests_running"].set(info.num_running)
        self.c["vllm:num_requests_waiting"].set(info.num_waiting)
        self.update_cache(cache_stats)
        if not self.data_parallel:
            self.update_rank(0, info.num_running, info.num_waiting, cache_stats)

    def on_idle(self, num_running: int, num_waiting: int, cache_stats: Any) -> None:
        self.c["vllm:num_requests_running"].set(num_running)
        self.c["vllm:num_requests_waiting"].set(num_waiting)
        self.update_cache(cache_stats)
        if not self.data_parallel:
            self.update_rank(0, num_running, num_waiting, cache_stats)

    def on_admitted(self, seq: Sequence, queue_time: float, batching_wait: float | None) -> None:
        if seq.index != 0:
            return
        self.c["vllm:request_queue_time_seconds"].observe(max(0.0, queue_time))
        self.c["dsv4_batching_delay_wait_seconds"].observe(max(0.0, batching_wait or 0.0))

    def on_prompt(self, request: Request) -> None:
        self.c["vllm:prompt_tokens_total"].inc(len(request.prompt_ids))

    def on_tokens(self, seq: Sequence, n: int, now: float, first: bool, itl: float | None) -> None:
        # once per sequence per step: the three series are looked up once, in __init__
        self._generation_tokens.inc(n)
        if first:
            self._ttft.observe(max(0.0, now - seq.request.arrival_time))
        elif itl is not None:
            self._itl.observe(max(0.0, itl))

    def on_finished(self, request: Request, e2e: float, reason: str) -> None:
        self.c["vllm:request_success_total"].labels(finished_reason=reason).inc()
        if reason != "abort":
            self.c["vllm:e2e_request_latency_seconds"].observe(max(0.0, e2e))


def cache_info_labels(spec: Any, num_blocks: dict[str, int], policy: str, prefix_caching: bool) -> dict[str, str]:
    """Labels of vllm:cache_config_info: block_size and num_gpu_blocks as routers read them (csa pool blocks,
    or swa when there is no csa pool)."""
    main = "csa" if "csa" in num_blocks else "swa"
    return {
        "block_size": str(spec.block_size),
        "num_gpu_blocks": str(int(num_blocks.get(main, 0))),
        "cache_dtype": str(spec.kv_dtype),
        "enable_prefix_caching": str(bool(prefix_caching)),
        "swa_block_size": str(spec.swa_block_size),
        "cache_policy": policy,
    }



# Families added after the rename, by issue (the changelog of docs/metrics.md).
ADDED_FAMILIES = {20: ("dsv4_rank_requests_running", "dsv4_rank_requests_waiting",
                       "dsv4_rank_cache_pool_occupancy_ratio", "dsv4_rank_prefix_cache_hit_tokens_total",
                       "dsv4_rank_dispatched_requests_total")}
# The families once exported as `dsv4:<name>`, now `dsv4_<name>` (the changelog of docs/metrics.md).
RENAMED_FROM_COLON = (
    "request_errors_total", "cache_pool_occupancy_ratio", "cache_pool_used_bytes", "cache_pool_allocated_bytes",
    "cache_pool_tokens_held", "cache_pool_evictions_total", "swa_checkpoints_kept", "batching_delay_wait_seconds",
    "step_duration_seconds",
)


def metrics_doc() -> str:
    """The text of docs/metrics.md, generated from the catalog (`python -m dsv4.runtime.server.metrics`)."""
    head = (
        "# Metrics\n\n"
        "<!-- Generated from dsv4/metrics_catalog.py by `python -m dsv4.runtime.server.metrics > docs/metrics.md`;"
        " tests/test_server_config.py fails when this file and the catalog differ. -->\n\n"
        "Every metric dsv4 exports, from the single catalog `dsv4.metrics_catalog`. Runtime metrics are "
        "served by `dsv4 serve` at `/metrics`; names that routers, KEDA recipes and dashboards already know keep "
        "vLLM's names (`vllm:` prefix), the per-pool cache and scheduler metrics that no other engine has use "
        "`dsv4_` (the operator's own: `dsv4_operator_`). Every runtime series carries `model_name` and `engine` "
        "(always `\"0\"`).\n\n"
        "Semantics worth knowing:\n\n"
        "- `vllm:kv_cache_usage_perc` is the occupancy of the *fullest* pool (max of "
        "`dsv4_cache_pool_occupancy_ratio`), so a router never under-reads pressure in one pool.\n"
        "- Occupancy counts blocks in use by running requests *and* blocks kept for prefix reuse (they are "
        "evicted on demand: `dsv4_cache_pool_evictions_total`).\n"
        "- `vllm:prefix_cache_queries_total` / `hits_total` count prompt tokens looked up / served from the "
        "cache (a hit's recompute span is still a hit).\n"
        "- `dsv4_batching_delay_wait_seconds` observes, per request, how long the batching delay held its first "
        "step back (0 when the delay is 0 or the batch was already full).\n"
        "- `dsv4_step_duration_seconds{phase}`: `schedule` (scheduler + cache allocation), `forward` (model), "
        "`sample` (sampling, detokenisation, stop checks), `total`.\n"
        "- `vllm:request_success_total{finished_reason=\"abort\"}` counts client disconnects and aborts.\n"
        "- With `--dp N --ep` the replica-level series aggregate the attention ranks (occupancy: max over ranks; "
        "counts: sums); `dsv4_rank_*{rank}` show each rank (dp = 1: rank 0).\n\n"
        "## Runtime (`dsv4 serve`, `/metrics`)\n\n"
    )
    mid = "\n## Operator\n\n"
    changelog = (
        "\n## Changelog\n\n"
        + "".join(f"- Added (issue {issue}): " + ", ".join(f"`{n}`" for n in names) + "\n"
                  for issue, names in ADDED_FAMILIES.items())
        + "- **`dsv4:` families renamed to `dsv4_`** (issue 21). Prometheus reserves `:` for recording rules and "
        "`promtool check metrics` flagged every one; `tests/test_server_metrics.py` now runs it on a live "
        "server's `/metrics` and allows findings only for the `vllm:` names, which stay as vLLM spells them. The "
        "chart's dashboards and alert rules, the operator's KEDA queries and these docs use the new names; "
        "saved queries and recording rules of your own need the same rename:\n"
        + "".join(f"  - `dsv4:{old}` → `dsv4_{old}`\n" for old in RENAMED_FROM_COLON)
    )
    return head + catalog.markdown_table(catalog.RUNTIME_METRICS) + mid + catalog.markdown_table(
        catalog.OPERATOR_METRICS) + changelog


if __name__ == "__main__":
    print(metrics_doc(), end="")
