"""Probes as the kubelet runs them (readiness, liveness, startup): httpGet, tcpSocket, exec, with period,
initial delay, timeout and success/failure thresholds."""

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
    ready: bool = False   # readiness: the container is Ready; startup: the container has started
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0

    @classmethod
    def start(cls, spec: dict | None, now: float) -> ProbeState:
        """State of a probe for a container that starts now (no probe: passed at once)."""
        return cls(spec=spec, ready=spec is None, next_at=now + float((spec or {}).get("initialDelaySeconds", 0)))

    def due(self, now: float) -> bool:
        return self.spec is not None and now >= self.next_at

    def observe(self, ok: bool, now: float) -> None:
        """Count one result; the next probe is due one period later."""
        spec = self.spec or {}
        self.next_at = now + float(spec.get("periodSeconds", 10))
        self.successes, self.failures = (self.successes + 1, 0) if ok else (0, self.failures + 1)

    @property
    def succeeded(self) -> bool:
        return self.successes >= int((self.spec or {}).get("successThreshold", 1))

    @property
    def failed(self) -> bool:
        return self.failures >= int((self.spec or {}).get("failureThreshold", 3))


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
