"""The operator's own Prometheus metrics (names and labels from dsv4.metrics_catalog)."""

from __future__ import annotations

import threading
from typing import Any

from dsv4 import metrics_catalog as mc

_COLLECTORS: dict[str, Any] | None = None
_LOCK = threading.Lock()  # kopf runs sync handlers in worker threads: create the collectors once


def collectors(registry: Any = None) -> dict[str, Any]:
    """The operator's collectors, created once per process (pass `registry` in tests for a fresh set)."""
    global _COLLECTORS
    if registry is not None:
        return mc.make_collectors(mc.OPERATOR, registry=registry)
    with _LOCK:
        if _COLLECTORS is None:
            import prometheus_client as pc

            _COLLECTORS = mc.make_collectors(mc.OPERATOR, registry=pc.REGISTRY)
        return _COLLECTORS


def serve(port: int) -> None:
    """Expose the default registry on :port/metrics (a thread of the operator process)."""
    import prometheus_client as pc

    collectors()
    pc.start_http_server(port)
