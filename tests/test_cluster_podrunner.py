"""The pod runner's kubelet behaviour without a control plane: path mapping for any HOME, restart back-off,
the container status of a crash loop, probes' thresholds, and the kubelet API serving logs over TLS."""

from __future__ import annotations

import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dsv4.e2e import certs, cluster, procs
from dsv4.e2e.podrunner import kubelet_api, paths, restarts, status
from dsv4.e2e.podrunner.probes import ProbeState
from dsv4.e2e.podrunner.state import Container, PodEntry


def test_paths_map_once_when_the_state_dir_lives_under_tmp():
    """The demo's bug with HOME under /tmp: /etc/dsv4 was mapped into the pod folder, then that result was
    rewritten again for the /tmp mount (`.../volumes/tmp/tmp/home/...`)."""
    pod_dir = "/tmp/home/.cache/dsv4/cluster/demo/pods/default_chat-1_abcd1234"
    mounts = [("/etc/dsv4", f"{pod_dir}/volumes/config"), ("/tmp", f"{pod_dir}/volumes/tmp"),
              ("/models", "/tmp/home/.cache/dsv4/models")]
    assert paths.rewrite_paths("--config /etc/dsv4/config.yaml", mounts) == (
        f"--config {pod_dir}/volumes/config/config.yaml")
    assert paths.rewrite_paths("/tmp/x /models/tiny", mounts) == (
        f"{pod_dir}/volumes/tmp/x /tmp/home/.cache/dsv4/models/tiny")
    assert paths.rewrite_paths("model: /models\ncache: /tmp\n", mounts) == (
        f"model: /tmp/home/.cache/dsv4/models\ncache: {pod_dir}/volumes/tmp\n")
    assert paths.rewrite_paths("/tmpfoo", mounts) == "/tmpfoo"
    assert paths.rewrite_paths("anything", []) == "anything"


def test_backoff_doubles_from_the_base_up_to_five_minutes():
    b = restarts.Backoff()
    assert [b.delay(n) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert restarts.Backoff(base_s=0.5).delay(3) == 2.0
    assert restarts.should_restart("Always", 0) and restarts.should_restart("OnFailure", 1)
    assert not restarts.should_restart("OnFailure", 0) and not restarts.should_restart("Never", 1)


def test_last_log_line_is_the_termination_message(tmp_path):
    log = tmp_path / "c.log"
    log.write_text("starting\nTraceback (most recent call last):\nValueError: no such model 'x'\n\n")
    assert restarts.last_log_line(log) == "ValueError: no such model 'x'"
    assert restarts.last_log_line(tmp_path / "missing.log") == ""
    log.write_text("y" * 5000 + "\n")
    assert len(restarts.last_log_line(log)) == restarts.MESSAGE_MAX_CHARS
    assert restarts.terminated_state(3, "a", "b", "boom") == {
        "exitCode": 3, "reason": "Error", "startedAt": "a", "finishedAt": "b", "message": "boom"}
    assert restarts.terminated_state(0, "a", "b", "")["reason"] == "Completed"


def _container(**kw) -> Container:
    rec = procs.ProcRecord(name="x", pid=4242, start_ticks=1, argv0="python", log="/dev/null")
    probes = {k: ProbeState.start(None, 0.0) for k in ("readiness", "liveness", "startup")}
    return Container(name="main", spec={"name": "main"}, rec=rec, proc=None, started_at="t0", **probes, **kw)


def test_a_crash_loop_shows_as_crashloopbackoff_with_the_last_exit():
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
           "spec": {"containers": [{"name": "main", "image": "img"}]}}
    e = PodEntry("u1", "ns", "p", "n0", pod, Path("/x"), phase="Running")
    last = restarts.terminated_state(1, "t0", "t1", "ValueError: boom")
    e.containers = [_container(exit_code=1, terminated=last, restart_count=2, restart_at=99.0, backoff_s=40.0)]
    st = status.pod_status(e)["containerStatuses"][0]
    assert st["state"] == {"waiting": {"reason": "CrashLoopBackOff",
                                       "message": "back-off 40s restarting failed container=main pod=p_ns(u1)"}}
    assert st["lastState"] == {"terminated": last} and st["restartCount"] == 2 and st["ready"] is False
    # running again: lastState keeps the previous exit
    e.containers = [_container(terminated=last, restart_count=3)]
    st = status.pod_status(e)["containerStatuses"][0]
    assert "running" in st["state"] and st["lastState"] == {"terminated": last} and st["ready"] is True
    # exited for good (restartPolicy Never)
    e.containers = [_container(exit_code=1, terminated=last)]
    assert status.pod_status(e)["containerStatuses"][0]["state"] == {"terminated": last}


def test_probe_thresholds_and_startup_gate():
    p = ProbeState.start({"periodSeconds": 2, "failureThreshold": 2, "initialDelaySeconds": 5}, now=100.0)
    assert not p.ready and not p.due(104.0) and p.due(105.0)
    p.observe(False, 105.0)
    assert not p.failed and p.next_at == 107.0
    p.observe(False, 107.0)
    assert p.failed
    p.observe(True, 109.0)
    assert p.succeeded and not p.failed
    assert ProbeState.start(None, 0.0).ready  # no probe: passed at once


@pytest.fixture(scope="module")
def kubelet_pki(tmp_path_factory):
    return certs.generate(tmp_path_factory.mktemp("pki"), service_ip=cluster.SERVICE_IP)


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # as kube-apiserver without a kubelet CA
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_kubelet_api_serves_logs_tail_previous_and_follow(tmp_path, kubelet_pki):
    current, previous = tmp_path / "main.log", tmp_path / "main.previous.log"
    current.write_text("one\ntwo\nthree\n")
    previous.write_text("crashed: ValueError\n")
    running = threading.Event()
    running.set()

    def lookup(ns, pod, container, prev):
        if (ns, pod, container) != ("ns", "p", "main"):
            return None
        return kubelet_api.LogSource(previous if prev else current, running=running.is_set)

    port = cluster.free_port()
    api = kubelet_api.KubeletAPI(port, kubelet_pki.crt("kubelet"), kubelet_pki.key("kubelet"), lookup).start()
    try:
        assert _get(port, "/containerLogs/ns/p/main") == (200, "one\ntwo\nthree\n")
        assert _get(port, "/containerLogs/ns/p/main?tailLines=1") == (200, "three\n")
        assert _get(port, "/containerLogs/ns/p/main?limitBytes=5") == (200, "one\nt")
        assert _get(port, "/containerLogs/ns/p/main?previous=true") == (200, "crashed: ValueError\n")
        code, body = _get(port, "/containerLogs/ns/q/main")
        assert code == 404 and "ns/q" in body

        def grow() -> None:
            time.sleep(0.5)
            with current.open("a") as fh:
                fh.write("four\n")
            time.sleep(0.5)
            running.clear()  # the container's run ends: follow returns

        threading.Thread(target=grow).start()
        t0 = time.monotonic()
        assert _get(port, "/containerLogs/ns/p/main?follow=true&tailLines=1") == (200, "three\nfour\n")
        assert 0.9 < time.monotonic() - t0 < 4.0
    finally:
        api.stop()
