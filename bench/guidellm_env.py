"""A separate virtual environment holding guidellm (PyPI, pinned), for `dsv4 bench serving`.

guidellm is not a dependency of dsv4 (it pulls in sanic, datasets, ...), so it lives in its own venv at
`${XDG_CACHE_HOME:-~/.cache}/dsv4/tools/guidellm-venv` (`DSV4_GUIDELLM_VENV` overrides the path).

Cold install: the venv is built in a temporary folder next to the target and renamed into place only when
`guidellm --version` reports the pinned version, so an interrupted install never counts as done. To keep
it small and fast (guidellm requires torch and transformers, several GB with CUDA wheels), the new venv
gets a `.pth` line naming the site-packages of the interpreter that runs this module (the project's
`.venv`): pip then finds torch, transformers, numpy, pydantic, httpx ... already installed and only
downloads what is missing; anything guidellm needs in another version is installed into the new venv,
which comes first on its `sys.path`. Nothing is written into the project's `.venv`.

A second call finds the venv in place and returns in milliseconds. Run: ``python -m dsv4.bench.guidellm_env``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dsv4.e2e import tools

GUIDELLM_VERSION = "0.8.1"
SHARED_PTH = "dsv4-shared-site.pth"


class GuidellmEnvError(RuntimeError):
    """The guidellm venv could not be created or holds the wrong version; the message says why."""


def venv_dir() -> Path:
    if os.environ.get("DSV4_GUIDELLM_VENV"):
        return Path(os.environ["DSV4_GUIDELLM_VENV"])
    return tools.cache_dir() / "guidellm-venv"


def guidellm_exe(venv: Path) -> Path:
    return venv / "bin" / "guidellm"


def installed_version(venv: Path) -> str | None:
    """The version `guidellm --version` prints in `venv`, or None when it is missing or broken."""
    exe = guidellm_exe(venv)
    if not exe.exists():
        return None
    try:
        r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    words = r.stdout.strip().split()
    return words[-1] if words else None


def _base_python() -> str:
    """The interpreter the venv is built from: the base of the current venv (same minor version)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.exists() else sys.executable


def _run(cmd: list[str], say: Callable[[str], None], what: str) -> None:
    say(f"[guidellm-env] {what}: {' '.join(cmd)}")
    t0 = time.time()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise GuidellmEnvError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}")
    say(f"[guidellm-env] {what}: done in {time.time() - t0:.0f} s")


def ensure(say: Callable[[str], None] = print, share_site: bool = True) -> Path:
    """The path of a `guidellm` executable at the pinned version, installing it first when needed."""
    venv = venv_dir()
    if installed_version(venv) == GUIDELLM_VERSION:
        return guidellm_exe(venv)
    with tools.file_lock(venv.parent / ".guidellm-venv.lock"):
        found = installed_version(venv)
        if found == GUIDELLM_VERSION:
            return guidellm_exe(venv)
        say(f"[guidellm-env] {venv}: {'guidellm ' + found if found else 'no guidellm'}; "
            f"installing guidellm=={GUIDELLM_VERSION} from PyPI")
        tmp = Path(tempfile.mkdtemp(prefix=".guidellm-venv-", dir=venv.parent))
        try:
            _run([_base_python(), "-m", "venv", str(tmp)], say, "create venv")
            py = tmp / "bin" / "python"
            if share_site:
                site = Path(subprocess.check_output(
                    [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
                shared = sysconfig.get_paths()["purelib"]
                (site / SHARED_PTH).write_text(shared + "\n")
                say(f"[guidellm-env] sharing already-installed packages from {shared}")
            _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "on",
                  f"guidellm=={GUIDELLM_VERSION}"], say, "pip install")
            got = installed_version(tmp)
            if got != GUIDELLM_VERSION:
                raise GuidellmEnvError(f"after install `guidellm --version` gives {got!r}, want {GUIDELLM_VERSION}")
            if venv.exists():
                shutil.rmtree(venv)
            tmp.rename(venv)
            _fix_paths(tmp, venv)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        got = installed_version(venv)
        if got != GUIDELLM_VERSION:
            raise GuidellmEnvError(f"{venv}: `guidellm --version` gives {got!r} after the move, "
                                   f"want {GUIDELLM_VERSION}")
        say(f"[guidellm-env] ready: {guidellm_exe(venv)}")
        return guidellm_exe(venv)


def _fix_paths(old: Path, new: Path) -> None:
    """A venv's scripts name its interpreter by absolute path: rewrite them after the rename."""
    old_b, new_b = str(old).encode(), str(new).encode()
    for f in (new / "bin").iterdir():
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            if data.startswith(b"#!") and old_b in data:
                f.write_bytes(data.replace(old_b, new_b))
    cfg = new / "pyvenv.cfg"
    if cfg.exists():
        cfg.write_bytes(cfg.read_bytes().replace(old_b, new_b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-share-site", action="store_true",
                    help="install every dependency into the venv (several GB) instead of reusing this one's")
    args = ap.parse_args(argv)
    try:
        print(ensure(share_site=not args.no_share_site))
    except GuidellmEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
