"""Keep freed heap memory for reuse when the model runs on the CPU (glibc `mallopt`).

PyTorch's CPU allocator takes every tensor from malloc. glibc's defaults serve big blocks with a fresh
`mmap` and give heap memory back to the kernel once the free top of the heap passes `M_TRIM_THRESHOLD`
(both adapt, up to 32 / 64 MiB). A long-context step allocates temporaries that grow with the context
(the [tokens x compressed entries] tables are 16 MiB per 512-token chunk at 16K), so each step's sizes are
new, the freed memory is trimmed, and the next step faults its pages in again, zeroed by the kernel: 27 % of
a 16K prefill was kernel time (`/usr/bin/time dsv4 bench scaling --contexts 16K --no-reference`: sys 5.5 s
of 20.3 s).

`keep_freed_memory()` serves every block from the heap (no per-block mmap), keeps up to 2 GiB of free heap
top instead of trimming it, and grows the heap 64 MiB at a time, so a step reuses what the previous one
freed. Measured on `dsv4 bench scaling --contexts 16K --no-reference` (one torch thread): prefill 16.1 ->
11.5 s, sys 5.5 -> 0.5 s, peak RSS 1.01 -> 1.14 GB; at 64K the prefill took 62.5 s against 97-115 s before
(docs/benchmarks.md). Fixing the mmap threshold at its 32 MiB maximum instead (blocks above it still
mapped) gave 13.1-13.5 s at 16K (sys 2.4-2.6 s). A server keeps its
peak heap anyway (KV pools plus one step's temporaries). Only the CPU path needs this: on an accelerator
the big tensors live in the device allocator's cache.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("dsv4.malloc")

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
SETTINGS = (
    (M_MMAP_MAX, 0),  # no block gets its own mmap: all come from (and return to) the heap
    (M_TRIM_THRESHOLD, 2**31 - 1),  # mallopt takes an int: keep up to 2 GiB of free heap top
    (M_TOP_PAD, 64 * 2**20),  # grow the heap 64 MiB at a time (fewer brk calls)
)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply SETTINGS once per process. True where they took effect (glibc), False elsewhere (musl, macOS,
    Windows: no `mallopt`, or one that accepts none of them)."""
    global _applied
    if _applied is not None:
        return _applied
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        _applied = False
    else:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _applied = all([mallopt(param, value) == 1 for param, value in SETTINGS])
    log.debug("malloc: keep freed memory for reuse: %s", "on" if _applied else "not available here")
    return _applied
