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
        assert out["usage"]["completion_tokens"] >= 1 and out["choices"][0]["message"]["content"]

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
