"""Start `dsv4 serve` as a subprocess on a free loopback port and wait for /ready (used by `make demo`,
the server tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dsv4 serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if self.get("/ready", timeout=2.0)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"dsv4 serve not ready after {timeout:.0f} s:\n{self.log()[-4000:]}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after `timeout`. Returns the exit code."""
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(args: list[str] | None = None, env: dict[str, str] | None = None, port: int | None = None,
                 log_path: str | Path | None = None, wait: bool = True, timeout: float = 120.0) -> ServerProcess:
    """`python -m dsv4.cli serve --host 127.0.0.1 --port P *args`; output goes to `log_path` (a temp file)."""
    port = port or free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="dsv4-serve-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    cmd = [sys.executable, "-m", "dsv4.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *(args or [])]
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    sp = ServerProcess(proc, port, log_path)
    if wait:
        sp.wait_ready(timeout)
    return sp


def start_servers(*args: list[str], timeout: float = 240.0) -> list[ServerProcess]:
    """`start_server` for each argument list, all starting at once; returns when every one is ready, or stops them
    all and raises when one fails to start."""
    servers = [start_server(a, wait=False) for a in args]
    try:
        for s in servers:
            s.wait_ready(timeout)
    except BaseException:
        for s in servers:
            s.stop(5)
        raise
    return servers
