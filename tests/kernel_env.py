"""`kernel_env`: set or unset the kernels' environment variables for a block of a test, with the settings the
kernels read once at start-up re-read on the way in and again after the variables are restored."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from dsv4.kernels import settings


@contextmanager
def kernel_env(values: dict[str, str | None]) -> Iterator[settings.KernelSettings]:
    """`values`: variable -> value, or None to unset it."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in values.items():
                if value is None:
                    mp.delenv(name, raising=False)
                else:
                    mp.setenv(name, value)
            yield settings.refresh()
    finally:
        settings.refresh()
