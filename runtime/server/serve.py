"""Run the server: build the engine, start its thread, serve HTTP with uvicorn, drain on SIGTERM.

Drain: the first SIGTERM/SIGINT sets `draining` (so /ready answers 503 and new /v1 requests get 503 while
the listening socket stays open for probes), waits until no /v1 request is in flight or `grace_period_s`
passed (then aborts what is left), and only then lets uvicorn shut down. The process exits 0. A second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from dsv4.runtime.server.config import ServeConfig

log = logging.getLogger("dsv4.serve")
TINY_DEFAULT_MAX_TOKENS = 256


def _server_class() -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose exit signals start a drain instead of closing the socket at once."""

        def __init__(self, config: Any, state: Any, grace_s: float):
            super().__init__(config)
            self.dsv4_state = state
            self.grace_s = grace_s
            self.loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:  # runs in the main thread (the loop's thread)
            st = self.dsv4_state
            if st.draining or self.loop is None:
                self.should_exit = True
                self.force_exit = st.draining
                return
            st.engine.begin_drain()
            log.info("received %s: draining (readiness off, new requests 503, grace %.0f s, %d in flight)",
                     signal.Signals(sig).name, self.grace_s, st.in_flight)
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

        async def _drain(self) -> None:
            st = self.dsv4_state
            deadline = time.monotonic() + self.grace_s
            while (st.in_flight > 0 or st.engine.in_flight > 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if st.in_flight > 0 or st.engine.in_flight > 0:
                log.warning("grace period over: aborting %d request(s)", st.engine.in_flight)
                st.engine.abort_all()
                await asyncio.sleep(0.2)
            log.info("drained; shutting down")
            self.should_exit = True

    return DrainingServer


def serve(cfg: ServeConfig, api_key: str | None) -> int:
    import faulthandler
    import sys
    import threading

    import uvicorn
    from dsv4.runtime.server.app import ServerState, create_app
    from dsv4.runtime.server.build import build_engine

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack to the log (diagnosing a hang)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    t0 = time.monotonic()
    built = build_engine(cfg)
    for line in built.report:
        log.info(line)
    built.engine.start()
    # the built-in tiny model has random weights and rarely emits EOS: cap chat requests without max_tokens
    default_max = cfg.default_max_tokens or (TINY_DEFAULT_MAX_TOKENS if cfg.model is None else None)
    state = ServerState(built.engine, built.tokenizer, built.model_name, built.max_model_len, built.metrics,
                        api_key, default_max, max_body_bytes=cfg.max_body_bytes)
    app = create_app(state)
    log.info("model %r ready in %.1f s; auth %s; serving on http://%s:%d (metrics at /metrics)",
             built.model_name, time.monotonic() - t0, "on" if api_key else "off", cfg.host, cfg.port)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _server_class()(config, state, cfg.grace_period_s)
    server.run()
    built.engine.shutdown()
    if built.group is not None:
        built.group.close()
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if left:
        log.warning("threads still running at exit (the interpreter waits for them): %s", ", ".join(left))
    log.info("stopped")
    return 0
