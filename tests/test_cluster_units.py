"""Fast tests of the local cluster's pure parts (no control plane needed): the build's generated
replace list and ldflags, node manifests, the pod runner's expansion/rewriting/IP allocation, PID
records, and the certificates (real openssl)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time

import pytest
import yaml
from dsv4.e2e import build, certs, cluster, procs
from dsv4.e2e.podrunner import env, paths, probes, runner, state, status

from tests.concurrency import errors_in_threads

UPSTREAM_GO_MOD = """module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

godebug (
\twinsymlink=0 // keep
\tx509negativeserial=1
)

require (
\tk8s.io/api v0.0.0
\tgithub.com/foo/bar v1.2.3
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/apimachinery => ./staging/src/k8s.io/apimachinery
\tk8s.io/cri-streaming => ./staging/src/k8s.io/cri-streaming
\tgithub.com/foo/bar => github.com/foo/bar v1.2.4
)
"""


def test_staging_replaces_are_generated_from_the_upstream_go_mod():
    assert build.staging_replaces(UPSTREAM_GO_MOD, "v0.36.3") == [
        "k8s.io/api=k8s.io/api@v0.36.3",
        "k8s.io/apimachinery=k8s.io/apimachinery@v0.36.3",
        "k8s.io/cri-streaming=k8s.io/cri-streaming@v0.36.3",
    ]
    assert build.godebug_lines(UPSTREAM_GO_MOD) == ["default=go1.26", "winsymlink=0", "x509negativeserial=1"]


def test_versions_and_ldflags():
    v = build.Versions(kubernetes="v1.37.2")
    assert v.staging == "v0.37.2"
    ld = build.version_ldflags("v1.36.3")
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.3" in ld
    assert "-X k8s.io/component-base/version.gitMinor=36" in ld
    with pytest.raises(ValueError, match="Versions.etcd='3.6'"):
        build.Versions(etcd="3.6")


def test_cache_layout_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    v = build.Versions()
    assert build.bin_dir(v) == tmp_path / "dsv4" / "k8s" / v.kubernetes / "bin"
    assert build.missing(v) == list(build.ALL_BINARIES)


def test_gpu_node_manifest():
    nodes = cluster.default_nodes(2)
    assert [n.pod_cidr for n in nodes] == ["10.244.1.0/24", "10.244.2.0/24"]
    other = cluster.default_nodes(2, name="e2e")
    assert not {n.pod_cidr for n in other} & {n.pod_cidr for n in nodes}
    m = nodes[0].manifest()
    assert m["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert m["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert m["metadata"]["annotations"][cluster.KWOK_ANNOTATION] == "fake"
    with pytest.raises(ValueError, match="NodeSpec.gpus=65"):
        cluster.NodeSpec(name="x", gpus=65)
    with pytest.raises(ValueError, match=r"nodes=11: must be in \[1, 10\]"):
        cluster.default_nodes(11)


def test_component_flags_bind_loopback_and_enable_rbac(tmp_path):
    pki = certs.CertPaths(tmp_path)
    api = cluster.apiserver_argv(tmp_path, pki, 2379, 6443)
    assert "--bind-address=127.0.0.1" in api and "--authorization-mode=RBAC" in api
    assert any(a.startswith("--service-account-signing-key-file=") for a in api)
    assert "--leader-elect=false" in cluster.scheduler_argv(tmp_path, tmp_path / "k", 1)
    kwok = cluster.kwok_argv(tmp_path, tmp_path / "s.yaml", tmp_path / "k", 1)
    assert "--manage-all-nodes=false" in kwok


def test_kubernetes_var_expansion():
    variables = {"A": "1", "B": "two"}
    assert env.expand("x$(A)-$(B)-$(C)-$$(A)", variables) == "x1-two-$(C)-$(A)"


def test_mount_paths_are_rewritten_longest_first():
    mounts = [("/etc/dsv4", "/p/v/config"), ("/etc/dsv4/secret", "/p/v/key"), ("/tmp", "/p/v/tmp")]
    assert paths.rewrite_paths("--config /etc/dsv4/config.yaml", mounts) == "--config /p/v/config/config.yaml"
    assert paths.rewrite_paths("key=/etc/dsv4/secret/k", mounts) == "key=/p/v/key/k"
    assert paths.rewrite_paths("/tmp", mounts) == "/p/v/tmp"
    # only whole path components: /tmpfoo and /x/tmp are different paths
    assert paths.rewrite_paths("/tmpfoo /x/tmp", mounts) == "/tmpfoo /x/tmp"


def test_ip_allocation_skips_network_and_gateway():
    assert runner.allocate_ip("10.244.1.0/24", set()) == "10.244.1.2"
    assert runner.allocate_ip("10.244.1.0/24", {"10.244.1.2"}) == "10.244.1.3"
    with pytest.raises(RuntimeError, match="exhausted"):
        runner.allocate_ip("10.244.1.0/30", {"10.244.1.2"})


def test_probe_ports_phases_and_resources():
    c = {"name": "web", "ports": [{"name": "http", "containerPort": 8000}],
         "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}
    assert probes.probe_port("http", c) == 8000 and probes.probe_port(81, c) == 81
    with pytest.raises(ValueError, match="'metrics' is not a number or a named port"):
        probes.probe_port("metrics", c)
    assert status.phase_after_exit([0], "Never") == "Succeeded"
    assert status.phase_after_exit([0], "Always") == "Failed"
    assert status.phase_after_exit([0, 1], "OnFailure") == "Failed"
    assert env.resource_value(c, "limits.cpu", None) == "2"
    assert env.resource_value(c, "limits.memory", "1Mi") == "1024"
    assert runner.parse_nodes(["n0=10.244.1.0/24"]) == {"n0": "10.244.1.0/24"}
    with pytest.raises(ValueError, match="expected NAME=CIDR"):
        runner.parse_nodes(["n0"])


def test_proc_records_stop_by_pid_and_detect_reuse(tmp_path):
    _, rec = procs.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log")
    assert procs.is_alive(rec)
    forged = procs.ProcRecord(**{**rec.to_dict(), "start_ticks": rec.start_ticks + 1})
    assert not procs.is_alive(forged)  # same PID, different start time: not ours
    assert not procs.stop(forged)
    t0 = time.monotonic()
    assert procs.stop(rec, grace_s=5)
    assert time.monotonic() - t0 < 5 and not procs.is_alive(rec)
    assert not procs.stop(rec)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_certificates_and_kubeconfig(tmp_path):
    pki = certs.generate(tmp_path / "pki", service_ip="10.0.0.1")
    text = subprocess.run(["openssl", "x509", "-in", str(pki.crt("apiserver")), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in text and "IP Address:10.0.0.1" in text and "DNS:kubernetes.default" in text
    subj = subprocess.run(["openssl", "x509", "-in", str(pki.crt("admin")), "-noout", "-subject"],
                          capture_output=True, text=True, check=True).stdout
    assert "O = system:masters" in subj and "CN = dsv4-admin" in subj
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pki.crt("ca")), str(pki.crt("scheduler"))],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    ctx = ssl.create_default_context(cafile=str(pki.crt("ca")))
    ctx.load_cert_chain(str(pki.crt("admin")), str(pki.key("admin")))  # key matches cert
    kc = yaml.safe_load(certs.kubeconfig("https://127.0.0.1:1", pki.crt("ca"), pki.crt("admin"), pki.key("admin"),
                                         user="dsv4-admin"))
    assert kc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:1"
    assert kc["users"][0]["user"]["client-certificate-data"]


def test_pod_runner_resends_a_status_patch_that_failed(tmp_path, monkeypatch):
    """A status change made while the API server is down (a pod turning Ready mid-outage) reaches the API
    server once it is back: the failed patch is resent by tick() after PATCH_RETRY_S, every status again
    after STATUS_RESYNC_S (the node controller may have overwritten it); a pod that is gone (404) is not."""
    import threading

    from kubernetes.client.exceptions import ApiException

    class FlakyCore:  # the API client's one call the runner makes here: down twice, then up
        def __init__(self, failures: list[int]):
            self.failures, self.sent = failures, []

        def patch_namespaced_pod_status(self, name, namespace, body, **_kw):
            if self.failures:
                raise ApiException(status=self.failures.pop(0), reason="down")
            self.sent.append((namespace, name, body["status"]["phase"]))

    pr = object.__new__(runner.PodRunner)
    pr.lock, pr.pods = threading.RLock(), {}
    entry = state.PodEntry("u1", "ns", "p", "n0", {"spec": {"containers": []}}, tmp_path, phase="Succeeded")
    pr.pods["u1"] = entry
    pr.core = FlakyCore([503, 503])
    clock = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    pr._patch_status(entry)
    assert pr.core.sent == [] and entry.sync_at == 100.0 + runner.PATCH_RETRY_S
    pr.tick()  # not due yet
    assert pr.core.sent == []
    clock[0] += runner.PATCH_RETRY_S
    pr.tick()  # due, fails again
    assert pr.core.sent == [] and entry.sync_at is not None
    clock[0] += runner.PATCH_RETRY_S
    pr.tick()  # the API server is back
    assert pr.core.sent == [("ns", "p", "Succeeded")]
    assert entry.sync_at == clock[0] + runner.STATUS_RESYNC_S
    pr.tick()
    assert len(pr.core.sent) == 1  # the next re-sync is not due yet
    clock[0] += runner.STATUS_RESYNC_S
    pr.tick()
    assert len(pr.core.sent) == 2  # re-synced although nothing changed here
    pr.core = FlakyCore([404])
    pr._patch_status(entry, force=True)
    assert entry.sync_at is None  # the pod is gone: the watch will say so


def test_status_defaults_to_the_only_or_latest_running_cluster(monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cluster.last_cluster() is None

    def record(name: str, alive: bool, mtime: float) -> None:
        d = cluster.state_root() / name
        d.mkdir(parents=True)
        me = procs.ProcRecord("x", os.getpid(), procs.start_ticks(os.getpid()), "python", "/dev/null")
        c = cluster.Cluster(name=name, state_dir=d, server="https://127.0.0.1:1", kubeconfig=d / "kubeconfig",
                            ports={}, procs={"etcd": me} if alive else {})
        c.save()
        os.utime(d / "state.json", (mtime, mtime))

    record("demo", alive=True, mtime=1000)
    assert cluster.last_cluster() == "demo"
    record("stale", alive=False, mtime=2000)  # newer but nothing runs
    assert cluster.last_cluster() == "demo" and cluster.recorded_clusters() == ["stale", "demo"]
    record("e2e", alive=True, mtime=3000)
    assert cluster.last_cluster() == "e2e" and cluster.live_clusters(exclude="e2e") == ["demo"]


def test_build_progress_has_a_total_elapsed_time_and_an_eta(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(build.time, "monotonic", lambda: clock[0])
    p = build.Progress("kubernetes", total=2000, t0=1000.0)
    clock[0] += 300
    p.done = 500
    assert p.line("k8s.io/api/core/v1") == ("kubernetes: 500/2000 packages compiled, 5 min elapsed, about 15 min "
                                            "left at this rate (latest k8s.io/api/core/v1)")
    p.done = 2000
    assert p.line() == "kubernetes: 2000/2000 packages compiled, 5 min elapsed"
    assert build.Progress("kwok", None, done=7, t0=clock[0]).line() == "kwok: 7 packages compiled, 0 s elapsed"


def test_down_without_a_name_stops_the_only_cluster_and_never_guesses_between_several():
    from dsv4.e2e.cli import down_target

    assert down_target(["demo"], ["stale", "demo"]) == "demo"  # the running one, not the newest state
    assert down_target([], ["stale"]) == "stale"
    with pytest.raises(ValueError, match="2 clusters are running \\(e2e, demo\\): name one with --name"):
        down_target(["e2e", "demo"], ["e2e", "demo"])
    with pytest.raises(ValueError, match="2 clusters are recorded"):
        down_target([], ["a", "b"])
    with pytest.raises(ValueError, match="no cluster is recorded"):
        down_target([], [])


def test_pod_state_is_saved_safely_from_concurrent_pod_starts(tmp_path):
    """Pods start on threads of their own and each records the state: concurrent saves must neither fail (two
    writers once shared one temp file and the second rename failed that pod's start) nor leave a torn file."""
    from dsv4.e2e.podrunner import state

    entries = [state.PodEntry(f"u{i}", "ns", f"p{i}", "n0", {"spec": {"containers": []}}, tmp_path)
               for i in range(4)]

    def save_many() -> None:
        for _ in range(200):
            state.save_state(tmp_path, entries)

    assert errors_in_threads(save_many, 4) == []
    assert set(json.loads((tmp_path / "state.json").read_text())["pods"]) == {"u0", "u1", "u2", "u3"}
    assert not list(tmp_path.glob("*.tmp"))
