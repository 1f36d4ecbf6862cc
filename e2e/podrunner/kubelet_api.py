"""The part of the kubelet's HTTPS API that `kubectl logs` needs, served on loopback by the pod runner.

kube-apiserver answers `GET /api/v1/namespaces/NS/pods/POD/log` by dialling the node's kubelet: the
nodes advertise `InternalIP 127.0.0.1` and `daemonEndpoints.kubeletEndpoint.Port` = this server's port,
and the API server runs with `--kubelet-preferred-address-types=InternalIP`. Without a kubelet CA
configured, the API server does not verify this server's certificate (signed by the cluster CA anyway).

    GET /containerLogs/{namespace}/{pod}/{container}?follow=&previous=&tailLines=&limitBytes=
    GET /healthz

`follow=true` streams the log as it grows until the container's current run ends (or the client goes).
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FOLLOW_POLL_S = 0.2


@dataclass(frozen=True)
class LogSource:
    path: Path
    running: Callable[[], bool]  # the run that writes PATH is still going (for follow)


# (namespace, pod, container, previous) -> the log, or None when there is no such pod/container/run
LogLookup = Callable[[str, str, str, bool], LogSource | None]


def tail_bytes(data: bytes, tail_lines: int | None) -> bytes:
    """The last TAIL_LINES lines of DATA (all when None)."""
    if tail_lines is None:
        return data
    if tail_lines <= 0:
        return b""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-tail_lines:])


def _flag(q: dict[str, list[str]], name: str) -> bool:
    return (q.get(name) or ["false"])[0].lower() in ("true", "1")


def _int(q: dict[str, list[str]], name: str) -> int | None:
    v = (q.get(name) or [None])[0]
    return int(v) if v not in (None, "") else None


def make_handler(lookup: LogLookup, stopping: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args) -> None:  # the pod runner's own log stays readable
            pass

        def _plain(self, code: int, text: str) -> None:
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/healthz":
                self._plain(200, "ok")
                return
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._plain(404, f"not served by the dsv4 pod runner: {url.path}")
                return
            q = urllib.parse.parse_qs(url.query)
            try:
                tail, limit = _int(q, "tailLines"), _int(q, "limitBytes")
            except ValueError as exc:
                self._plain(400, str(exc))
                return
            _, ns, pod, container = parts
            previous = _flag(q, "previous")
            src = lookup(ns, pod, container, previous)
            if src is None or not src.path.exists():
                what = "previous terminated container" if previous else "container"
                self._plain(404, f"{what} {container!r} in pod {ns}/{pod} not found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._stream(src, tail, limit, follow=_flag(q, "follow") and not previous)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _stream(self, src: LogSource, tail: int | None, limit: int | None, *, follow: bool) -> None:
            sent = 0
            try:
                with open(src.path, "rb") as fh:
                    data = tail_bytes(fh.read(), tail)
                    while True:
                        if limit is not None:
                            data = data[: max(0, limit - sent)]
                        if data:
                            self._chunk(data)
                            sent += len(data)
                        if not follow or (limit is not None and sent >= limit) or stopping.is_set():
                            break
                        alive = src.running()
                        data = fh.read()
                        if not data:
                            if not alive:
                                break
                            time.sleep(FOLLOW_POLL_S)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client went away (kubectl logs -f interrupted)

    return Handler


class KubeletAPI:
    """HTTPS on 127.0.0.1:PORT with CERT/KEY; `start()` serves in a daemon thread, `stop()` ends it."""

    def __init__(self, port: int, cert: Path, key: Path, lookup: LogLookup):
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(lookup, self.stopping))
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)

    def start(self) -> KubeletAPI:
        threading.Thread(target=self.server.serve_forever, name="kubelet-api", daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
