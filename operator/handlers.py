"""kopf handlers for `DSV4Endpoint`: wiring only. Load with `kopf run -m dsv4.operator.handlers` or `dsv4 operator`.

Module-level functions (kopf#849). Level-based: create, update and resume all run the same reconcile
(`sync.py`: observe, pure `reconcile`, server-side apply with field manager `dsv4-operator`); the status and
Events are written by `kube.py`, the only writer of status. The periodic work (status refresh, autoscaler,
re-apply) is the `Ticker` (`ticker.py`) kept in kopf's `memo`, fed by the `track` event handler. No handler
needs a finalizer (see ticker.py), so `kubectl delete` never waits for the operator.

Errors: an invalid or unservable spec is a status (`PlanValid=False`), one Warning event, and a kopf
`PermanentError` (no retries until the spec changes); API-server trouble (connection refused, 5xx,
429, 409) is a `TemporaryError` with exponential backoff (15 s doubling to 5 min) here and a skipped tick in
the ticker, so an unavailable API server is survived without a crash.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import kopf
from dsv4.operator import api, kube, telemetry
from dsv4.operator.reconcile import PLAN_VALID
from dsv4.operator.sync import publish, reconcile_and_apply
from dsv4.operator.ticker import Ticker

METRICS_PORT = int(os.environ.get("DSV4_OPERATOR_METRICS_PORT", "8080"))
log = logging.getLogger("dsv4.operator")


def _change(handler: str, body: Any, name: str, namespace: str, uid: str, meta: Any, spec: Any, status: Any,
            retry: int) -> None:
    """create/update/resume: reconcile, write status and events; permanent error for an unservable spec."""
    try:
        res = reconcile_and_apply(handler, name, namespace, uid, meta.get("generation"), copy.deepcopy(dict(spec)),
                                  copy.deepcopy(dict(status or {})))
    except Exception as e:
        if kube.is_transient(e):
            raise kopf.TemporaryError(f"{handler}: API server: {type(e).__name__}: {e}",
                                      delay=kube.backoff_s(retry)) from e
        raise kopf.PermanentError(f"{handler}: {type(e).__name__}: {e}") from e
    publish(namespace, name, res.status, res.scale)
    for ev in res.events:
        kube.post_event(body, ev)
    if res.error:  # PlanValid=False is already in the status; no retries until the spec changes
        pv = next((c for c in res.status.get("conditions", []) if c.get("type") == PLAN_VALID), {})
        raise kopf.PermanentError(f"{pv.get('reason', 'PlanInvalid')}: {res.error}")


class _QuietTrack(logging.Filter):
    """Drop kopf's INFO line for every watch event the `track` handler sees (one per status write)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and "Handler 'track' succeeded" in record.getMessage())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Storage under serving.dsv4.dev (fixed before the first release: changing it later makes every
    object look unhandled), quiet log-to-event posting, long watches, and the metrics endpoint."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration")
    # No handler needs a finalizer; the name stays so kopf recognises (and removes) one an older version added.
    settings.persistence.finalizer = f"{api.GROUP}/kopf-finalizer"
    settings.posting.level = logging.WARNING
    kopf_log = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _QuietTrack) for f in kopf_log.filters):
        kopf_log.addFilter(_QuietTrack())
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    if METRICS_PORT > 0:
        try:
            telemetry.serve(METRICS_PORT)
        except OSError as e:  # port taken (e.g. two operators in one test process): metrics off, not fatal
            log.warning("operator metrics not served on :%d (%s)", METRICS_PORT, e)


@kopf.on.startup()
async def start_ticker(memo: kopf.Memo, **_: Any) -> None:
    """Startup handlers run before any watch, so every per-object memo (a shallow copy) shares this Ticker."""
    memo.ticker = Ticker()
    memo.ticker.start()


@kopf.on.cleanup()
async def stop_ticker(memo: kopf.Memo, **_: Any) -> None:
    ticker = getattr(memo, "ticker", None)
    if ticker is not None:
        await ticker.stop()


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
def on_create(body, name, namespace, uid, meta, spec, status, retry, **_: Any) -> None:
    _change("create", body, name, namespace, uid, meta, spec, status, retry)


@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL)
def on_update(body, name, namespace, uid, meta, spec, status, retry, **_: Any) -> None:
    _change("update", body, name, namespace, uid, meta, spec, status, retry)


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
def on_resume(body, name, namespace, uid, meta, spec, status, retry, **_: Any) -> None:
    telemetry.endpoint_seen()
    _change("resume", body, name, namespace, uid, meta, spec, status, retry)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def track(event, memo: kopf.Memo, **_: Any) -> None:
    """Keep the latest copy of every endpoint for the ticker. Event handlers never require a finalizer."""
    memo.ticker.track(event)
