"""Run a function on several threads at once and collect what they raised (tests of thread-safety)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def errors_in_threads(fn: Callable[[], object], threads: int) -> list[BaseException]:
    """Start `threads` threads running `fn`, wait for all; the exceptions they raised (empty: none)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return errors
