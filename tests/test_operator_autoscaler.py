"""The autoscaler's pure decision on synthetic metric series."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from dsv4.operator.autoscaler import Sample, ScalerConfig, ScalerState, decide

CFG = ScalerConfig(min_replicas=1, max_replicas=10)
POOLS = ("swa", "csa", "idx", "hca", "csa_state", "hca_state")


def series(pods: list[str], t0: float, t1: float, f: Callable[[float, str], tuple[dict[str, float], float]],
           every: float = 5.0) -> list[Sample]:
    out, t = [], t0
    while t <= t1 + 1e-9:
        for p in pods:
            pools, q = f(t, p)
            out.append(Sample(t, p, pools, q))
        t += every
    return out


def flat(occ: float, queue: float = 0.0, pool: str = "csa") -> Callable[[float, str], tuple[dict[str, float], float]]:
    return lambda t, p: ({**dict.fromkeys(POOLS, 0.1), pool: occ}, queue)


def pods(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


def test_plateau_at_target_is_within_tolerance() -> None:
    s = series(pods(3), 0, 120, flat(0.8 * 1.05))
    d = decide(120, 3, pods(3), 0, s, CFG)
    assert d.desired == 3 and d.direction == "none" and "within" in d.reason


def test_sustained_overload_scales_to_current_times_load() -> None:
    s = series(pods(2), 0, 120, flat(0.8 * 1.5))
    d = decide(120, 2, pods(2), 0, s, CFG)
    assert d.desired == 3 and d.signal == "pool_csa" and not d.panic


def test_burst_enters_panic_scales_up_within_step_limit_and_never_down_in_panic() -> None:
    calm = series(pods(2), 0, 110, flat(0.4))
    burst = series(pods(2), 115, 120, flat(0.8 * 4))
    d = decide(120, 2, pods(2), 0, calm + burst, CFG)
    assert d.panic and d.desired == 4 and "step limited" in d.reason  # ceil(2*4)=8 capped at 2x ready
    # load vanishes right after: still in panic (one stable window), so no scale-down
    after = series(pods(4), 125, 140, flat(0.05))
    d2 = decide(140, 4, pods(4), 0, calm + burst + after, CFG, d.state)
    assert d2.panic and d2.desired == 4


def test_scale_down_waits_for_the_stabilization_window_and_is_rate_limited() -> None:
    cfg = ScalerConfig(min_replicas=1, max_replicas=10, scale_down_stabilization=300)
    state, current = ScalerState(), 4
    high = series(pods(4), 0, 60, flat(0.8))
    d = decide(60, current, pods(4), 0, high, cfg, state)
    state = d.state
    assert d.desired == 4
    low_samples = high + series(pods(4), 65, 400, flat(0.2))
    decisions = []
    for now in range(135, 400, 15):
        d = decide(now, current, pods(current), 0, low_samples, cfg, state)
        state, current = d.state, d.desired
        decisions.append((now, d.desired))
    first_down = next(t for t, r in decisions if r < 4)
    assert first_down >= 60 + 300  # the recommendation of 4 at t=60 holds for 300 s
    assert (first_down, 2) in decisions  # at most /2 per step


def simulate(demand: Callable[[float], float], start: int, seconds: int, cfg: ScalerConfig = CFG
             ) -> list[tuple[float, int]]:
    """Closed loop: total demand (in 'pods at target occupancy') spread over the current replicas,
    sampled every 5 s, decided every 15 s; returns (time, replicas) after each decision."""
    samples: list[Sample] = []
    state, current, out = ScalerState(), start, []
    for t in range(0, seconds, 5):
        occ = 0.8 * demand(t) / current
        samples += [Sample(t, p, {"csa": occ, "swa": occ / 2}, 0.0) for p in pods(current)]
        if t >= 60 and t % 15 == 0:
            d = decide(t, current, pods(current), 0, samples, cfg, state)
            state, current = d.state, d.desired
            out.append((t, current))
    return out


def test_oscillating_load_does_not_flap() -> None:
    # demand swings +-30 % around 3 pods every 20 s: the 60 s window averages it out
    trace = simulate(lambda t: 3 * (0.7 if int(t // 20) % 2 else 1.3), 3, 1800)
    replicas = [r for _, r in trace]
    changes = sum(a != b for a, b in zip(replicas, replicas[1:], strict=False))
    assert set(replicas) <= {3, 4} and changes <= 4, trace


def test_step_load_converges_and_comes_back_down() -> None:
    trace = simulate(lambda t: 6.0 if 120 <= t < 600 else 2.0, 2, 1500)
    at = dict(trace)
    assert at[585] == 6  # converged on the demand
    assert max(r for _, r in trace) <= 8  # no runaway overshoot
    assert at[1485] == 2  # back down after the stabilization window
    assert all(r == 6 for t, r in trace if 600 <= t < 600 + 240)  # held during scale-down stabilization


def test_stale_metrics_of_one_pod_hold() -> None:
    s = series(["p0"], 0, 120, flat(0.99)) + series(["p1"], 0, 60, flat(0.99))
    d = decide(120, 2, ["p0", "p1"], 0, s, CFG)
    assert d.desired == 2 and d.signal == "hold_stale" and "p1" in d.reason


def test_missing_metrics_hold() -> None:
    d = decide(120, 2, ["p0", "p1"], 0, [], CFG)
    assert d.desired == 2 and d.signal == "hold_nodata"
    d = decide(120, 2, [], 2, [], CFG)
    assert d.desired == 2 and d.signal == "hold_nodata"


def test_no_scale_up_while_pods_are_pending_but_scale_down_is_allowed() -> None:
    hot = series(pods(2), 0, 120, flat(0.8 * 2.5))
    d = decide(120, 3, pods(2), 1, hot, CFG)
    assert d.desired == 3 and d.signal == "hold_pending" and "pending" in d.reason
    cold = series(pods(2), 0, 120, flat(0.05))
    cfg = ScalerConfig(min_replicas=1, max_replicas=10, scale_down_stabilization=0)
    d = decide(120, 3, pods(2), 1, cold, cfg)
    assert d.desired == 1 and d.direction == "down"


@pytest.mark.parametrize("pool", ["csa", "swa", "hca_state"])
def test_pool_specific_saturation_is_named(pool: str) -> None:
    s = series(pods(2), 0, 120, flat(0.96, pool=pool))
    d = decide(120, 2, pods(2), 0, s, CFG)
    assert d.signal == f"pool_{pool}" and d.desired == 3
    assert d.signals[f"pool_{pool}"] == pytest.approx(0.96)


def test_queue_depth_drives_scaling_when_the_cache_is_idle() -> None:
    s = series(pods(2), 0, 120, flat(0.1, queue=15))
    d = decide(120, 2, pods(2), 0, s, CFG)
    assert d.signal == "queue" and d.desired == 4  # ceil(2 * 15/5)=6, capped at 2x ready


def test_bounds() -> None:
    s = series(pods(2), 0, 120, flat(0.8 * 3))
    cfg = ScalerConfig(min_replicas=1, max_replicas=3)
    assert decide(120, 2, pods(2), 0, s, cfg).desired == 3
    assert decide(120, 5, pods(5), 0, s, cfg).signal == "bounds"
    assert decide(120, 5, pods(5), 0, s, cfg).desired == 3
    idle = series(pods(1), 0, 120, lambda t, p: (dict.fromkeys(POOLS, 0.0), 0.0))
    cfg0 = ScalerConfig(min_replicas=0, max_replicas=3, scale_down_stabilization=0)
    assert decide(120, 1, pods(1), 0, idle, cfg0).desired == 0
    assert decide(120, 0, [], 0, [], cfg0).desired == 0


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        ScalerConfig(min_replicas=5, max_replicas=2)
    with pytest.raises(ValueError, match="panic_window"):
        ScalerConfig(panic_window=100, stable_window=60)
