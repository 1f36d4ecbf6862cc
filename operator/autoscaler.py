"""The autoscaling decision: per-pool cache occupancy + queue depth -> desired replicas. Pure.

Signal per ready pod at one scrape (each term divided by its target, so 1.0 = "exactly at target"):

    load(pod) = max( max_pool occupancy[pool] / target_occupancy,  queue_depth / target_queue_depth )

The max over pools matters for DeepSeek-V4: the csa, hca, swa and state pools fill at different rates
(a long-context burst fills csa/idx, many short sessions fill swa/state), and a blended usage number
hides which one is full. The decision names the binding signal (`pool_csa`, `queue`, ...).

KPA-style (Knative / AIBrix), with HPA's tolerance and scale-down stabilization:

    stable = mean load over pods and samples in the last stable_window seconds
    panic  = mean load over the last panic_window seconds
    desired_x = ceil(ready * x)                                   (x = stable or panic)
    panic mode starts when desired_panic / ready >= panic_threshold, and lasts a stable window after
    the last time that held; in panic the panic recommendation is used and never scales down.
    |x - 1| <= tolerance -> keep the current replicas.
    step bounds: floor(ready / max_scale_down_rate) <= desired <= ceil(max(ready,1) * max_scale_up_rate)
    scale down only to the highest recommendation of the last scale_down_stabilization seconds.
    clamp to [min_replicas, max_replicas].

Hold (keep current replicas) when: a ready pod has no sample newer than `stale_after` seconds, no
sample exists at all, or pods are still pending (no scale-up on top of pods waiting for GPUs; a
scale-down is still allowed so a stuck scale-up can be undone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Sample:
    """One scrape of one pod."""

    time: float
    pod: str
    pools: dict[str, float]   # pool -> occupancy 0..1
    queue: float              # waiting requests


@dataclass(frozen=True)
class ScalerConfig:
    min_replicas: int = 1
    max_replicas: int = 4
    target_occupancy: float = 0.8
    target_queue_depth: float = 5.0
    stable_window: float = 60.0
    panic_window: float = 6.0
    panic_threshold: float = 2.0
    tolerance: float = 0.1
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0
    scale_down_stabilization: float = 300.0
    stale_after: float = 45.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"min_replicas ({self.min_replicas}) must be in [0, max_replicas ({self.max_replicas})]")
        if not 0 < self.panic_window <= self.stable_window:
            raise ValueError(f"panic_window ({self.panic_window}) must be in (0, stable_window ({self.stable_window})]")
        if self.target_occupancy <= 0 or self.target_queue_depth <= 0:
            raise ValueError("target_occupancy and target_queue_depth must be > 0")
        if self.max_scale_up_rate <= 1 or self.max_scale_down_rate <= 1:
            raise ValueError("max_scale_up_rate and max_scale_down_rate must be > 1")

    @classmethod
    def from_spec(cls, a) -> ScalerConfig:  # a: api.AutoscalingSpec
        return cls(min_replicas=a.min_replicas, max_replicas=a.max_replicas, target_occupancy=a.target_occupancy,
                   target_queue_depth=a.target_queue_depth, stable_window=a.stable_window_seconds,
                   panic_window=a.panic_window_seconds, panic_threshold=a.panic_threshold,
                   max_scale_up_rate=a.max_scale_up_rate, max_scale_down_rate=a.max_scale_down_rate,
                   scale_down_stabilization=a.scale_down_stabilization_seconds, stale_after=a.metrics_stale_seconds)


@dataclass(frozen=True)
class ScalerState:
    """What the autoscaler remembers between ticks (kept in the endpoint's status)."""

    recommendations: tuple[tuple[float, int], ...] = ()   # (time, recommended replicas)
    panic_until: float | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    reason: str          # one line
    signal: str          # short token: queue | pool_<name> | hold_stale | hold_pending | hold_nodata | bounds | ...
    panic: bool
    state: ScalerState
    signals: dict[str, float] = field(default_factory=dict)   # mean per-pod value of each signal (stable window)

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "none"


def load_of(sample: Sample, cfg: ScalerConfig) -> tuple[float, str]:
    """(load, binding signal) of one sample."""
    best, sig = sample.queue / cfg.target_queue_depth, "queue"
    for pool, occ in sorted(sample.pools.items()):
        x = occ / cfg.target_occupancy
        if x > best:
            best, sig = x, f"pool_{pool}"
    return best, sig


def _window(samples: Iterable[Sample], now: float, width: float, pods: set[str]) -> list[Sample]:
    return [s for s in samples if s.pod in pods and now - width < s.time <= now]


def _mean_load(window: Sequence[Sample], cfg: ScalerConfig) -> tuple[float, str]:
    """Mean over pods of each pod's mean load; the signal that binds most often."""
    by_pod: dict[str, list[float]] = {}
    votes: dict[str, float] = {}
    for s in window:
        x, sig = load_of(s, cfg)
        by_pod.setdefault(s.pod, []).append(x)
        votes[sig] = votes.get(sig, 0.0) + x
    per_pod = [sum(v) / len(v) for v in by_pod.values()]
    return sum(per_pod) / len(per_pod), max(sorted(votes), key=lambda k: votes[k])


def signal_means(window: Sequence[Sample]) -> dict[str, float]:
    """Mean per-pod value of queue depth and every pool's occupancy over `window`."""
    acc: dict[str, list[float]] = {}
    for s in window:
        acc.setdefault("queue_depth", []).append(s.queue)
        for pool, occ in s.pools.items():
            acc.setdefault(f"pool_{pool}", []).append(occ)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def decide(now: float, current: int, ready_pods: Sequence[str], pending: int, samples: Iterable[Sample],
           cfg: ScalerConfig, state: ScalerState | None = None) -> Decision:
    """Desired replicas at time `now` given `current` (Deployment spec) replicas, the ready pods, the
    number of pods not yet ready (pending or starting), and metric samples."""
    state = state or ScalerState()
    samples = list(samples)
    ready = set(ready_pods)
    n_ready = len(ready)

    def out(desired: int, reason: str, signal: str, panic: bool, st: ScalerState,
            signals: dict[str, float] | None = None) -> Decision:
        return Decision(desired, current, reason, signal, panic, st, signals or {})

    def clamp(n: int) -> int:
        return min(cfg.max_replicas, max(cfg.min_replicas, n))

    if current < cfg.min_replicas or current > cfg.max_replicas:
        d = clamp(current)
        return out(d, f"replicas {current} outside [{cfg.min_replicas}, {cfg.max_replicas}]: set to {d}",
                   "bounds", False, state)
    if n_ready == 0:
        if current == 0 and cfg.min_replicas == 0:
            return out(0, "no replicas and min 0: stay at zero", "idle", False, state)
        return out(current, "no ready pods yet: hold", "hold_nodata", False, state)
    stable_w = _window(samples, now, cfg.stable_window, ready)
    fresh = {s.pod for s in samples if s.pod in ready and now - s.time <= cfg.stale_after}
    if not stable_w:
        return out(current, "no metrics from ready pods in the stable window: hold", "hold_nodata", False, state)
    missing = sorted(ready - fresh)
    if missing:
        return out(current, f"metrics stale or missing for {len(missing)} of {n_ready} ready pods "
                   f"({', '.join(missing[:3])}): hold", "hold_stale", False, state)
    panic_w = _window(samples, now, cfg.panic_window, ready) or [
        max((s for s in stable_w if s.pod == p), key=lambda s: s.time) for p in ready]
    stable_load, stable_sig = _mean_load(stable_w, cfg)
    panic_load, panic_sig = _mean_load(panic_w, cfg)
    signals = signal_means(stable_w)
    want_stable = math.ceil(n_ready * stable_load - 1e-9)
    want_panic = math.ceil(n_ready * panic_load - 1e-9)
    panic_until = state.panic_until if state.panic_until is not None and state.panic_until > now else None
    if want_panic / n_ready >= cfg.panic_threshold:
        panic_until = now + cfg.stable_window
    panic = panic_until is not None
    if panic:
        load, sig, want = panic_load, panic_sig, max(want_panic, current)
        why = f"panic: {sig} load {panic_load:.2f}x target over {cfg.panic_window:.0f}s"
    else:
        load, sig, want = stable_load, stable_sig, want_stable
        why = f"{sig} load {stable_load:.2f}x target over {cfg.stable_window:.0f}s"
    if not panic and abs(load - 1.0) <= cfg.tolerance:
        want = current
        why = f"{sig} load {load:.2f}x target is within ±{cfg.tolerance:.0%}"
    # step-rate bounds relative to ready pods
    hi = math.ceil(max(n_ready, 1) * cfg.max_scale_up_rate)
    lo = math.floor(n_ready / cfg.max_scale_down_rate)
    bounded = min(hi, max(lo, want))
    if bounded != want:
        why += f"; step limited to [{lo}, {hi}]"
    rec = clamp(bounded)
    if rec != bounded:
        why += f"; clamped to [{cfg.min_replicas}, {cfg.max_replicas}]"
    # scale-down stabilization: highest recommendation of the window (including this one)
    recs = tuple((t, r) for t, r in state.recommendations if now - t < cfg.scale_down_stabilization)
    recs = recs + ((now, rec),)
    desired = rec
    if rec < current:
        ceiling = max(r for _, r in recs)
        if ceiling > rec:
            desired = min(current, ceiling)
            why += f"; scale-down stabilized at {desired} (max of last {cfg.scale_down_stabilization:.0f}s)"
    new_state = replace(state, recommendations=recs, panic_until=panic_until)
    if desired > current and pending > 0:
        return out(current, f"{pending} pod(s) still pending: no scale-up ({why})", "hold_pending", panic,
                   new_state, signals)
    if desired == current and "within" not in why and "stabilized" not in why:
        why += f": keep {current}"
    return out(desired, why, sig, panic, new_state, signals)
