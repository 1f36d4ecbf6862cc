"""The operator against the real API server: the generated CRD is accepted, a DSV4Endpoint gets its
children, the pod runner runs the real `dsv4 serve` at the pod IP, an OpenAI-style request returns
tokens, and deleting the endpoint garbage-collects everything (the process included).

This runs the operator with the cluster-admin kubeconfig; the Helm-installed, ServiceAccount-token
variant (RBAC proof) belongs to the scenario tests."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from dsv4.e2e import procs

from .test_e2e_cluster import pid_of, pid_running, pods, ready, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = Path(os.environ.get("DSV4_E2E_CRD_FILE") or REPO / "crds" / "serving.dsv4.dev_dsv4endpoints.yaml")
SMP = "application/strategic-merge-patch+json"


class CRDRejected(AssertionError):
    """The API server refused the generated CRD (a real bug: it was once rejected for a CEL rule failing on
    a `default: {}`)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def crd_installed(local_cluster):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    if not CRD_FILE.exists():
        pytest.skip(f"{CRD_FILE} not generated yet")
    crd = yaml.safe_load(CRD_FILE.read_text())
    with local_cluster.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:
                raise CRDRejected(f"kube-apiserver rejected {CRD_FILE}: "
                                  f"{json.loads(e.body).get('message', e.body)}") from e

        def established() -> bool:
            resp = ext.read_custom_resource_definition(crd["metadata"]["name"], _preload_content=False)
            conds = json.loads(resp.data).get("status", {}).get("conditions", [])
            return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

        wait_for("the CRD Established", established, timeout=30)
    return crd


@pytest.fixture(scope="module")
def operator_process(local_cluster, crd_installed, tmp_path_factory):
    """`kopf run -m dsv4.operator.handlers -A` against the cluster; stopped by PID afterwards."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    env = {**local_cluster.env(), "DSV4_OPERATOR_TIMER_INTERVAL": "5",
           "DSV4_OPERATOR_METRICS_PORT": str(_free_port())}
    _, rec = procs.spawn("operator", [sys.executable, "-m", "kopf", "run", "-m", "dsv4.operator.handlers", "-A",
                                      "--standalone"], log, env=env, cwd=REPO)
    try:
        yield rec
    finally:
        procs.stop(rec, grace_s=10)
        assert not procs.is_alive(rec)


def test_endpoint_children_serve_and_are_collected(local_cluster, namespace, operator_process):
    from kubernetes import client

    endpoint = {
        "apiVersion": "serving.dsv4.dev/v1alpha1", "kind": "DSV4Endpoint",
        "metadata": {"name": "chat", "namespace": namespace},
        # cpu accelerator: the tiny model on this host's CPU (an H200 plan would size a 124 GiB cache)
        "spec": {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"}, "accelerator": {"type": "cpu"}},
    }
    with local_cluster.api_client() as api:
        core, apps, co = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
        co.create_namespaced_custom_object("serving.dsv4.dev", "v1alpha1", namespace, "dsv4endpoints", endpoint)

        dep = wait_for("the Deployment", lambda: apps.read_namespaced_deployment("chat", namespace), timeout=60)
        cm = wait_for("the ConfigMap", lambda: core.read_namespaced_config_map("chat-config", namespace))
        assert "config.yaml" in cm.data and "profile: short-chat" in cm.data["config.yaml"]
        wait_for("the Service", lambda: core.read_namespaced_service("chat", namespace))
        assert dep.metadata.owner_references[0].kind == "DSV4Endpoint"

        sel = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
        pod = wait_for("the engine pod Ready", lambda: next((p for p in pods(core, namespace, sel) if ready(p)), None),
                       timeout=180, interval=1)
        ip, pid = pod["status"]["podIP"], pid_of(pod)
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        req = urllib.request.Request(f"http://{ip}:8000/v1/chat/completions", data=body.encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        msg = out["choices"][0]["message"]  # thinking mode by default: a 4-token answer is all reasoning
        assert out["usage"]["completion_tokens"] >= 1 and (msg.get("content") or msg.get("reasoning_content"))

        def status_ready() -> bool:
            ep = co.get_namespaced_custom_object("serving.dsv4.dev", "v1alpha1", namespace, "dsv4endpoints", "chat")
            return (ep.get("status") or {}).get("readyReplicas") == 1

        wait_for("the endpoint's status to report the ready replica", status_ready, timeout=60, interval=1)

        co.delete_namespaced_custom_object("serving.dsv4.dev", "v1alpha1", namespace, "dsv4endpoints", "chat")
        wait_for("the children garbage-collected", lambda: not apps.list_namespaced_deployment(namespace).items
                 and not pods(core, namespace, sel), timeout=120, interval=1)
        wait_for("the runtime process gone", lambda: not pid_running(pid), timeout=10)
    assert procs.is_alive(operator_process), f"the operator died; see {operator_process.log}"
    assert os.path.exists(operator_process.log)


def test_a_data_parallel_endpoint_serves_the_openai_client(local_cluster, namespace, operator_process):
    """overrides.layout dp-ep, dataParallelSize 2: one pod running `dsv4 serve --dp 2 --ep` (two rank processes,
    each with its own KV cache) behind one front end; the openai client gets answers and both ranks serve."""
    import httpx
    from kubernetes import client
    from openai import OpenAI

    endpoint = {
        "apiVersion": "serving.dsv4.dev/v1alpha1", "kind": "DSV4Endpoint",
        "metadata": {"name": "chat-dp", "namespace": namespace},
        "spec": {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"}, "accelerator": {"type": "cpu"},
                 "overrides": {"layout": "dp-ep", "dataParallelSize": 2}},
    }
    with local_cluster.api_client() as api:
        core, co = client.CoreV1Api(api), client.CustomObjectsApi(api)
        co.create_namespaced_custom_object("serving.dsv4.dev", "v1alpha1", namespace, "dsv4endpoints", endpoint)
        cm = wait_for("the ConfigMap", lambda: core.read_namespaced_config_map("chat-dp-config", namespace),
                      timeout=60)
        conf = yaml.safe_load(cm.data["config.yaml"])
        assert (conf["dp"], conf["ep"], conf.get("tp", 1)) == (2, True, 1), conf
        pod = wait_for("the DP pod Ready", lambda: next((p for p in pods(core, namespace, "dsv4.io/endpoint=chat-dp")
                                                         if ready(p)), None), timeout=240, interval=1)
        ip = pod["status"]["podIP"]
        oc = OpenAI(base_url=f"http://{ip}:8000/v1", api_key="unused", max_retries=0, timeout=120)
        for i in range(4):  # the idle replica spreads them over both ranks
            r = oc.completions.create(model="chat-dp", prompt=f"request {i}: hello", max_tokens=4, temperature=0)
            assert r.usage.completion_tokens == 4
        chat = oc.chat.completions.create(model="chat-dp", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4)
        assert chat.usage.completion_tokens >= 1
        metrics = httpx.get(f"http://{ip}:8000/metrics", timeout=10).text
        ranks = {line.split('rank="')[1].split('"')[0] for line in metrics.splitlines()
                 if line.startswith("dsv4_rank_dispatched_requests_total{") and not line.endswith(" 0.0")}
        assert ranks == {"0", "1"}, metrics[-2000:]
        ep = co.get_namespaced_custom_object("serving.dsv4.dev", "v1alpha1", namespace, "dsv4endpoints", "chat-dp")
        assert ep["status"]["plan"]["parallelism"] == "DP2+EP"
        co.delete_namespaced_custom_object("serving.dsv4.dev", "v1alpha1", namespace, "dsv4endpoints", "chat-dp")
    assert procs.is_alive(operator_process), f"the operator died; see {operator_process.log}"


# ---- issue 23: conditions that name the cause, /scale in every mode, printer columns ----------------------
GROUP, VERSION, PLURAL = "serving.dsv4.dev", "v1alpha1", "dsv4endpoints"
# An accelerator no node has: the pods stay Pending (no runtime process), the planner is instant.
ABSENT_GPU = {"type": "custom", "memoryGiB": 4, "gpusPerNode": 1, "resourceName": "dsv4.dev/absent-gpu"}


def _kubectl(cluster, *args: str, check: bool = True):
    from dsv4.e2e import opproc

    return opproc.kubectl(list(args), cluster.kubeconfig, check=check)


def _create(co, namespace: str, name: str, spec: dict) -> None:
    co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DSV4Endpoint", "metadata": {"name": name}, "spec": spec})


def _ep(co, namespace: str, name: str) -> dict:
    return co.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _condition(ep: dict, ctype: str) -> dict:
    return next((c for c in (ep.get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def test_crash_looping_endpoint_is_degraded_with_the_last_log_line(local_cluster, namespace, operator_process,
                                                                    tmp_path):
    """A runtime that exits at start (a custom model whose weights folder is empty) shows Degraded=True,
    reason CrashLoopBackOff, with the container's exit code and last log line, within 60 s."""
    from dsv4.runtime.config import tiny
    from kubernetes import client

    weights = tmp_path / "empty-weights"
    weights.mkdir()
    spec = {"model": {"variant": "custom", "config": tiny().to_dict(), "weights": {"hostPath": {"path": str(weights)}}},
            "profile": {"name": "short-chat"}, "accelerator": {"type": "cpu"}}
    with local_cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        t0 = time.monotonic()
        _create(co, namespace, "crashy", spec)
        deg = wait_for("Degraded=True CrashLoopBackOff", lambda: (c := _condition(_ep(co, namespace, "crashy"),
                                                                                  "Degraded")).get("reason")
                       == "CrashLoopBackOff" and c, timeout=60, interval=1)
        took = time.monotonic() - t0
        print(f"\n[crash-loop] Degraded=CrashLoopBackOff {took:.1f} s after create: {deg['message']}")
        assert deg["status"] == "True" and "container dsv4" in deg["message"] and "last exit code" in deg["message"]
        assert "last log line: " in deg["message"] and deg["message"].split("last log line: ")[1].strip()
        ready = _condition(_ep(co, namespace, "crashy"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "CrashLoopBackOff")
        events = json.loads(_kubectl(local_cluster, "get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        ours = [e for e in events
                if e["reason"] == "CrashLoopBackOff" and e["involvedObject"]["kind"] == "DSV4Endpoint"]
        assert ours and ours[0]["type"] == "Warning" and ours[0]["source"]["component"] == "dsv4-operator"
        table = _kubectl(local_cluster, "get", "dsv4ep", "crashy", "-n", namespace).stdout
        assert "CrashLoopBackOff" in table, table
        co.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "crashy")


def test_unschedulable_endpoint_names_the_schedulers_message(local_cluster, namespace, operator_process):
    from kubernetes import client

    with local_cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        _create(co, namespace, "nogpu", {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                                         "accelerator": ABSENT_GPU, "replicas": 1})
        deg = wait_for("Degraded=True Unschedulable", lambda: (c := _condition(_ep(co, namespace, "nogpu"),
                                                                               "Degraded")).get("reason")
                       == "Unschedulable" and c, timeout=60, interval=1)
        print(f"\n[unschedulable] {deg['message']}")
        assert "nodes are available" in deg["message"] and "dsv4.dev/absent-gpu" in deg["message"]


def _scale(cluster, namespace: str, name: str) -> dict:
    return json.loads(_kubectl(cluster, "get", "dsv4ep", name, "-n", namespace, "--subresource=scale",
                               "-o", "json").stdout)


@pytest.mark.parametrize("mode", ["fixed", "builtin", "keda"])
def test_scale_subresource_answers_in_every_mode(local_cluster, namespace, operator_process, mode):
    """GET .../scale answers (spec.replicas is kept present); PUT scales in fixed mode and is refused by the
    CRD's rule under autoscaling, naming the way out."""
    from kubernetes import client

    spec: dict = {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"}, "accelerator": ABSENT_GPU}
    if mode != "fixed":
        spec["autoscaling"] = {"enabled": True, "mode": mode, "minReplicas": 1, "maxReplicas": 3}
    name = f"scale-{mode}"
    with local_cluster.api_client() as api:
        co, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
        _create(co, namespace, name, spec)
        wait_for("spec.replicas written by the operator", lambda: "replicas" in _ep(co, namespace, name)["spec"],
                 timeout=60, interval=0.5)
        scale = _scale(local_cluster, namespace, name)
        ep = _ep(co, namespace, name)
        assert scale["spec"]["replicas"] == ep["spec"]["replicas"] == ep["status"]["desiredReplicas"]
        assert scale["status"]["selector"] == ep["status"]["selector"]
        want = scale["spec"]["replicas"] + 1
        r = _kubectl(local_cluster, "scale", "dsv4ep", name, "-n", namespace, f"--replicas={want}", check=False)
        if mode == "fixed":
            assert r.returncode == 0, r.stderr
            wait_for("the Deployment scaled through /scale", lambda: apps.read_namespaced_deployment(
                name, namespace).spec.replicas == want, timeout=30, interval=0.5)
            assert _scale(local_cluster, namespace, name)["spec"]["replicas"] == want
        else:
            assert r.returncode != 0 and "the autoscaler owns replicas" in r.stderr, r.stderr
            assert _scale(local_cluster, namespace, name)["spec"]["replicas"] == want - 1


def test_an_hpa_reads_the_endpoints_scale(local_cluster, namespace, operator_process):
    from kubernetes import client

    with local_cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        _create(co, namespace, "hpa-target", {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                                              "accelerator": ABSENT_GPU, "replicas": 1})
        client.AutoscalingV2Api(api).create_namespaced_horizontal_pod_autoscaler(namespace, {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "hpa-target"},
            "spec": {"scaleTargetRef": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DSV4Endpoint",
                                        "name": "hpa-target"},
                     "minReplicas": 1, "maxReplicas": 3,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": 80}}}]}})

        def able_to_scale() -> dict | None:
            hpa = client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler("hpa-target", namespace)
            conds = {c.type: c for c in (hpa.status.conditions or [])}
            c = conds.get("AbleToScale")
            return c if c and c.reason in ("SucceededGetScale", "FailedGetScale", "ReadyForNewScale",
                                            "SucceededRescale") else None

        c = wait_for("the HPA's AbleToScale condition", able_to_scale, timeout=90, interval=2)
        print(f"\n[hpa] AbleToScale={c.status} {c.reason}: {c.message}")
        assert c.status == "True" and c.reason != "FailedGetScale", c.message


def test_printer_columns(local_cluster, namespace, operator_process):
    from kubernetes import client

    with local_cluster.api_client() as api:
        co = client.CustomObjectsApi(api)
        _create(co, namespace, "cols", {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                                        "accelerator": ABSENT_GPU, "replicas": 1})
        wait_for("status", lambda: (_ep(co, namespace, "cols").get("status") or {}).get("replicaCounts"),
                 timeout=60, interval=0.5)
    table = _kubectl(local_cluster, "get", "dsv4ep", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "URL", "REPLICAS", "TP", "MAXCACHE", "REASON", "AGE"], table
    row = table[1].split()
    assert row[:5] == ["cols", "False", f"http://cols.{namespace}.svc:8000/v1", "0/1", "TP1"], table
    wide = _kubectl(local_cluster, "get", "dsv4ep", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-4:] == ["AGE", "MODEL", "PROFILE", "PLAN"] and "TP1, " in wide[1], wide
