"""Reuse freed heap memory on the CPU, up to a bound (glibc `mallopt` / `malloc_trim`).

PyTorch's CPU allocator takes every tensor from malloc. glibc's defaults serve big blocks with a fresh
`mmap` and give heap memory back to the kernel once the free top of the heap passes `M_TRIM_THRESHOLD`
(both adapt, up to 32 / 64 MiB). A long-context step allocates temporaries that grow with the context
(the [tokens x compressed entries] tables are 16 MiB per 512-token chunk at 16K), so each step's sizes are
new, the freed memory is trimmed, and the next step faults its pages in again, zeroed by the kernel: 27 % of
a 16K prefill was kernel time (`/usr/bin/time dsv4 bench scaling --contexts 16K --no-reference`: sys 5.5 s
of 20.3 s).

`keep_freed_memory()` serves every block from the heap (no per-block mmap) and grows the heap 64 MiB at a
time, so a step reuses what the previous one freed: 16K prefill 16.1 -> 11.5 s, sys 5.5 -> 0.5 s
(docs/benchmarks.md). Fixing the mmap threshold at its 32 MiB maximum instead (blocks above it still mapped)
gave 13.1-13.5 s at 16K (sys 2.4-2.6 s).

**Bound.** The free heap top kept is capped at `RETAINED_HEAP_BYTES` (`M_TRIM_THRESHOLD`; it used to be
2 GiB, so a server kept its worst step's temporaries for good), and `trim_free_heap()` (`malloc_trim`)
hands every free page back — `dsv4 serve` calls it whenever its engine goes idle. Together with the
blocked attention gathers (`kernels/prefix_gemm.py`) this bounds a CPU server's working set above weights and
KV cache: `serving_working_set_bytes()`, which the operator's memory request adds (operator/pod_resources.py).
`DSV4_RETAINED_HEAP_MIB` overrides the cap (`unbounded`: the former 2 GiB setting and no idle trim, for
before/after comparisons). Only the CPU path needs this: on an accelerator the big tensors live in the
device allocator's cache.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("dsv4.malloc")

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
MiB = 2**20
RETAINED_HEAP_BYTES = 256 * MiB  # free heap kept for the next step's temporaries
UNBOUNDED_BYTES = 2**31 - 1  # mallopt takes an int: the former setting, 2 GiB of free heap top
TOP_PAD_BYTES = 64 * MiB  # grow the heap 64 MiB at a time (fewer brk calls)
ENV_RETAINED = "DSV4_RETAINED_HEAP_MIB"
# One step's live temporaries above the ready server (attention gathers blocked at 32 MiB; the rest scales
# with the step's tokens x hidden size). Measured: 0.36 GiB peak above the ready RSS, retained heap included,
# at 2,048-token steps on the 100 M-parameter model (docs/benchmarks.md "Memory of the serving process").
STEP_WORKING_SET_BYTES = 768 * MiB


def retained_heap_bytes(env: dict[str, str] | None = None) -> int | None:
    """The cap on free heap kept, from `DSV4_RETAINED_HEAP_MIB` (default RETAINED_HEAP_BYTES); None = unbounded."""
    raw = (os.environ if env is None else env).get(ENV_RETAINED, "").strip().lower()
    if not raw:
        return RETAINED_HEAP_BYTES
    if raw == "unbounded":
        return None
    try:
        mib = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_RETAINED} must be a whole number of MiB or 'unbounded', got {raw!r}") from None
    if not 0 <= mib < UNBOUNDED_BYTES // MiB:
        raise ValueError(f"{ENV_RETAINED} must be in [0, {UNBOUNDED_BYTES // MiB}) MiB, got {mib}")
    return mib * MiB


def serving_working_set_bytes() -> int:
    """What a CPU `dsv4 serve` rank holds at its peak beyond the ready process (weights, KV pools, Python,
    torch): one step's temporaries and the free heap it keeps. The operator's memory request adds it."""
    return STEP_WORKING_SET_BYTES + RETAINED_HEAP_BYTES + TOP_PAD_BYTES  # glibc keeps the pad above the cap


def settings(retained: int | None) -> tuple[tuple[int, int], ...]:
    """The mallopt (param, value) pairs for a retained-heap cap (None: unbounded)."""
    return (
        (M_MMAP_MAX, 0),  # no block gets its own mmap: all come from (and return to) the heap
        (M_TRIM_THRESHOLD, UNBOUNDED_BYTES if retained is None else retained),
        (M_TOP_PAD, TOP_PAD_BYTES),
    )


_applied: bool | None = None
_bounded = False


def keep_freed_memory() -> bool:
    """Apply `settings(retained_heap_bytes())` once per process. True where they took effect (glibc), False
    elsewhere (musl, macOS, Windows: no `mallopt`, or one that accepts none of them)."""
    global _applied, _bounded
    if _applied is not None:
        return _applied
    retained = retained_heap_bytes()
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        _applied = False
    else:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _applied = all([mallopt(param, value) == 1 for param, value in settings(retained)])
    _bounded = bool(_applied) and retained is not None
    log.debug("malloc: keep freed memory for reuse: %s (retained heap %s)", "on" if _applied else "not available",
              "unbounded" if retained is None else f"{retained // MiB} MiB")
    return _applied


def trim_free_heap() -> bool:
    """Give every free heap page back to the kernel (`malloc_trim(0)`, all arenas) where the bound is on.
    True when memory was released."""
    if not _bounded:
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError, TypeError):
        return False
