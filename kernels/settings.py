"""The kernels' environment settings, read once when `dsv4.kernels` is first imported (process start-up), not on
every kernel call.

- `DSV4_KERNEL_BACKEND`: auto (default) | torch | triton (see `dispatch.choose_backend`).
- `TRITON_INTERPRET`: truthy -> the Triton interpreter for "auto" and "triton" (Triton's own switch).

Code that changes these variables in a running process (tests) calls `refresh()` afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

BACKEND_ENV = "DSV4_KERNEL_BACKEND"
INTERPRET_ENV = "TRITON_INTERPRET"
BACKEND_CHOICES = ("auto", "torch", "triton")
_TRUE = {"1", "true", "on", "yes"}


@dataclass(frozen=True)
class KernelSettings:
    backend: str = "auto"  # as written in the environment (lower-cased); checked by dispatch.choose_backend
    interpret: bool = False  # TRITON_INTERPRET truthy

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelSettings:
        env = os.environ if environ is None else environ
        return cls(backend=(env.get(BACKEND_ENV) or "auto").strip().lower(),
                   interpret=env.get(INTERPRET_ENV, "").strip().lower() in _TRUE)


_current = KernelSettings.from_env()


def current() -> KernelSettings:
    """The settings read at start-up (or at the last `refresh()`)."""
    return _current


def refresh() -> KernelSettings:
    """Re-read the environment; returns the new settings."""
    global _current
    _current = KernelSettings.from_env()
    return _current
