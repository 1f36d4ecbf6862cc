"""Run the real server (engine thread + uvicorn on a loopback socket) inside the current process.

Tests and benchmarks use it when they need to look inside while clients talk HTTP to it: the cache manager
(through `AsyncEngine.call`, on the engine thread), the scheduler, the server state. Everything is the same
code path as `dsv4 serve` except signal handling (uvicorn only installs handlers on the main thread).

    with start_in_process(ServeConfig.build({}, {"max_queue": 8})) as srv:
        httpx.post(srv.base_url + "/v1/completions", json={...})
        srv.engine.call(lambda eng: eng.cache.check_invariants())
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from dsv4.runtime.server.config import ServeConfig


@dataclass
class InProcessServer:
    built: Any  # build.Built
    state: Any  # app.ServerState
    server: Any  # uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> Any:
        return self.built.engine

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.built.engine.shutdown()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_in_process(cfg: ServeConfig, api_key: str | None = None, timeout: float = 60.0) -> InProcessServer:
    """Build the engine from `cfg`, start it, and serve the app on 127.0.0.1 (a free port unless cfg.port is
    set to something other than the default 8000). Returns once the socket accepts connections."""
    import uvicorn
    from dsv4.runtime.server.app import ServerState, create_app
    from dsv4.runtime.server.build import build_engine
    from dsv4.runtime.server.launch import free_port
    from dsv4.runtime.server.serve import TINY_DEFAULT_MAX_TOKENS

    built = build_engine(cfg, say=lambda *_: None)
    built.engine.start()
    default_max = cfg.default_max_tokens or (TINY_DEFAULT_MAX_TOKENS if cfg.model is None else None)
    state = ServerState(built.engine, built.tokenizer, built.model_name, built.max_model_len, built.metrics,
                        api_key, default_max, max_body_bytes=cfg.max_body_bytes)
    port = cfg.port if cfg.port != 8000 else free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dsv4-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            built.engine.shutdown()
            raise RuntimeError(f"in-process server did not start on port {port}")
        time.sleep(0.02)
    return InProcessServer(built, state, server, thread, port)
