"""What the HTTP layer shares across requests: the engine, the tokenizer, limits, drain state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dsv4.runtime.engine.engine import AsyncEngine


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any
    model_name: str
    max_model_len: int
    metrics: Any = None  # EngineMetrics
    api_key: str | None = None
    default_max_tokens: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = True
    in_flight: int = 0  # API requests being served at the HTTP layer (streams included); the engine counts its own
    max_body_bytes: int = 16 * 2**20  # larger /v1 request bodies get 413
    body_timeout_s: float = 30.0  # a /v1 request body that takes longer to arrive gets 408
    extra_info: dict[str, Any] = field(default_factory=dict)

    @property
    def draining(self) -> bool:
        """One owner for the drain flag: the engine (`AsyncEngine.begin_drain`)."""
        return self.engine.draining

    def count_error(self, code: int) -> None:
        if self.metrics is not None:
            self.metrics.request_error(code)
