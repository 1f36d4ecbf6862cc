"""Host-RAM guard for CPU serving: the KV cache pools must fit in the memory the machine actually has.

On CPU the pools live in host RAM next to the weights. A budget sized for an accelerator (the planner gives an
H200 replica ~124 GiB of cache) would make `torch.zeros` try to take more than the machine has, and the
process would be OOM-killed or swap to a halt. Rule, with A = available host memory at start-up and
f = `host_memory_fraction` (default 0.5):

    budget mode (cache_budget_gib / default):  budget' = min(budget, f * A)      (clamped, with a warning)
    fixed blocks (num_blocks):                 sum_p blocks_p * bytes_per_block_p <= f * A, else refuse

Pure functions; `build_engine` calls them with psutil's figure.
"""

from __future__ import annotations

from typing import Any

from dsv4.runtime.cache.pools import blocks_of

GiB = 2**30


def host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def pools_bytes(spec: Any, num_blocks: dict[str, int]) -> int:
    """Bytes of every pool for these block counts (`idx` shares the `csa` block count)."""
    total = 0
    for name, ps in spec.pools.items():
        nb = int(blocks_of(num_blocks, name, 0))
        total += nb * int(ps.bytes_per_block)
    return total


def clamp_cpu_budget(budget: int, available: int, fraction: float) -> tuple[int, str | None]:
    """(budget to use, warning or None). Never more than `fraction` of the available host memory."""
    limit = int(available * fraction)
    if budget <= limit:
        return budget, None
    return limit, (f"cache budget {budget / GiB:.2f} GiB exceeds host_memory_fraction {fraction:g} of the "
                   f"{available / GiB:.2f} GiB of available host memory on CPU: clamped to {limit / GiB:.2f} GiB "
                   f"(serving on CPU; set --cache-budget-gib or --host-memory-fraction to choose)")


def check_cpu_blocks(total_bytes: int, available: int, fraction: float) -> str | None:
    """An error message when fixed block counts need more than `fraction` of the available host memory."""
    limit = int(available * fraction)
    if total_bytes <= limit:
        return None
    return (f"num_blocks needs {total_bytes / GiB:.2f} GiB of cache pools, more than host_memory_fraction "
            f"{fraction:g} of the {available / GiB:.2f} GiB of available host memory ({limit / GiB:.2f} GiB) on "
            f"CPU; lower num_blocks or use cache_budget_gib")
