"""Readiness probes as the kubelet runs them: httpGet, tcpSocket, exec (inside the pod's network namespace)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dsv4.e2e import podnet


@dataclass
class ProbeState:
    spec: dict | None
    ready: bool = False
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0


def probe_port(probe_port_value, container: dict) -> int:
    """A probe port is a number or the name of one of the container's ports."""
    if isinstance(probe_port_value, int) or (isinstance(probe_port_value, str) and probe_port_value.isdigit()):
        return int(probe_port_value)
    for p in container.get("ports") or []:
        if p.get("name") == probe_port_value:
            return int(p["containerPort"])
    raise ValueError(f"probe port {probe_port_value!r} is not a number or a named port of container "
                     f"{container.get('name')!r}")


def probe_once(spec: dict, container: dict, net: podnet.PodNet, cwd: Path) -> bool:
    """Run one probe of SPEC against the pod at NET; True on success."""
    timeout = float(spec.get("timeoutSeconds", 1))
    if "httpGet" in spec:
        h = spec["httpGet"]
        port = probe_port(h.get("port"), container)
        scheme = h.get("scheme", "HTTP").lower()
        url = f"{scheme}://{h.get('host') or net.ip}:{port}{h.get('path', '/')}"
        req = urllib.request.Request(url, headers={x["name"]: x["value"] for x in h.get("httpHeaders") or []})
        ctx = ssl._create_unverified_context() if scheme == "https" else None  # noqa: S323 - kubelet skips it too
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                return 200 <= r.status < 400
        except urllib.error.HTTPError as err:
            return 200 <= err.code < 400
        except (urllib.error.URLError, OSError):
            return False
    if "tcpSocket" in spec:
        t = spec["tcpSocket"]
        try:
            with socket.create_connection((t.get("host") or net.ip, probe_port(t.get("port"), container)),
                                          timeout=timeout):
                return True
        except OSError:
            return False
    if "exec" in spec:
        try:
            r = subprocess.run(podnet.enter_argv(net) + spec["exec"]["command"], timeout=timeout,
                               capture_output=True, cwd=cwd)
            return r.returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            return False
    return True  # grpc and unknown handlers: not supported, counted as success
