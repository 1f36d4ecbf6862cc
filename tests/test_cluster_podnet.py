"""Pod-network safety without a control plane: the pod-range route (installed, owned, removed, beaten by a
pod's /32) in a scratch network namespace, a connect to an unknown pod IP failing on the host, and the
Prometheus pod discovery file following pod deletions."""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
import sys
import uuid

import pytest
from dsv4.e2e import cluster, podnet
from dsv4.e2e.pod_sd import PodTargets

needs_netns = pytest.mark.skipif(podnet.available() is not None, reason=str(podnet.available()))


@pytest.fixture
def scratch_netns():
    """An empty network namespace (loopback up), so the host's own routes are never touched."""
    name = f"dsv4t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _connect_errno(netns: str, ip: str, port: int = 8000) -> int:
    """errno of a TCP connect to IP:PORT made inside NETNS (0 when it connected)."""
    code = f"import socket; s = socket.socket(); s.settimeout(3); print(s.connect_ex(({ip!r}, {port})))"
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=10)
    return int(out.stdout.strip())


@needs_netns
def test_pod_range_route_is_installed_owned_and_removed(scratch_netns):
    ns = scratch_netns
    # A namespace with a default route: without the range route, a pod IP would go out through it.
    subprocess.run(["ip", "-n", ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "up0", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "up1", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "192.0.2.2/24", "dev", "up0"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1"], check=True)
    assert "via 192.0.2.1" in podnet.route_get("10.244.12.2", netns=ns)

    r = podnet.ensure_range_route(netns=ns)
    assert r.ours and r.type == "unreachable"
    assert podnet.ensure_range_route(netns=ns) == r  # idempotent
    assert podnet.route_get("10.244.12.2", netns=ns).startswith("RTNETLINK answers: No route to host")
    assert _connect_errno(ns, "10.244.12.2") == errno.EHOSTUNREACH

    # a pod's /32 still wins over the range route
    subprocess.run(["ip", "-n", ns, "link", "add", "pod0", "type", "veth", "peer", "name", "pod1"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "pod0", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "pod1", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", "10.244.12.3/32", "dev", "pod0"], check=True)
    assert podnet.route_get("10.244.12.3", netns=ns).startswith("10.244.12.3 dev pod0")

    assert podnet.remove_range_route(netns=ns)
    assert podnet.range_route(netns=ns) is None
    assert not podnet.remove_range_route(netns=ns)


@needs_netns
def test_a_hand_added_range_route_is_kept_and_a_forwarding_one_refused(scratch_netns):
    ns = scratch_netns
    subprocess.run(["ip", "-n", ns, "route", "add", "unreachable", podnet.POD_RANGE], check=True)
    r = podnet.ensure_range_route(netns=ns)
    assert not r.ours and r.unroutable
    assert not podnet.remove_range_route(netns=ns)
    assert podnet.range_route(netns=ns) == r

    subprocess.run(["ip", "-n", ns, "route", "del", podnet.POD_RANGE], check=True)
    subprocess.run(["ip", "-n", ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "up0", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "add", podnet.POD_RANGE, "dev", "up0"], check=True)
    with pytest.raises(podnet.NetError, match="pod traffic would leave this machine"):
        podnet.ensure_range_route(netns=ns)


def test_node_addresses_and_kubelet_dialing_stay_on_loopback(tmp_path):
    addresses = cluster.default_nodes(1)[0].manifest()["status"]["addresses"]
    assert {"type": "InternalIP", "address": "127.0.0.1"} in addresses
    api = cluster.apiserver_argv(tmp_path, cluster.certs.CertPaths(tmp_path), 2379, 6443)
    assert "--kubelet-preferred-address-types=InternalIP" in api
    assert "--node-ip=127.0.0.1" in cluster.kwok_argv(tmp_path, tmp_path / "s.yaml", tmp_path / "k", 1)
    for n in cluster.default_nodes(10, name="x"):
        assert ipaddress.ip_network(n.pod_cidr).subnet_of(ipaddress.ip_network(podnet.POD_RANGE))


def _pod(name: str, ip: str, uid: str) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid, "labels": {"dsv4.io/endpoint": "e"}},
            "spec": {"nodeName": "n", "containers": [{"name": "c", "ports": [{"name": "http",
                                                                              "containerPort": 8000}]}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def test_pod_discovery_file_drops_a_deleted_pod_at_once(tmp_path):
    out = tmp_path / "targets" / "pods.json"
    t = PodTargets(out)
    old, new = _pod("a", "10.244.12.2", "u1"), _pod("b", "10.244.12.3", "u2")
    t.replace_all([old])
    assert [e["targets"] for e in json.loads(out.read_text())] == [["10.244.12.2:8000"]]
    t.apply("ADDED", new)
    t.apply("DELETED", old)
    assert [e["targets"] for e in json.loads(out.read_text())] == [["10.244.12.3:8000"]]
    terminating = {**new, "metadata": {**new["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    t.apply("MODIFIED", terminating)
    assert json.loads(out.read_text()) == []
    t.replace_all([old])  # a relist replaces everything (pods deleted while the watch was down are gone)
    assert [e["targets"] for e in json.loads(out.read_text())] == [["10.244.12.2:8000"]]
