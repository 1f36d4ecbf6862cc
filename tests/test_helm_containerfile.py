"""The Containerfile (no engine builds it here): non-root, pinned dependencies, every package folder
copied, and the chart runs the image's `dsv4` entrypoint. Also: the tool fetcher is idempotent."""

from __future__ import annotations

import ast
import re
import time

import yaml
from dsv4.e2e import tools
from dsv4.operator.observability.generate import CHART_DIR, REPO_ROOT

TEXT = (REPO_ROOT / "Containerfile").read_text()


def _roots() -> dict[str, str]:
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ROOTS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no ROOTS")


def test_runs_as_non_root():
    users = re.findall(r"^USER\s+(\S+)", TEXT, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = int(users[-1].split(":")[0])
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == uid  # the chart runs the image's own user


def test_dependencies_pinned_by_constraints():
    assert re.search(r"pip install -c constraints\.txt \.", TEXT)
    assert "COPY pyproject.toml setup.py constraints.txt" in TEXT
    lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    pinned = {ln.split("==")[0].lower().replace("_", "-") for ln in lines if "==" in ln}
    assert {"torch", "kopf", "prometheus-client", "fastapi"} <= pinned


def test_every_package_folder_is_copied():
    copied = set(re.findall(r"^COPY\s+(\S+)/\s+\1/", TEXT, re.M))
    assert set(_roots().values()) <= copied
    for src in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", TEXT, re.M):
        for path in src.split():
            assert (REPO_ROOT / path.rstrip("/")).exists(), path


def test_chart_uses_the_image_entrypoint():
    dep = (CHART_DIR / "templates" / "deployment.yaml").read_text()
    assert 'command: ["dsv4"]' in dep and "- operator" in dep
    assert re.search(r"^ENV PATH=/opt/dsv4/bin", TEXT, re.M)


def test_tool_fetch_is_idempotent():
    first = tools.ensure_kubectl_helm()
    start = time.monotonic()
    again = tools.ensure_kubectl_helm()
    assert again == first and time.monotonic() - start < 5  # no second download
    assert tools.tool_version("kubectl", first.kubectl) == tools.KUBECTL_VERSION
    assert tools.tool_version("helm", first.helm) == tools.HELM_VERSION
    assert first.helm.parent == tools.bin_dir()
