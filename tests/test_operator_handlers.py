"""The kopf handler functions called directly with fake bodies and the cluster I/O (`kube.py`) replaced: what
they write (status, events), which kopf error they raise (permanent for bad specs, temporary with backoff for
API-server trouble), the ticker's bookkeeping, and the single writer of replicas."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kopf
import pytest
import urllib3
import yaml
from dsv4.operator import handlers, kube
from dsv4.operator import ticker as ticker_mod
from dsv4.operator.reconcile import Observed
from dsv4.operator.ticker import Ticker

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "examples" / name).read_text())
    obj["metadata"].update(uid=f"uid-{obj['metadata']['name']}", generation=1)
    return obj


class Cluster:
    """Stands in for the API server: records applies, status patches and events."""

    def __init__(self, deployment: dict[str, Any] | None = None) -> None:
        self.deployment = deployment
        self.applied: list[dict[str, Any]] = []
        self.status: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.scale: list[int] = []                 # spec.replicas written through /scale
        self.fail_observe: Exception | None = None

    def install(self, mp: pytest.MonkeyPatch) -> Cluster:
        def observe(name: str, namespace: str):
            if self.fail_observe:
                raise self.fail_observe
            return Observed(deployment=copy.deepcopy(self.deployment)), []

        mp.setattr(kube, "observe", observe)
        mp.setattr(kube, "apply", lambda objs: self.applied.extend(objs))
        mp.setattr(kube, "prune", lambda *a: None)
        mp.setattr(kube, "post_event", lambda obj, ev: self.events.append(ev))
        mp.setattr(kube, "write_status", lambda ns, name, st: self.status.append(copy.deepcopy(st)))
        mp.setattr(kube, "write_scale", lambda ns, name, n, only_if_absent: self.scale.append(n))
        mp.setattr(ticker_mod, "scrape_pods", lambda *a: [])
        return self


def change(obj: dict[str, Any], c: Cluster, retry: int = 0) -> dict[str, Any]:
    """Run the create handler; returns the status it wrote (through kube.write_status, the only writer)."""
    m = obj["metadata"]
    handlers.on_create(body=obj, name=m["name"], namespace=m["namespace"], uid=m["uid"], meta=m, spec=obj["spec"],
                       status=obj.get("status"), patch=kopf.Patch(), retry=retry)
    return c.status[-1]


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_valid_endpoint_applies_children_and_writes_status(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster().install(monkeypatch)
    status = change(example("long-context-agent.yaml"), c)
    assert [o["kind"] for o in c.applied] == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    assert cond(status, "PlanValid")["status"] == "True"
    assert [e[1] for e in c.events] == ["Planned"]


def test_unservable_spec_is_a_permanent_error_with_status_and_one_event(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster().install(monkeypatch)
    obj = example("invalid-pro-on-h100.yaml")
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match="WeightsDoNotFit"):
        m = obj["metadata"]
        handlers.on_update(body=obj, name=m["name"], namespace=m["namespace"], uid=m["uid"], meta=m,
                           spec=obj["spec"], status=None, patch=patch, retry=0)
    pv = cond(c.status[-1], "PlanValid")  # written although the handler failed
    assert (pv["status"], pv["reason"]) == ("False", "WeightsDoNotFit")
    assert c.applied == [] and [e[:2] for e in c.events] == [("Warning", "WeightsDoNotFit")]


def test_api_server_unavailable_is_a_temporary_error_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster().install(monkeypatch)
    c.fail_observe = urllib3.exceptions.MaxRetryError(None, "/apis", "connection refused")
    delays = []
    for retry in range(7):
        with pytest.raises(kopf.TemporaryError) as err:
            change(example("short-chat.yaml"), c, retry=retry)
        delays.append(err.value.delay)
    assert delays == [15, 30, 60, 120, 240, 300, 300]


def test_a_bug_while_observing_is_permanent_not_a_retry_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster().install(monkeypatch)
    c.fail_observe = KeyError("resources")
    with pytest.raises(kopf.PermanentError, match="KeyError"):
        change(example("short-chat.yaml"), c)


@pytest.mark.parametrize(("exc", "transient"), [
    (ConnectionRefusedError(), True), (TimeoutError(), True), (type("ApiException", (Exception,), {"status": 503})(),
                                                                True),
    (type("ApiException", (Exception,), {"status": 429})(), True), (type("ApiException", (Exception,),
                                                                          {"status": 422})(), False),
    (type("ApiException", (Exception,), {"status": 403})(), False), (ValueError("x"), False)])
def test_is_transient(exc: Exception, transient: bool) -> None:
    assert kube.is_transient(exc) is transient


def test_ticker_tracks_endpoints_and_forgets_deleted_ones() -> None:
    t = Ticker()
    obj = example("short-chat.yaml")
    t.track({"type": "ADDED", "object": obj})
    t.samples[obj["metadata"]["uid"]] = ticker_mod.deque()
    assert t.endpoints[obj["metadata"]["uid"]] == obj
    assert t.endpoints[obj["metadata"]["uid"]] is not obj  # a copy: kopf's body may change under us
    gone = copy.deepcopy(obj)
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    t.track({"type": "MODIFIED", "object": gone})
    assert not t.endpoints and obj["metadata"]["uid"] not in t.samples
    t.track({"type": None, "object": obj})  # the initial listing
    t.track({"type": "DELETED", "object": obj})
    assert not t.endpoints


def test_track_handler_feeds_the_ticker_in_kopfs_memo() -> None:
    memo = kopf.Memo(ticker=Ticker())
    obj = example("short-chat.yaml")
    handlers.track(event={"type": "ADDED", "object": obj}, memo=memo)
    assert memo.ticker.endpoints[obj["metadata"]["uid"]] == obj


def test_tick_reverts_a_manual_deployment_scale_under_autoscaling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Single writer: the autoscaler decides from its own last decision (status.desiredReplicas), the
    apply writes it back over the `kubectl scale deployment` value, and a Warning event says so."""
    obj = example("short-chat.yaml")  # builtin autoscaling, 1..8
    c = Cluster().install(monkeypatch)
    t = Ticker()
    obj["status"] = dict(change(obj, c))
    want = obj["status"]["desiredReplicas"]
    dep = next(o for o in c.applied if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == want
    c.deployment = {"spec": {"replicas": want + 3}, "status": {"replicas": want + 3, "readyReplicas": 0}}
    c.applied.clear()
    c.events.clear()
    t.tick(obj)
    dep = next(o for o in c.applied if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == want, "the manual scale was adopted"
    assert c.status[-1]["desiredReplicas"] == want
    (ev,) = [e for e in c.events if e[1] == "ReplicasReverted"]
    assert ev[0] == "Warning" and f"scaled to {want + 3}" in ev[2] and "kubectl scale dsv4ep/chat" in ev[2]
    # the next tick, with the Deployment back at the operator's value, says nothing more
    c.deployment = {"spec": {"replicas": want}, "status": {"replicas": want, "readyReplicas": 0}}
    obj["status"] = c.status[-1]
    c.events.clear()
    t.tick(obj)
    assert not [e for e in c.events if e[1] == "ReplicasReverted"]


def test_tick_writes_status_only_when_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster().install(monkeypatch)
    t = Ticker()
    obj = example("invalid-pro-on-h100.yaml")  # a steady PlanValid=False: nothing changes between ticks
    t.tick(obj)
    assert len(c.status) == 1 and [e[1] for e in c.events] == ["WeightsDoNotFit"]
    obj["status"] = c.status[-1]
    t.tick(obj)
    t.tick(obj)
    assert len(c.status) == 1 and len(c.events) == 1


def test_tick_skips_invalid_specs_and_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster().install(monkeypatch)
    t = Ticker()
    obj = example("short-chat.yaml")
    obj["spec"]["autoscaling"]["minReplicas"] = 99  # > maxReplicas
    t.tick(obj)
    assert c.status == [] and c.applied == [] and c.events == []


def test_tick_survives_api_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster().install(monkeypatch)
    t = Ticker()
    c.fail_observe = ConnectionRefusedError("api server down")
    t.tick_safe(example("short-chat.yaml"))  # logged, not raised
    assert c.status == []


def test_spec_replicas_is_written_through_scale_after_the_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /scale needs spec.replicas: the create handler fills it (after the status, whose desiredReplicas the
    CRD's rule compares it with); the ticker mirrors the autoscaler's decision the same way."""
    c = Cluster().install(monkeypatch)
    order: list[str] = []
    monkeypatch.setattr(kube, "write_status", lambda ns, name, st: order.append("status") or c.status.append(st))
    monkeypatch.setattr(kube, "write_scale", lambda ns, name, n, fill: order.append("scale") or c.scale.append(n))
    obj = example("short-chat.yaml")  # builtin autoscaling
    obj["status"] = dict(change(obj, c))
    assert order == ["status", "scale"] and c.scale == [obj["status"]["desiredReplicas"]]
    obj["spec"]["replicas"] = c.scale[-1]  # the watch brings the mirror back: nothing more to write
    c.scale.clear()
    Ticker().tick(obj)
    assert c.scale == []
