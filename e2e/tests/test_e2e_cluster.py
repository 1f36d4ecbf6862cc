"""The local control plane end to end: kwok GPU nodes, a Deployment whose pod is a real process at a
real pod IP, readiness mirrored from its probe, deletion kills it, a dying process fails its pod, and
`down` leaves nothing behind."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from dsv4.e2e import cluster as cluster_mod
from dsv4.e2e import podnet, procs

pytestmark = pytest.mark.e2e

SMP = "application/strategic-merge-patch+json"


def wait_for(what: str, fn, timeout: float = 60.0, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


def pods(core, ns: str, selector: str) -> list[dict]:
    resp = core.list_namespaced_pod(ns, label_selector=selector, _preload_content=False)
    return json.loads(resp.data)["items"]


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def pid_of(pod: dict) -> int:
    cid = pod["status"]["containerStatuses"][0]["containerID"]
    assert cid.startswith("dsv4://"), cid
    return int(cid.removeprefix("dsv4://"))


def pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def web_objects(name: str, probe_path: str = "/index.html", replicas: int = 1) -> tuple[dict, dict, dict]:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-www"},
          "data": {"index.html": f"hello from {name}\n"}}
    deploy = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "web", "image": "python:3.11",
                        "command": ["python", "-m", "http.server", "8080", "--directory", "/srv/www"],
                        "env": [{"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "readinessProbe": {"httpGet": {"path": probe_path, "port": "http"}, "periodSeconds": 1},
                        "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        "volumeMounts": [{"name": "www", "mountPath": "/srv/www"}],
                    }],
                    "volumes": [{"name": "www", "configMap": {"name": f"{name}-www"}}],
                },
            },
        },
    }
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}}
    return cm, deploy, svc


def test_kwok_nodes_advertise_gpus(local_cluster):
    from kubernetes import client

    with local_cluster.api_client() as api:
        resp = client.CoreV1Api(api).list_node(_preload_content=False)
    nodes = json.loads(resp.data)["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == sorted(local_cluster.nodes)
    assert len(nodes) == 2
    for n in nodes:
        assert n["status"]["capacity"]["nvidia.com/gpu"] == "8"
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert n["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
        assert n["status"]["nodeInfo"]["kubeletVersion"].startswith("kwok-")
    code, body = local_cluster.get("/version")
    assert code == 200 and json.loads(body)["gitVersion"] == local_cluster.kubernetes_version


def test_deployment_pod_is_a_real_process_at_its_pod_ip(local_cluster, namespace):
    from kubernetes import client

    with local_cluster.api_client() as api:
        core, apps, disc = client.CoreV1Api(api), client.AppsV1Api(api), client.DiscoveryV1Api(api)
        cm, deploy, svc = web_objects("web")
        core.create_namespaced_config_map(namespace, cm)
        apps.create_namespaced_deployment(namespace, deploy)
        core.create_namespaced_service(namespace, svc)

        pod = wait_for("the web pod Ready", lambda: next((p for p in pods(core, namespace, "app=web") if ready(p)),
                                                         None), timeout=60)
        ip = pod["status"]["podIP"]
        node = pod["spec"]["nodeName"]
        assert node in local_cluster.nodes
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/16")
        assert not ipaddress.ip_address(ip).is_loopback

        # The pod really serves, at its pod IP, the file from its ConfigMap volume.
        with urllib.request.urlopen(f"http://{ip}:8080/index.html", timeout=5) as r:
            assert r.read().decode() == "hello from web\n"

        # It is a local process, in its own network namespace, with the pod's env.
        pid = pid_of(pod)
        assert pid_running(pid)
        assert "http.server" in open(f"/proc/{pid}/cmdline").read()
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        environ = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        assert environ["MY_POD_IP"] == ip

        # The EndpointSlice controller accepted the pod IP.
        def slice_ips() -> list[str]:
            resp = disc.list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=web",
                                                       _preload_content=False)
            return [a for s in json.loads(resp.data)["items"] for ep in s.get("endpoints") or []
                    if (ep.get("conditions") or {}).get("ready") for a in ep["addresses"]]

        assert wait_for("the pod IP in the EndpointSlice", lambda: ip in slice_ips(), timeout=30)

        # Deleting the Deployment deletes the pod and kills its process.
        apps.delete_namespaced_deployment("web", namespace, propagation_policy="Foreground")
        wait_for("the pod object gone", lambda: not pods(core, namespace, "app=web"), timeout=60)
        wait_for("the pod's process gone", lambda: not pid_running(pid), timeout=10)
        wait_for("the pod's network namespace gone",
                 lambda: not os.path.exists(f"{podnet.NETNS_DIR}/{podnet.names_for(pod['metadata']['uid'])[0]}"),
                 timeout=10)
        assert_dialling_fails_on_the_host(ip, 8080)


def assert_dialling_fails_on_the_host(ip: str, port: int) -> None:
    """A deleted pod's IP is unroutable here: the kernel refuses it at once, no packet takes the default route."""
    route = podnet.range_route()
    assert route is not None and route.unroutable, route
    lookup = podnet.route_get(ip)
    assert lookup.startswith("RTNETLINK answers: No route to host"), lookup  # not "via <default gateway>"
    with socket.socket() as s:
        s.settimeout(5)
        t0 = time.monotonic()
        assert s.connect_ex((ip, port)) in (errno.EHOSTUNREACH, errno.ENETUNREACH)
        assert time.monotonic() - t0 < 1.0  # failed locally, not after a timeout


def test_readiness_follows_the_probe(local_cluster, namespace):
    """A probe on a path the server answers 404 keeps the pod Running but not Ready."""
    from kubernetes import client

    with local_cluster.api_client() as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        cm, deploy, _ = web_objects("unready", probe_path="/missing.html")
        core.create_namespaced_config_map(namespace, cm)
        apps.create_namespaced_deployment(namespace, deploy)
        pod = wait_for("the pod Running", lambda: next(
            (p for p in pods(core, namespace, "app=unready") if p.get("status", {}).get("phase") == "Running"), None))
        def serves() -> bool:  # Running means started, not yet listening
            with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/index.html", timeout=5) as r:
                return r.status == 200

        wait_for("the unready pod to serve", serves, timeout=30)  # it serves, but its readiness probe fails
        time.sleep(3)  # three probe periods
        assert not any(ready(p) for p in pods(core, namespace, "app=unready"))
        # Fix the probe: the Deployment rolls out a pod that becomes Ready.
        apps.patch_namespaced_deployment("unready", namespace, {"spec": {"template": {"spec": {"containers": [
            {"name": "web", "readinessProbe": {"httpGet": {"path": "/index.html", "port": "http"},
                                               "periodSeconds": 1}}]}}}}, _content_type=SMP)
        wait_for("a Ready pod after fixing the probe",
                 lambda: any(ready(p) for p in pods(core, namespace, "app=unready")), timeout=60)


def test_process_exit_fails_the_pod(local_cluster, namespace):
    from kubernetes import client

    with local_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dies", "labels": {"app": "dies"}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "python:3.11",
                "command": ["python", "-c", "import time; time.sleep(1); raise SystemExit(3)"]}]}})
        pod = wait_for("the pod Failed", lambda: next(
            (p for p in pods(core, namespace, "app=dies") if p.get("status", {}).get("phase") == "Failed"), None))
        term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 3 and term["reason"] == "Error"


def test_container_without_command_is_rejected_clearly(local_cluster, namespace):
    from kubernetes import client

    with local_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nocmd", "labels": {"app": "nocmd"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox"}]}})
        pod = wait_for("the pod Failed", lambda: next(
            (p for p in pods(core, namespace, "app=nocmd") if p.get("status", {}).get("phase") == "Failed"), None))
        assert "has no command" in pod["status"]["message"]


def container_status(core, ns: str, selector: str) -> dict | None:
    found = [p for p in pods(core, ns, selector) if p.get("status", {}).get("containerStatuses")]
    return found[0]["status"]["containerStatuses"][0] if found else None


def test_a_crash_loop_restarts_with_backoff_and_shows_the_last_log_line(local_cluster, namespace):
    """restartPolicy Always: the same pod restarts its container (no new pod per crash), the status says
    CrashLoopBackOff with the last exit and the last log line, and `kubectl logs --previous` has that run."""
    from dsv4.e2e import opproc
    from kubernetes import client

    with local_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crashy", "labels": {"app": "crashy"}},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": "python:3.11",
                "command": ["python", "-c", "print('loading the model', flush=True); "
                                            "raise SystemExit('fatal: no such model tiny-x')"]}]}})
        t0 = time.monotonic()
        st = wait_for("CrashLoopBackOff", lambda: (s := container_status(core, namespace, "app=crashy")) and
                      (s["state"].get("waiting") or {}).get("reason") == "CrashLoopBackOff" and s, timeout=60)
        assert time.monotonic() - t0 < 60
        last = st["lastState"]["terminated"]
        assert last["exitCode"] == 1 and last["reason"] == "Error"
        assert last["message"] == "fatal: no such model tiny-x"
        assert "back-off 10s restarting failed container=main" in st["state"]["waiting"]["message"]
        pod = pods(core, namespace, "app=crashy")[0]
        assert pod["status"]["phase"] == "Running"  # a crash loop does not fail the pod
        st = wait_for("the first restart", lambda: (s := container_status(core, namespace, "app=crashy")) and
                      s["restartCount"] >= 1 and s, timeout=40)
        assert len(pods(core, namespace, "app=crashy")) == 1
        wait_for("the second back-off (20 s)", lambda: "back-off 20s" in (
            (container_status(core, namespace, "app=crashy")["state"].get("waiting") or {}).get("message", "")),
            timeout=30)
    out = opproc.kubectl(["logs", "-n", namespace, "crashy", "--previous"], local_cluster.kubeconfig).stdout
    assert out.splitlines() == ["loading the model", "fatal: no such model tiny-x"]


def test_liveness_probe_failure_restarts_the_container(local_cluster, namespace):
    from kubernetes import client

    with local_cluster.api_client() as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        cm, deploy, _ = web_objects("lively")
        c = deploy["spec"]["template"]["spec"]["containers"][0]
        c["livenessProbe"] = {"httpGet": {"path": "/missing.html", "port": "http"}, "periodSeconds": 1,
                              "failureThreshold": 2, "initialDelaySeconds": 1}
        core.create_namespaced_config_map(namespace, cm)
        apps.create_namespaced_deployment(namespace, deploy)
        first = wait_for("the pod Running", lambda: next(
            (p for p in pods(core, namespace, "app=lively") if p.get("status", {}).get("phase") == "Running"), None))
        st = wait_for("a restart after the liveness probe failed", lambda: (
            s := container_status(core, namespace, "app=lively")) and s["restartCount"] >= 1 and s, timeout=45)
        assert st["lastState"]["terminated"]["exitCode"] in (137, 143)
        assert [p["metadata"]["uid"] for p in pods(core, namespace, "app=lively")] == [first["metadata"]["uid"]]


def test_kubectl_logs_and_follow_reach_the_pod_runner(local_cluster, namespace):
    """kube-apiserver dials the node's InternalIP (127.0.0.1) at its kubelet port: the pod runner answers."""
    from dsv4.e2e import opproc, tools
    from kubernetes import client

    with local_cluster.api_client() as api:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        node = core.read_node(local_cluster.nodes[0])
        assert node.status.daemon_endpoints.kubelet_endpoint.port == local_cluster.ports["kubelet"]
        cm, deploy, _ = web_objects("chatty")
        core.create_namespaced_config_map(namespace, cm)
        apps.create_namespaced_deployment(namespace, deploy)
        wait_for("a Ready pod", lambda: any(ready(p) for p in pods(core, namespace, "app=chatty")), timeout=60)
    # http.server logs each readiness probe request on stderr
    out = wait_for("probe requests in `kubectl logs deploy/chatty`", lambda: (o := opproc.kubectl(
        ["logs", "-n", namespace, "deploy/chatty"], local_cluster.kubeconfig).stdout) and "GET /index.html" in o and o)
    assert "Serving HTTP on" in out
    kubectl = tools.ensure_kubectl_helm().kubectl
    follow = subprocess.Popen([str(kubectl), f"--kubeconfig={local_cluster.kubeconfig}", "logs", "-f", "-n", namespace,
                               "deploy/chatty", "--tail=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = follow.stdout.readline()  # a probe request made after we started following
        assert "GET /index.html" in line, (line, follow.poll())
    finally:
        follow.kill()
        follow.wait(5)


@pytest.mark.slow
def test_down_leaves_no_process_behind(tmp_path):
    """A second, one-node cluster: a running pod, then `down`; every recorded PID and the pod are gone."""
    from kubernetes import client

    if why := podnet.available():
        pytest.skip(why)
    name = "e2e-down"
    c = cluster_mod.up(name, nodes=cluster_mod.default_nodes(1, name=name))
    try:
        with c.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_namespaced_pod("default", {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "labels": {"app": "sleeper"}},
                "spec": {"containers": [{"name": "main", "image": "python:3.11",
                                         "command": [sys.executable, "-c", "import time; time.sleep(600)"]}]}})
            try:
                pod = wait_for("the sleeper Running", lambda: next(
                    (p for p in pods(core, "default", "app=sleeper") if ready(p)), None), timeout=120)
            except AssertionError as e:  # say why: the pod's status and what the pod runner and scheduler logged
                seen = [(p["status"].get("phase"), p["status"].get("reason"), p["status"].get("message"),
                         p["spec"].get("nodeName")) for p in pods(core, "default", "app=sleeper")]
                tails = {comp: (c.logs_dir / f"{comp}.log").read_text(errors="replace")[-1500:]
                         for comp in ("podrunner", "kube-scheduler") if (c.logs_dir / f"{comp}.log").exists()}
                raise AssertionError(f"{e}; pod {seen}; logs {tails}") from None
        pod_pid = pid_of(pod)
        assert pid_running(pod_pid)
        records = dict(c.procs)
        assert set(records) == set(cluster_mod.COMPONENTS)
    finally:
        stopped = cluster_mod.down(name)
    assert set(stopped) == set(cluster_mod.COMPONENTS)
    assert not [n for n, r in records.items() if procs.is_alive(r)]
    assert not pid_running(pod_pid)
    assert podnet.names_for(pod["metadata"]["uid"])[0] not in podnet.leftover_namespaces()
    assert not c.state_dir.exists()
    assert cluster_mod.status(name) == {"name": name, "exists": False, "healthy": False}
