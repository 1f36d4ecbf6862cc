"""CPU, memory and disk of a runtime pod, from its plan (pure): requests, limits, and the QoS class they give.

Host memory of one pod = the processes (the server with its tokenizer, and one process per rank — TP or DP:
Python, torch, the CUDA context's host side) + the loader's peak (each rank stages its share of the checkpoint
through host memory, a bounded buffer at a time) + on `cpu` the weights and the KV cache themselves (they live
in host memory there; with data-parallel ranks every rank process holds its weights and a copy of its DP rank's
cache, TP inside a rank included)
+ on `cpu` each rank's step working set (`runtime/malloc_tuning.serving_working_set_bytes`: one step's
temporaries and the bounded free heap kept for the next, which on an accelerator live in device memory).
The memory-backed `/dev/shm` (NCCL, torch tensors shared between ranks) counts toward the container's memory
limit, so the limit is the request plus its size.

QoS: **Burstable** by design: a memory limit above the request (room for /dev/shm) and no CPU limit (a CPU
limit throttles the scheduler and tokenizer threads in the middle of a step, which shows as latency spikes).
`placement.resources` entries replace the computed ones key by key; equal cpu and memory requests and limits
make the pod Guaranteed.

Ephemeral storage (the `/tmp` emptyDir and the logs) is requested and limited at the same size, so the
scheduler places the pod where the disk is and a runaway cache evicts the pod instead of filling the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsv4.operator.api import DSV4EndpointSpec
from dsv4.operator.planner import Plan
from dsv4.runtime.malloc_tuning import serving_working_set_bytes

GIB = 1 << 30
SHM_GIB = 16                # the /dev/shm emptyDir's sizeLimit
TMP_GIB = 4                 # the /tmp emptyDir's sizeLimit: HOME, compile caches (Triton, inductor)
LOGS_GIB = 1                # the container's logs (the root filesystem is read-only: no writable layer to speak of)
SERVER_GIB = 4              # the server process: Python, torch, the HTTP server, the tokenizer
RANK_GIB = 2                # each further rank's process (TP or DP)
LOADER_BUFFER_GIB = 4       # what one rank holds in host memory while loading its share of the weights
CPU_PER_RANK = 1
CPU_SERVER = 2


@dataclass(frozen=True)
class PodResources:
    requests: dict[str, str]
    limits: dict[str, str]
    qos: str                                   # Guaranteed, Burstable or BestEffort
    reasons: dict[str, str] = field(default_factory=dict)


def _gib(n: float) -> str:
    return f"{math.ceil(n)}Gi"


def cpu_working_set_gib(ranks: int) -> float:
    """Host memory the ranks of a CPU replica hold beyond weights and KV cache while serving (GiB)."""
    return ranks * serving_working_set_bytes() / GIB


def qos_class(requests: dict[str, str], limits: dict[str, str]) -> str:
    """The QoS class Kubernetes gives one container with these cpu/memory requests and limits."""
    keys = ("cpu", "memory")
    if not any(k in requests or k in limits for k in keys):
        return "BestEffort"
    guaranteed = all(k in limits and requests.get(k, limits[k]) == limits[k] for k in keys)
    return "Guaranteed" if guaranteed else "Burstable"


def pod_resources(spec: DSV4EndpointSpec, plan: Plan) -> PodResources:
    tp = plan.gpus_per_replica  # ranks (processes), TP or DP
    dp = plan.data_parallel_size
    on_cpu = spec.accelerator.type == "cpu"
    processes = SERVER_GIB + RANK_GIB * (tp - 1)
    loader = tp * min(LOADER_BUFFER_GIB, plan.weight_bytes_per_gpu / GIB)
    # data-parallel ranks: every GPU (rank process) holds its own weights and, with TP inside a rank, its own copy
    # of the rank's cache (the single K=V head is not split)
    weights = plan.weight_bytes if dp == 1 else tp * plan.weight_bytes_per_gpu
    caches = 1 if dp == 1 else tp
    resident = (weights + caches * plan.cache_bytes_per_gpu) / GIB if on_cpu else 0.0
    working = cpu_working_set_gib(tp) if on_cpu else 0.0
    memory = processes + loader + resident + working
    cpu = CPU_SERVER + CPU_PER_RANK * tp
    reasons = {
        "memory": (f"processes {processes} GiB (server + tokenizer {SERVER_GIB}, {tp - 1} more ranks x {RANK_GIB}) + "
                   f"loader {loader:.1f} GiB ({tp} ranks x min({LOADER_BUFFER_GIB} GiB, their weight share))"
                   + (f" + weights and KV cache in host memory {resident:.1f} GiB + step working set "
                      f"{working:.2f} GiB ({tp} ranks)" if on_cpu else "")),
        "memoryLimit": f"request + /dev/shm {SHM_GIB} GiB (a memory-backed emptyDir counts toward the limit)",
        "cpu": f"{CPU_SERVER} for the server and tokenizer + {CPU_PER_RANK} per rank; no CPU limit (no throttling)",
        "ephemeral-storage": f"/tmp {TMP_GIB} GiB + logs {LOGS_GIB} GiB, request = limit (evicted, not the node, "
                             "when compile caches outgrow it)",
    }
    disk = _gib(TMP_GIB + LOGS_GIB)
    requests = {"cpu": str(cpu), "memory": _gib(memory), "ephemeral-storage": disk}
    limits = {"memory": _gib(memory + SHM_GIB), "ephemeral-storage": disk}
    extra = spec.placement.resources if spec.placement and spec.placement.resources else None
    if extra is not None:
        requests.update(extra.requests or {})
        limits.update(extra.limits or {})
        reasons["overrides"] = "placement.resources replaces the computed values key by key"
    qos = qos_class(requests, limits)
    reasons["qos"] = (f"{qos}: " + ("requests equal limits" if qos == "Guaranteed" else
                                    "memory limit above the request for /dev/shm, no CPU limit"))
    return PodResources(requests, limits, qos, reasons)
