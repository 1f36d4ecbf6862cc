"""The issue-10 scenario on the real local control plane (docs/local-cluster.md, docs/reliability.md "## Operator").

The chart is `helm install`ed; the operator runs as a local process authenticated with a TokenRequest token of
the chart's ServiceAccount (so the chart's RBAC is proven enough); the example endpoints (e2e overlays:
tiny model on the host CPU) are `kubectl apply`ed; real `dsv4 serve` processes answer an `openai` client;
the built-in autoscaler scales on per-pool occupancy and drains on the way down; Prometheus scrapes pods
and operator and evaluates every dashboard query and alert; then the faults: manual scale, profile edit,
deleted child, invalid CRs, operator SIGKILL mid-reconcile, a 30 s API-server outage, CR deletion.

Tests run in file order and share one operator and one examples namespace (module fixtures); endpoints
that need no process (fault tests) are planned for H200 with an unsatisfiable nodeSelector, so they stay
Pending and cost no CPU.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dsv4.e2e import cluster as cluster_mod
from dsv4.e2e import opproc
from dsv4.e2e.prom import Prometheus
from dsv4.operator.manifests import PRESTOP_SLEEP_S

from .conftest import E2E_CLUSTER
from .test_e2e_cluster import pid_of, pid_running, pods, ready, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = REPO / "examples" / "e2e"
GROUP, VERSION, PLURAL = "serving.dsv4.dev", "v1alpha1", "dsv4endpoints"
SMP = "application/merge-patch+json"
TICK_S = 3.0  # the operator's timer interval in these tests


# ---- helpers ------------------------------------------------------------------------------------------------
def kubectl(cluster, *args: str, stdin: str | None = None, check: bool = True):
    return opproc.kubectl(list(args), cluster.kubeconfig, stdin=stdin, check=check)


def get_ep(co, ns: str, name: str) -> dict:
    return co.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def condition(ep: dict, ctype: str) -> dict:
    return next((c for c in (ep.get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def ready_ips(discovery, ns: str, service: str) -> list[str]:
    """Addresses of ready endpoints in the Service's EndpointSlices (what a client or router would use)."""
    resp = discovery.list_namespaced_endpoint_slice(ns, label_selector=f"kubernetes.io/service-name={service}",
                                                    _preload_content=False)
    out = []
    for sl in json.loads(resp.data)["items"]:
        for ep in sl.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready"):
                out += ep["addresses"]
    return sorted(set(out))


def owned(items: list, uid: str) -> list:
    return [o for o in items if any(r.uid == uid for r in (o.metadata.owner_references or []))]


def cheap_endpoint(name: str, replicas: int = 2) -> dict:
    """A DSV4Endpoint the planner plans for real (Flash on H200, DP2+EP) whose pods can never schedule."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DSV4Endpoint", "metadata": {"name": name},
            "spec": {"model": {"variant": "flash", "weights": {"pvc": {"claimName": "flash-weights"}}},
                     "profile": {"name": "short-chat"}, "accelerator": {"type": "H200"}, "replicas": replicas,
                     "placement": {"nodeSelector": {opproc.UNSCHEDULABLE_LABEL: "true"}}}}


def children_of(api, ns: str, name: str, uid: str) -> dict[str, int]:
    from kubernetes import client

    core, apps, pol = client.CoreV1Api(api), client.AppsV1Api(api), client.PolicyV1Api(api)
    deps = owned(apps.list_namespaced_deployment(ns).items, uid)
    rs = [r for d in deps for r in owned(apps.list_namespaced_replica_set(ns).items, d.metadata.uid)]
    return {"Deployment": len(deps), "ConfigMap": len(owned(core.list_namespaced_config_map(ns).items, uid)),
            "Service": len(owned(core.list_namespaced_service(ns).items, uid)),
            "PodDisruptionBudget": len(owned(pol.list_namespaced_pod_disruption_budget(ns).items, uid)),
            "ReplicaSet": len(rs)}


@dataclass
class Call:
    ip: str
    start: float
    end: float = 0.0
    ok: bool = False
    tokens: int = 0
    error: str = ""


@dataclass
class Load:
    """Threads sending chat requests to ready endpoint IPs (re-read from the EndpointSlices before each request).
    Thread i targets ready_ips[i % n], so every pod always has requests in flight; with `pinned`, thread i sends to
    pinned[i] (readiness aside) until that address appears in `released`."""

    discovery: object
    ns: str
    service: str
    model: str
    max_tokens: int
    pinned: list[str] = field(default_factory=list)
    released: dict[str, float] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _worker(self, i: int) -> None:
        from openai import OpenAI

        while not self.stop.is_set():
            ip = self.pinned[i] if i < len(self.pinned) and self.pinned[i] not in self.released else None
            if ip is None:
                try:
                    ips = ready_ips(self.discovery, self.ns, self.service)
                except Exception:  # noqa: BLE001 - API hiccup: try again
                    ips = []
                if not ips:
                    time.sleep(0.2)
                    continue
                ip = ips[i % len(ips)]
            call = Call(ip=ip, start=time.time())
            self.calls.append(call)
            try:
                c = OpenAI(base_url=f"http://{call.ip}:8000/v1", api_key="unused", max_retries=0, timeout=300)
                r = c.chat.completions.create(model=self.model, max_tokens=self.max_tokens, temperature=0.0,
                                              messages=[{"role": "user", "content": f"request {i} " * 16}])
                call.tokens = r.usage.completion_tokens
                call.ok = call.tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
            except Exception as e:  # noqa: BLE001 - recorded as a lost request
                call.error = f"{type(e).__name__}: {e}"[:300]
            call.end = time.time()

    def start(self, n: int) -> Load:
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()
        return self

    def finish(self, timeout: float = 300) -> list[Call]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        return list(self.calls)


# ---- module fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chart(local_cluster):
    install = opproc.install_chart(local_cluster.kubeconfig)
    # the CRD came with the chart: wait until the API serves it (a fresh CRD answers 429 for a moment)
    wait_for("the DSV4Endpoint API served", lambda: kubectl(local_cluster, "get", "dsv4ep", "-A", check=False)
             .returncode == 0, timeout=60, interval=0.5)
    return install


@pytest.fixture(scope="module")
def operator(local_cluster, chart, tmp_path_factory):
    d = tmp_path_factory.mktemp("operator")
    kcfg = opproc.service_account_kubeconfig(local_cluster.kubeconfig, chart.namespace, chart.service_account,
                                             d / "sa.kubeconfig")
    op = opproc.OperatorProcess(kcfg, d / "operator.log", timer_interval_s=TICK_S).start()
    try:
        yield op
    finally:
        op.stop()
        assert not op.alive(), f"the operator outlived its stop; log {op.log}"


@pytest.fixture(scope="module")
def examples_ns(local_cluster, operator):
    """A namespace with both example endpoints (e2e overlays) applied with kubectl and Ready."""
    from kubernetes import client

    ns = f"ex-{uuid.uuid4().hex[:6]}"
    kubectl(local_cluster, "create", "namespace", ns)
    kubectl(local_cluster, "apply", "-n", ns, "-f", str(OVERLAYS))
    with local_cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        for name in ("chat", "agents"):
            wait_for(f"{name} Ready", lambda n=name: condition(get_ep(co, ns, n), "Ready").get("status") == "True",
                     timeout=240, interval=1)
    try:
        yield ns
    finally:
        kubectl(local_cluster, "delete", "namespace", ns, "--wait=false", check=False)


# ---- 1. chart + RBAC ----------------------------------------------------------------------------------------
def test_operator_runs_with_the_charts_service_account_only(local_cluster, chart, operator):
    sa = f"system:serviceaccount:{chart.namespace}:{chart.service_account}"
    can = {(verb, res): kubectl(local_cluster, "auth", "can-i", verb, res, "--as", sa, "-A", check=False)
           .stdout.strip() for verb, res in [("patch", "dsv4endpoints.serving.dsv4.dev/status"),
                                             ("create", "deployments.apps"), ("patch", "poddisruptionbudgets.policy"),
                                             ("list", "pods"), ("create", "events"), ("get", "secrets"),
                                             ("create", "pods/exec")]}
    assert can[("patch", "dsv4endpoints.serving.dsv4.dev/status")] == "yes"
    assert can[("create", "deployments.apps")] == "yes" and can[("patch", "poddisruptionbudgets.policy")] == "yes"
    assert can[("get", "secrets")] == "no", "the chart's RBAC must not read Secrets cluster-wide"
    assert can[("create", "pods/exec")] == "no"
    kc = yaml.safe_load(operator.kubeconfig.read_text())
    assert "token" in kc["users"][0]["user"] and "client-certificate-data" not in kc["users"][0]["user"]
    assert operator.alive()
    # the chart's own operator Deployment is scaled to 0 (see dsv4.e2e.opproc), so its rollout completes
    assert kubectl(local_cluster, "rollout", "status", f"deployment/{chart.deployment}", "-n", chart.namespace,
                   "--timeout=20s").returncode == 0
    # the dashboards ship as ConfigMaps
    cms = json.loads(kubectl(local_cluster, "get", "configmaps", "-n", chart.namespace, "-l", "grafana_dashboard=1",
                             "-o", "json").stdout)["items"]
    assert len(cms) == 5, [c["metadata"]["name"] for c in cms]


# ---- 2. examples: planner choices, Ready, printer columns, openai ------------------------------------------
def test_examples_are_planned_ready_and_serve(local_cluster, examples_ns):
    from kubernetes import client
    from openai import OpenAI

    ns = examples_ns
    with local_cluster.api_client() as api:
        co, core, apps = client.CustomObjectsApi(api), client.CoreV1Api(api), client.AppsV1Api(api)
        disc = client.DiscoveryV1Api(api)
        seen = {}
        for name in ("chat", "agents"):
            ep = get_ep(co, ns, name)
            plan = ep["status"]["plan"]
            cfg = yaml.safe_load(core.read_namespaced_config_map(f"{name}-config", ns).data["config.yaml"])
            # the planner's choices are what the runtime is configured with
            assert cfg["tp"] == plan["tensorParallelSize"]
            assert cfg["batching_delay_ms"] == plan["batchingDelayMs"]
            assert cfg["cache_policy"] == plan["cachePolicy"] and cfg["hca_state"] == plan["hcaState"]
            assert cfg["max_model_len"] == plan["maxModelLen"] and cfg["device"] == "cpu"
            dep = apps.read_namespaced_deployment(name, ns)
            c0 = dep.spec.template.spec.containers[0]
            assert "--config" in (c0.command or []) + (c0.args or [])
            assert "nvidia.com/gpu" not in (c0.resources.limits or {})  # accelerator.type cpu: no GPU requested
            # the planned CPU / memory requests reach the pods, which are not BestEffort (issue 21)
            planned = c0.resources.requests or {}
            assert {"cpu", "memory"} <= set(planned) and "memory" in (c0.resources.limits or {}), c0.resources
            selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
            pods = core.list_namespaced_pod(ns, label_selector=selector).items
            assert pods and all(p.spec.containers[0].resources.requests == planned for p in pods)
            described = kubectl(local_cluster, "describe", "pod", "-n", ns, "-l", selector).stdout
            qos = re.findall(r"^QoS Class:\s+(\S+)", described, re.M)
            assert qos and set(qos) <= {"Burstable", "Guaranteed"}, described[-2000:]
            seen[name] = plan
            assert condition(ep, "PlanValid")["status"] == "True"
        # two profiles, two different plans (short-chat: tight batching delay; long-context-agent: reuse kept)
        assert seen["chat"]["batchingDelayMs"] < seen["agents"]["batchingDelayMs"]
        assert seen["agents"]["cachePolicy"] == "checkpoint" and seen["chat"]["cachePolicy"] == "recompute"

        # the default columns are checked in test_e2e_operator.py; -o wide adds model, profile and plan summary
        table = kubectl(local_cluster, "get", "dsv4ep", "-n", ns, "-o", "wide").stdout
        header = table.splitlines()[0].split()
        assert header == ["NAME", "READY", "URL", "REPLICAS", "TP", "MAXCACHE", "REASON", "AGE", "MODEL", "PROFILE",
                          "PLAN"], table
        rows = {ln.split()[0]: ln for ln in table.splitlines()[1:]}
        assert " tiny " in rows["chat"] and " short-chat " in rows["chat"], table
        assert " long-context-agent " in rows["agents"], table

        for name, model in (("chat", "deepseek-v4-tiny"), ("agents", "agents")):
            ips = ready_ips(disc, ns, name)
            assert ips, f"no ready endpoint for {name}"
            oc = OpenAI(base_url=f"http://{ips[0]}:8000/v1", api_key="unused", max_retries=0, timeout=120)
            assert [m.id for m in oc.models.list().data] == [model]
            r = oc.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=8, temperature=0.0)
            msg = r.choices[0].message  # thinking mode by default: a short answer may be all reasoning
            assert r.usage.completion_tokens >= 1 and (msg.content or (msg.model_extra or {}).get("reasoning_content"))


# ---- 3. autoscaling -----------------------------------------------------------------------------------------
def test_autoscaler_scales_up_on_pool_occupancy_and_down_with_drain(local_cluster, examples_ns, record_property):
    """Load raises the fullest pool's occupancy over `targetOccupancy` -> 2 replicas; load stops -> back to 1
    after `scaleDownStabilizationSeconds`; requests in flight on the removed pod complete (preStop + drain)."""
    from kubernetes import client

    ns = examples_ns
    with local_cluster.api_client() as api:
        co, apps, core, disc = (client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api),
                                client.DiscoveryV1Api(api))
        spec = get_ep(co, ns, "chat")["spec"]["autoscaling"]
        assert apps.read_namespaced_deployment("chat", ns).spec.replicas == 1
        t0 = time.time()
        burst = Load(disc, ns, "chat", "deepseek-v4-tiny", max_tokens=200).start(8)
        try:
            def scaled_up():
                hist = get_ep(co, ns, "chat")["status"].get("scalingHistory") or []
                return next((h for h in hist if h["toReplicas"] > h["fromReplicas"]), None)

            try:
                up = wait_for("a ScaledUp decision", scaled_up, timeout=90, interval=0.5)
            except AssertionError as e:
                st = get_ep(co, ns, "chat")["status"]
                raise AssertionError(f"{e}; status: occupancy {st.get('poolOccupancy')}, queue {st.get('queueDepth')},"
                                     f" history {st.get('scalingHistory')}") from None
            t_up = time.time() - t0
            assert "pool_" in up["reason"], f"expected the occupancy signal to bind: {up}"
            wait_for("2 ready replicas", lambda: len(ready_ips(disc, ns, "chat")) == 2, timeout=180, interval=1)
            t_ready = time.time() - t0
        finally:
            burst_calls = burst.finish()
        assert all(c.ok for c in burst_calls), [c.error for c in burst_calls if not c.ok]

        # scale down under a light, continuous load (one thread per pod, long generations: load ~0.25x target;
        # long enough that a request can outlive the 10 s preStop pause and be finished by the SIGTERM drain).
        # The runtime aborts what is left when its drain grace ends, by design, so a request must fit in preStop +
        # drain grace at this machine's decode speed: sized from the burst's per-stream rate (8 streams, slower
        # than the trickle's 2), using 70 % of the window.
        rates = [c.tokens / (c.end - c.start) for c in burst_calls if c.end > c.start]
        grace = apps.read_namespaced_deployment("chat", ns).spec.template.spec.termination_grace_period_seconds
        window_s = PRESTOP_SLEEP_S + max(1, grace - PRESTOP_SLEEP_S - 5)  # manifests: the runtime's grace_period_s
        trickle_tokens = int(max(64, min(1200, statistics.median(rates) * window_s * 0.7)))
        ips_before = ready_ips(disc, ns, "chat")
        deleted_at: dict[str, float] = {}
        # one thread per pod, pinned to it until its deletion is seen: a pod that turns NotReady under this
        # machine's load (its readiness probe late) leaves the EndpointSlice and is the one the ReplicaSet removes
        # first, so readiness-routed requests would all go to the survivor and the drain would go unexercised
        trickle = Load(disc, ns, "chat", "deepseek-v4-tiny", max_tokens=trickle_tokens, pinned=ips_before,
                       released=deleted_at).start(2)
        t1 = time.time()
        try:
            def one_left() -> bool:
                for p in pods(core, ns, "dsv4.io/endpoint=chat"):
                    if p["metadata"].get("deletionTimestamp") and p["status"].get("podIP"):
                        deleted_at.setdefault(p["status"]["podIP"], time.time())
                return apps.read_namespaced_deployment("chat", ns).spec.replicas == 1 and \
                    len(pods(core, ns, "dsv4.io/endpoint=chat")) == 1

            try:
                wait_for("scale-down to 1 with the old pod gone", one_left, timeout=180, interval=0.3)
            except AssertionError as e:
                st = get_ep(co, ns, "chat")["status"]
                raise AssertionError(f"{e}; status: occupancy {st.get('poolOccupancy')}, desired "
                                     f"{st.get('desiredReplicas')}, history {st.get('scalingHistory')}") from None
            t_down = time.time() - t1
        finally:
            calls = trickle.finish()
    removed = [ip for ip in ips_before if ip in deleted_at]
    assert removed, f"no pod of {ips_before} was seen terminating"
    in_flight = [c for c in calls if c.ip in removed and c.start < deleted_at[c.ip] and
                 (c.end == 0 or c.end > deleted_at[c.ip])]
    # still running when the preStop pause (10 s) ended, i.e. finished by the runtime's SIGTERM drain
    drained = [c for c in in_flight if c.end > deleted_at[c.ip] + 10]
    lost = [c for c in calls if not c.ok]
    record_property("scale_up_decision_s", round(t_up, 1))
    record_property("scale_up_ready_s", round(t_ready, 1))
    record_property("scale_down_s", round(t_down, 1))
    record_property("in_flight_on_removed_pod", len(in_flight))
    record_property("drained_after_sigterm", len(drained))
    print(f"\n[autoscale] ScaledUp decision {t_up:.1f} s after load start, 2 ready at {t_ready:.1f} s; scaled down "
          f"{t_down:.1f} s after load dropped; {len(calls)} requests during scale-down, {len(in_flight)} in flight on "
          f"the removed pod at its deletion ({len(drained)} of them past the 10 s preStop), {len(lost)} lost "
          f"(window {spec.get('stableWindowSeconds')} s, stabilization {spec.get('scaleDownStabilizationSeconds')} s)")
    assert in_flight, "no request was in flight on the removed pod: the drain was not exercised"
    assert not lost, [f"{c.ip}: {c.error}" for c in lost]


# ---- 4. manual kubectl scale while the autoscaler is on -----------------------------------------------------
def test_manual_scale_under_autoscaling_single_writer(local_cluster, examples_ns):
    """`kubectl scale dsv4ep` is rejected (CEL: replicas XOR builtin autoscaling); `kubectl scale deployment`
    is reverted by the operator at its next tick (it is the single writer of Deployment.spec.replicas)."""
    from kubernetes import client

    ns = examples_ns
    r = kubectl(local_cluster, "scale", "dsv4ep", "chat", "-n", ns, "--replicas=2", check=False)
    assert r.returncode != 0 and "autoscaling" in r.stderr, r.stderr
    with local_cluster.api_client() as api:
        apps, co = client.AppsV1Api(api), client.CustomObjectsApi(api)
        want = get_ep(co, ns, "chat")["status"]["desiredReplicas"]
        kubectl(local_cluster, "scale", "deployment", "chat", "-n", ns, f"--replicas={want + 1}")
        t0 = time.time()
        wait_for("the operator to restore its replicas", lambda: apps.read_namespaced_deployment("chat", ns)
                 .spec.replicas == want, timeout=10 * TICK_S, interval=0.2)
        print(f"\n[single-writer] manual Deployment scale reverted in {time.time() - t0:.1f} s")

        def reverted_event() -> bool:
            events = json.loads(kubectl(local_cluster, "get", "events", "-n", ns, "-o", "json").stdout)["items"]
            return any(e["reason"] == "ReplicasReverted" and e["involvedObject"]["name"] == "chat" for e in events)

        wait_for("the ReplicasReverted Warning event (docs/operator.md)", reverted_event, timeout=30, interval=1)
        wait_for("the extra pod gone", lambda: len(pods(client.CoreV1Api(api), ns, "dsv4.io/endpoint=chat")) == want,
                 timeout=120, interval=0.5)


# ---- 5. Prometheus: every dashboard query and alert ---------------------------------------------------------
def test_prometheus_scrapes_pods_and_operator_and_every_query_evaluates(local_cluster, examples_ns, operator,
                                                                        tmp_path):
    from dsv4.operator.observability import alerts, dashboards, validate
    from dsv4.operator.observability.promql import metric_names
    from kubernetes import client

    ns = examples_ns
    prom = Prometheus.for_cluster(local_cluster, tmp_path / "prometheus",
                                  operator_target=f"127.0.0.1:{operator.metrics_port}",
                                  rules_text=alerts.rules_file_text()).start()
    try:
        with local_cluster.api_client() as api:
            disc = client.DiscoveryV1Api(api)
            n_pods = len(ready_ips(disc, ns, "chat")) + len(ready_ips(disc, ns, "agents"))
            wait_for("every pod and the operator scraped", lambda: sum(
                1 for t in prom.targets() if t["health"] == "up" and t["labels"].get("namespace") in (ns, None))
                >= n_pods + 1, timeout=60, interval=1)
            load = Load(disc, ns, "chat", "deepseek-v4-tiny", max_tokens=32).start(2)
            load2 = Load(disc, ns, "agents", "agents", max_tokens=32).start(1)
            time.sleep(12)
            calls = load.finish() + load2.finish()
        assert calls and all(c.ok for c in calls)
        time.sleep(3)
        labels = prom.query('up{job="dsv4-runtime"}')
        assert {lb["metric"]["dsv4_endpoint"] for lb in labels} == {"chat", "agents"}
        assert all(lb["metric"]["namespace"] == ns and lb["metric"]["pod"] for lb in labels)

        def present(metric: str) -> bool:
            return bool(prom.query(f'count({{__name__="{metric}"}})'))

        exprs = validate.all_expressions()
        empty, failed = [], []
        for where, expr in exprs:
            q = (expr.replace("$__rate_interval", "30s").replace("$namespace", ns).replace("$endpoint", ".*")
                 .replace("$pod", ".*").replace("$job", ".+").replace("$instance", ".+"))
            try:
                result = prom.query(q)
            except Exception as e:  # noqa: BLE001 - collected and reported together
                failed.append(f"{where}: {e}")
                continue
            if not result:
                missing = sorted(m for m in metric_names(expr) if not present(m))
                empty.append((where, missing))
        assert not failed, failed
        # an empty answer is only acceptable when a series it reads does not exist yet (e.g. no reconcile error
        # happened, so dsv4_operator_reconcile_errors_total has no child); anything else is a broken query
        unexplained = [w for w, missing in empty if not missing and not w.startswith("alert ")]
        assert not unexplained, unexplained
        with_data = len(exprs) - len(empty)
        # the alert rules as Prometheus' rule engine runs them
        wait_for("the alert rules evaluated", lambda: all(
            r.get("lastEvaluation", "").startswith("20") for g in prom.rules() for r in g["rules"]), timeout=30)
        bad_rules = [(r["name"], r.get("lastError")) for g in prom.rules() for r in g["rules"] if r["health"] != "ok"]
        assert not bad_rules, bad_rules
        n_rules = sum(len(g["rules"]) for g in prom.rules())
        assert n_rules == len(alerts.rule_groups()["groups"][0]["rules"])
        # the threshold-driven alerts return data once their threshold is below the live value (healthy pods
        # never fire the shipped ones): the same expressions with trip-wire thresholds
        trip = alerts.Thresholds(cache_pool_occupancy=0, queue_depth=-1, ttft_p99_seconds=-1, preemptions_per_second=-1)
        tripped = {r["alert"]: len(prom.query(r["expr"])) for r in alerts.rule_groups(trip)["groups"][0]["rules"]}
        for name in ("DSV4CachePoolSaturation", "DSV4QueueBuildup", "DSV4TTFTP99OverSLO", "DSV4HighPreemptionRate"):
            assert tripped[name] > 0, f"{name} with a trip-wire threshold returned no data: {tripped}"
        n_dash = len(dashboards.DASHBOARDS)
        print(f"\n[prometheus] {len(exprs)} expressions from {n_dash} dashboards + alerts: {with_data} returned data, "
              f"{len(empty)} empty ({empty}); {n_rules} alert rules evaluated by Prometheus with health ok; "
              f"series per alert at trip-wire thresholds: {tripped}")
    finally:
        prom.stop()


# ---- 6. profile edit -> rolling update; deleted child -> recreated -----------------------------------------
def test_profile_edit_rolls_out_and_a_deleted_deployment_comes_back(local_cluster, examples_ns):
    from kubernetes import client

    ns = examples_ns
    with local_cluster.api_client() as api:
        co, apps, core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)
        old_pods = {p["metadata"]["name"] for p in pods(core, ns, "dsv4.io/endpoint=agents")}
        old_hash = apps.read_namespaced_deployment("agents", ns).spec.template.metadata.annotations
        kubectl(local_cluster, "patch", "dsv4ep", "agents", "-n", ns, "--type=merge",
                "-p", json.dumps({"spec": {"profile": {"name": "coding-agent"}}}))
        wait_for("the ConfigMap with the new profile", lambda: "profile: coding-agent" in
                 core.read_namespaced_config_map("agents-config", ns).data["config.yaml"], timeout=30)
        dep = apps.read_namespaced_deployment("agents", ns)
        assert dep.spec.template.metadata.annotations != old_hash, "the config-hash annotation must change"

        def rolled() -> bool:
            ps = pods(core, ns, "dsv4.io/endpoint=agents")
            return bool(ps) and all(p["metadata"]["name"] not in old_pods and ready(p) for p in ps)

        wait_for("the rollout: new pod Ready, old pod gone", rolled, timeout=240, interval=1)
        ep = get_ep(co, ns, "agents")
        assert ep["spec"]["profile"]["name"] == "coding-agent"
        wait_for("status.observedGeneration", lambda: get_ep(co, ns, "agents")["status"]["observedGeneration"]
                 == ep["metadata"]["generation"], timeout=30)

        # a child Deployment deleted by hand comes back (the timer re-applies the children)
        uid = apps.read_namespaced_deployment("agents", ns).metadata.uid
        t0 = time.time()
        apps.delete_namespaced_deployment("agents", ns)
        dep = wait_for("the Deployment recreated", lambda: (d := apps.read_namespaced_deployment("agents", ns))
                       and d.metadata.uid != uid and d, timeout=10 * TICK_S, interval=0.2)
        print(f"\n[drift] deleted Deployment recreated in {time.time() - t0:.1f} s")
        assert dep.metadata.owner_references[0].kind == "DSV4Endpoint"
        wait_for("its pod Ready again", lambda: any(ready(p) for p in pods(core, ns, "dsv4.io/endpoint=agents")),
                 timeout=240, interval=1)


# ---- 7. invalid objects ------------------------------------------------------------------------------------
def test_invalid_objects_are_rejected_or_reported_never_crash(local_cluster, operator, namespace):
    from kubernetes import client

    bad = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DSV4Endpoint", "metadata": {"name": "bad"},
           "spec": {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"}, "replicas": 2,
                    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 1}}}
    r = kubectl(local_cluster, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(bad), check=False)
    assert r.returncode != 0
    assert "autoscaling.minReplicas must be <= autoscaling.maxReplicas" in r.stderr, r.stderr
    assert "replicas" in r.stderr and "autoscaling" in r.stderr
    # schema-valid but infeasible: PlanValid=False with the planner's reason, a Warning event, no children
    infeasible = yaml.safe_load((REPO / "examples" / "invalid-pro-on-h100.yaml").read_text())
    infeasible["metadata"].pop("namespace", None)
    kubectl(local_cluster, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(infeasible))
    with local_cluster.api_client() as api:
        co, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
        cond = wait_for("PlanValid=False", lambda: (c := condition(get_ep(co, namespace, "too-big"), "PlanValid"))
                        .get("status") == "False" and c, timeout=30, interval=0.5)
        assert cond["reason"] == "WeightsDoNotFit" and "H100" in cond["message"]
        events = json.loads(kubectl(local_cluster, "get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        assert any(e["type"] == "Warning" and e["reason"] == "WeightsDoNotFit" for e in events)
        time.sleep(2 * TICK_S)
        assert not apps.list_namespaced_deployment(namespace).items
    assert operator.alive()


# ---- 8. operator SIGKILLed mid-reconcile ------------------------------------------------------------------
def test_operator_killed_mid_reconcile_converges_without_duplicates(local_cluster, operator, namespace):
    from kubernetes import client

    names = [f"ep{i}" for i in range(3)]
    with local_cluster.api_client() as api:
        apps = client.AppsV1Api(api)
        kubectl(local_cluster, "apply", "-n", namespace, "-f", "-",
                stdin="\n---\n".join(json.dumps(cheap_endpoint(n)) for n in names))
        core = client.CoreV1Api(api)
        # the ConfigMap is the first child a reconcile applies: kill at its first sight, mid-reconcile
        wait_for("the first child", lambda: [c for c in core.list_namespaced_config_map(namespace).items
                                             if c.metadata.owner_references], timeout=30, interval=0.02)
        operator.kill()
        at_kill = {"ConfigMap": sum(1 for c in core.list_namespaced_config_map(namespace).items
                                    if c.metadata.owner_references),
                   "Deployment": len(apps.list_namespaced_deployment(namespace).items),
                   "Service": len(core.list_namespaced_service(namespace).items)}
        assert not operator.alive()
        operator.start()
        co = client.CustomObjectsApi(api)
        uids = {n: get_ep(co, namespace, n)["metadata"]["uid"] for n in names}
        want = {"Deployment": 1, "ConfigMap": 1, "Service": 1, "PodDisruptionBudget": 1, "ReplicaSet": 1}
        wait_for("every endpoint's children", lambda: all(children_of(api, namespace, n, uids[n]) == want
                                                          for n in names), timeout=60, interval=0.5)
        time.sleep(2 * TICK_S)  # a few timer ticks later: still exactly one of each
        counts = {n: children_of(api, namespace, n, uids[n]) for n in names}
        assert all(c == want for c in counts.values()), counts
        assert len(apps.list_namespaced_deployment(namespace).items) == len(names)
        assert len(core.list_namespaced_pod(namespace).items) == 2 * len(names)
        for n in names:
            st = get_ep(co, namespace, n)["status"]
            assert st["plan"]["maxModelLen"] > 0 and st["plan"]["parallelism"] == "DP2+EP"  # H200 status accepted
    print(f"\n[kill] operator SIGKILLed with {at_kill} of {len(names)} endpoints' children created; restart converged, "
          f"no duplicates: {counts}")


# ---- 9. API server away for 30 s ---------------------------------------------------------------------------
def test_operator_survives_a_30s_apiserver_outage(local_cluster, operator, namespace):
    from kubernetes import client

    kubectl(local_cluster, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(cheap_endpoint("before")))
    with local_cluster.api_client() as api:
        apps = client.AppsV1Api(api)
        wait_for("children before the outage", lambda: apps.read_namespaced_deployment("before", namespace),
                 timeout=30)
    cluster_mod.stop_apiserver(E2E_CLUSTER)  # returns once the process has exited: unreachable from here on
    t0 = time.monotonic()
    try:
        time.sleep(max(0.0, 30 - (time.monotonic() - t0)))
        assert local_cluster.get("/readyz")[0] == 0, "the API server should be unreachable"
    finally:
        cluster_mod.start_apiserver(E2E_CLUSTER)
    outage = time.monotonic() - t0  # process gone -> /readyz 200 again
    assert operator.alive(), f"the operator died during the outage:\n{operator.tail()}"
    t1 = time.monotonic()
    kubectl(local_cluster, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(cheap_endpoint("after")))
    kubectl(local_cluster, "patch", "dsv4ep", "before", "-n", namespace, "--type=merge", "-p",
            json.dumps({"spec": {"replicas": 1}}))
    with local_cluster.api_client() as api:
        apps = client.AppsV1Api(api)
        wait_for("a new endpoint reconciled after the outage", lambda: apps.read_namespaced_deployment(
            "after", namespace), timeout=120, interval=0.5)
        wait_for("an edit reconciled after the outage", lambda: apps.read_namespaced_deployment(
            "before", namespace).spec.replicas == 1, timeout=120, interval=0.5)
    print(f"\n[outage] API server down {outage:.0f} s; operator converged {time.monotonic() - t1:.1f} s after it "
          f"came back")


# ---- 10. delete -> garbage collection ----------------------------------------------------------------------
def test_deleting_the_endpoints_collects_children_and_processes(local_cluster, examples_ns, operator):
    from kubernetes import client

    ns = examples_ns
    with local_cluster.api_client() as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        # the outage test ran just before: the example pods must still be (or be again) Ready
        t_ready = time.monotonic()
        wait_for("example pods Ready", lambda: all(any(ready(p) for p in pods(core, ns, f"dsv4.io/endpoint={n}"))
                                                   for n in ("chat", "agents")), timeout=120, interval=1)
        t0 = time.monotonic()
        pids = [pid_of(p) for n in ("chat", "agents") for p in pods(core, ns, f"dsv4.io/endpoint={n}")]
        kubectl(local_cluster, "delete", "-n", ns, "-f", str(OVERLAYS), "--wait=true", "--timeout=120s")
        t1 = time.monotonic()
        wait_for("children collected", lambda: not apps.list_namespaced_deployment(ns).items
                 and not [c for c in core.list_namespaced_config_map(ns).items if c.metadata.owner_references]
                 and not pods(core, ns, "dsv4.io/endpoint"), timeout=120, interval=0.5)
        t2 = time.monotonic()
        wait_for("the runtime processes gone", lambda: not any(pid_running(p) for p in pids), timeout=30)
    print(f"\n[gc] example pods Ready again after {t0 - t_ready:.1f} s; endpoints deleted in {t1 - t0:.1f} s, "
          f"children collected {t2 - t1:.1f} s later (pods: 10 s preStop, then drain), processes gone "
          f"{time.monotonic() - t2:.1f} s after that")
    assert operator.alive()
