"""Fixtures for the end-to-end tests: a real local control plane (see docs/local-cluster.md).

Building the control plane when the cache is cold happens once, after collection and before the first
test (`pytest_collection_finish`), so the build's minutes never count against a test's timeout: on a
busy machine a cold build can take longer than pytest-timeout's limit for one test.

`local_cluster` (session): brings the cluster named "e2e" up, yields a `dsv4.e2e.cluster.Cluster`, and at the end
brings it down and fails the session if any recorded process is still alive. Without root or the
Go toolchain the e2e tests are skipped with the reason, unless DSV4_E2E_REQUIRE=1 (CI) turns that
into a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid

import pytest
from dsv4.e2e import cluster as cluster_mod
from dsv4.e2e import podnet, procs

E2E_CLUSTER = os.environ.get("DSV4_E2E_CLUSTER", "e2e")  # another name lets two sessions run side by side


def _unavailable() -> str | None:
    if why := podnet.available():
        return why
    from dsv4.e2e import build

    if build.missing() and shutil.which("go") is None and not os.path.exists("/usr/local/go/bin/go"):
        return "the Go toolchain is not installed and the control-plane binaries are not cached"
    return None


@contextlib.contextmanager
def _uncaptured(pytestconfig):
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


def _runs_e2e(args: list[str]) -> bool:
    """Whether the run's paths (`config.args`: the testpaths when none are given) include these tests."""
    here = os.path.dirname(os.path.abspath(__file__))
    for arg in args:
        path = os.path.abspath(arg.split("::", 1)[0])
        if path == here or path.startswith(here + os.sep) or here.startswith(path + os.sep):
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session) -> None:
    """Under pytest-xdist (`make test`: -n 2) the controller builds, before it starts the workers: workers must
    not race to build, and the worker that runs the e2e unit (root conftest.py) must find the binaries ready."""
    config = session.config
    if hasattr(config, "workerinput") or getattr(config.option, "dist", "no") == "no":
        return
    if _runs_e2e(list(config.args)) and not _unavailable():
        _build_before_tests(session)


def pytest_collection_finish(session) -> None:
    """Build the binaries (progress on the terminal) before any e2e test runs and its timeout starts."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller built them (pytest_sessionstart)
        return
    if not any("local_cluster" in getattr(item, "fixturenames", ()) for item in session.items) or _unavailable():
        return
    _build_before_tests(session)


def _build_before_tests(session) -> None:
    from dsv4.e2e import build

    if not build.missing():
        return
    with _uncaptured(session.config):
        t0 = time.monotonic()
        print(f"\n[e2e] building the control plane before the tests ({build.COLD_BUILD_ESTIMATE})", flush=True)
        try:
            build.ensure_built()
        except build.BuildError as e:  # the e2e tests fail with it (local_cluster); the other tests still run
            print(f"[e2e] the build failed: {e}", flush=True)
            return
        print(f"[e2e] control-plane binaries built in {time.monotonic() - t0:.0f} s", flush=True)


@pytest.fixture(scope="session")
def local_cluster(pytestconfig):
    """The running cluster: `.kubeconfig`, `.server`, `.api_client()`, `.env()`, `.procs`, `.nodes`."""
    if why := _unavailable():
        if os.environ.get("DSV4_E2E_REQUIRE") == "1":
            pytest.fail(f"e2e required but unavailable: {why}")
        pytest.skip(f"local cluster unavailable: {why}")
    with _uncaptured(pytestconfig):
        t0 = time.monotonic()
        c = cluster_mod.up(E2E_CLUSTER)
        print(f"\n[e2e] cluster up in {time.monotonic() - t0:.1f} s at {c.server}", flush=True)
    records = dict(c.procs)
    try:
        yield c
    finally:
        # processes restarted by fault tests (kube-apiserver) have new PIDs: check those too
        now = cluster_mod.Cluster.load(E2E_CLUSTER)
        records.update({f"{n} (restarted)": r for n, r in (now.procs if now else {}).items() if r != records.get(n)})
        with _uncaptured(pytestconfig):
            cluster_mod.down(E2E_CLUSTER)
        left = [f"{n} (pid {r.pid})" for n, r in records.items() if procs.is_alive(r)]
        if left:
            pytest.fail(f"`down` left processes running: {', '.join(left)}")


@pytest.fixture
def namespace(local_cluster):
    """A fresh namespace, deleted after the test."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    with local_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        try:
            yield name
        finally:
            with contextlib.suppress(Exception):
                core.delete_namespace(name)
