"""The ticker: every interval, refresh each endpoint's status from the cluster, collect load samples, run the
built-in autoscaler and re-apply the children (drift correction, foreign replicas reverted).

It is not a kopf timer: kopf puts a finalizer on every object that has a timer or daemon, and that finalizer
blocks `kubectl delete` while the operator is gone. Instead the `track` event handler (no finalizer) feeds
`Ticker.track` the latest copy of each endpoint, and one asyncio task ticks them all. The `Ticker` lives in
kopf's `memo` (set by the startup handler); its state (endpoints, samples) is in memory: a restart holds.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dsv4.operator import api, kube, manifests, scrape, telemetry
from dsv4.operator.autoscaler import Sample
from dsv4.operator.reconcile import autoscale, occupancy_fields
from dsv4.operator.replica_owner import autoscaler_current
from dsv4.operator.sync import publish, reconcile_and_apply

TICK_INTERVAL_S = float(os.environ.get("DSV4_OPERATOR_TIMER_INTERVAL", "15"))
MAX_SAMPLES = 4096
log = logging.getLogger("dsv4.operator")


def scrape_pods(ready_pods: list[dict[str, Any]], namespace: str, name: str, now: float) -> list[Sample]:
    """One sample per ready pod from its `/metrics`; a pod that does not answer is logged and counted."""
    out = []
    for pod in ready_pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            continue
        try:
            out.append(scrape.fetch(f"http://{ip}:{manifests.PORT}/metrics", pod["metadata"]["name"], now))
        except scrape.ScrapeError as e:
            log.info("%s/%s: %s", namespace, name, e)
            telemetry.scrape_error(namespace, name)
    return out


def recent_occupancy(samples: list[Sample], now: float, window_s: float = 60) -> dict[str, Any]:
    """Status occupancy fields from the last minute of samples (endpoints without the built-in autoscaler)."""
    recent = [s for s in samples if now - s.time <= window_s]
    if not recent:
        return {}
    pools: dict[str, list[float]] = {}
    for s in recent:
        for k, v in s.pools.items():
            pools.setdefault(k, []).append(v)
    return occupancy_fields({k: round(sum(v) / len(v), 4) for k, v in pools.items()},
                            sum(s.queue for s in recent) / len(recent))


@dataclass
class Ticker:
    interval_s: float = TICK_INTERVAL_S
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> latest object seen on the watch
    samples: dict[str, deque[Sample]] = field(default_factory=dict)     # uid -> recent load samples
    task: asyncio.Task | None = None

    def track(self, event: dict[str, Any]) -> None:
        """Keep the latest copy of every endpoint; forget deleted ones (their children go with the owner
        through garbage collection)."""
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
            self.endpoints.pop(uid, None)
            self.samples.pop(uid, None)
        else:
            self.endpoints[uid] = copy.deepcopy(dict(obj))

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run(), name="dsv4-ticker")

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def run(self) -> None:
        """Every interval: tick each tracked endpoint (in worker threads, concurrently)."""
        while True:
            t0 = time.monotonic()
            objs = list(self.endpoints.values())
            if objs:
                await asyncio.gather(*(asyncio.to_thread(self.tick_safe, o) for o in objs))
            await asyncio.sleep(max(1.0, self.interval_s - (time.monotonic() - t0)))

    def tick_safe(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        try:
            self.tick(obj)
        except Exception as e:  # noqa: BLE001 - one endpoint's trouble never stops the ticker
            level = logging.INFO if kube.is_transient(e) else logging.WARNING
            log.log(level, "%s/%s: tick failed (next in %.0f s): %s: %s", meta.get("namespace"), meta.get("name"),
                    self.interval_s, type(e).__name__, e)

    def _collect(self, uid: str, parsed: api.DSV4EndpointSpec, namespace: str, name: str, ready_pods: list[str],
                 ready_objs: list[dict[str, Any]], now: float) -> list[Sample]:
        samples = self.samples.setdefault(uid, deque(maxlen=MAX_SAMPLES))
        a = parsed.autoscaling
        if a is not None and a.metrics_source == "prometheus":
            try:
                have = {(s.pod, s.time) for s in samples}  # Prometheus returns the same scrape until the next one
                samples.extend(s for s in scrape.fetch_prometheus(a.prometheus_address, namespace, name, ready_pods)
                               if (s.pod, s.time) not in have)
            except scrape.ScrapeError as e:  # no samples: the autoscaler holds (missing metrics)
                log.info("%s/%s: %s", namespace, name, e)
                telemetry.scrape_error(namespace, name)
        else:
            samples.extend(scrape_pods(ready_objs, namespace, name, now))
        horizon = now - max(600.0, a.stable_window_seconds if a else 0)
        while samples and samples[0].time < horizon:
            samples.popleft()
        return list(samples)

    def tick(self, obj: dict[str, Any]) -> None:
        """Refresh status from the cluster; collect samples; run the built-in autoscaler; re-apply."""
        meta = obj["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        spec = copy.deepcopy(obj.get("spec") or {})
        now = time.time()
        try:
            parsed = api.parse_spec(spec)
        except Exception:  # noqa: BLE001
            return  # invalid: the create/update handler already reported PlanValid=False
        status = copy.deepcopy(obj.get("status") or {})
        obs, ready_objs = kube.observe(name, namespace)
        samples = self._collect(uid, parsed, namespace, name, obs.ready_pods, ready_objs, now)
        autoscaler_replicas = None
        events: list[tuple[str, str, str]] = []
        if parsed.builtin_autoscaling:
            current = autoscaler_current(status.get("desiredReplicas"), obs.deployment,
                                         parsed.autoscaling.min_replicas)
            res = autoscale(parsed, status, current, obs, samples, now)
            autoscaler_replicas = res.decision.desired
            status.update(res.status_update)
            telemetry.autoscaler_decision(namespace, name, parsed.autoscaling, res.decision)
            if res.event:
                events.append(res.event)
        else:
            status.update(recent_occupancy(samples, now))
        # the reconcile starts from the autoscaler's status (the scaling history must carry over)
        res = reconcile_and_apply("timer", name, namespace, uid, meta.get("generation"), spec, status,
                                  autoscaler_replicas, observed=obs)
        final = {**status, **res.status}
        # unchanged (e.g. a steady invalid plan): no write, no watch event
        publish(namespace, name, final if final != (obj.get("status") or {}) else None, res.scale)
        if uid in self.endpoints:  # our own write: the next tick starts from it even before the watch event arrives
            self.endpoints[uid] = {**self.endpoints[uid], "status": final}
        for ev in events + res.events:
            kube.post_event(obj, ev)
