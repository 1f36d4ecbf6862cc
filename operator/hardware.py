"""Accelerator presets: memory, HBM bandwidth and dense FP8 throughput per GPU.

Memory is what `nvidia-smi` reports as total (H100 SXM 81559 MiB, H200 143771 MiB, B200 183359 MiB);
bandwidth and FP8 dense TFLOP/s are the vendor's SXM figures. The planner uses bandwidth for the
decode-step estimate and FLOP/s (at `MFU`) for the prefill-rate estimate.

`interconnect_bytes_per_s` is what one GPU can receive from its peers in the node, one direction: NVLink 4
(H100/H200 SXM) is 900 GB/s bidirectional per GPU, so 450 GB/s each way; NVLink 5 (B200) 1.8 TB/s, so 900 GB/s.
The planner charges a decode step its collectives at this rate: the TP group's all-reduces and the expert-parallel
token exchange (`planner.exchange_bytes_per_layer`); `cpu` assumes ~5 GB/s for gloo over loopback.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
GIB = 1 << 30
MFU = 0.4  # fraction of peak FLOP/s a prefill step reaches
MBU = 0.7  # fraction of peak HBM bandwidth a decode step reaches


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    fp8_flops: float  # dense FP8 FLOP/s
    interconnect_bytes_per_s: float  # GPU-to-GPU in the node, one direction (NVLink)
    reserve_bytes: int = 2 * GIB  # fixed runtime overhead (CUDA context, workspaces) besides activations

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


PRESETS: dict[str, Accelerator] = {
    "H100": Accelerator("H100", 81559 * MIB, 3.35e12, 989e12, 450e9),
    "H200": Accelerator("H200", 143771 * MIB, 4.8e12, 989e12, 450e9),
    "B200": Accelerator("B200", 183359 * MIB, 8.0e12, 2250e12, 900e9),
    "B200-192": Accelerator("B200-192", 192 * GIB, 8.0e12, 2250e12, 900e9),
    # no GPU (test clusters, the tiny model): a modest host budget and host-like speeds
    "cpu": Accelerator("cpu", 8 * GIB, 20e9, 1e12, 5e9, reserve_bytes=256 * MIB),
}


def accelerator(kind: str, memory_gib: float | None = None) -> Accelerator:
    """The preset for `kind`, with memory replaced by `memory_gib` when given ("custom" needs it;
    custom GPUs take H200 bandwidth and FLOP/s as a stand-in)."""
    if kind == "custom":
        if memory_gib is None:
            raise ValueError("accelerator.memoryGiB is required when accelerator.type is custom")
        base = PRESETS["H200"]
        return Accelerator("custom", int(memory_gib * GIB), base.hbm_bytes_per_s, base.fp8_flops,
                           base.interconnect_bytes_per_s)
    try:
        base = PRESETS[kind]
    except KeyError:
        raise ValueError(f"accelerator.type must be one of {sorted(PRESETS) + ['custom']}, got {kind!r}") from None
    if memory_gib is None:
        return base
    return Accelerator(base.name, int(memory_gib * GIB), base.hbm_bytes_per_s, base.fp8_flops,
                       base.interconnect_bytes_per_s, base.reserve_bytes)
