"""Weights kept in their checkpoint format in memory, dequantised on the fly per use (torch reference path).

* `FP8Linear` (`FP8RowParallelLinear` for TP's row-parallel `wo_b`): e4m3 `qweight` [out, in] + UE8M0
  exponent bytes `scale` [ceil(out/128), ceil(in/128)];
  `weight` is the dequantised matrix in the model's dtype; `forward` = `dispatch.fp8_block_gemm` (torch:
  `F.linear(x, weight)`; CUDA: the Triton block-scaled GEMM, dequantising tiles in registers).
* `quantize_experts(experts)`: the stacked routed experts keep packed e2m1 codes `wK_q` [E, out, in/2] (uint8,
  low nibble = even column) + UE8M0 `wK_s` [E, out, in/32]; `Experts.matrix(name, e)` dequantises one expert and
  `Experts.forward` runs the torch loop over experts, or on CUDA `dispatch.mxfp4_grouped_gemm` (Triton).

Dequantising with `checkpoint/quant.dequantize` and rounding to the model dtype is exactly what the
dequantise-at-load path stores, so on the torch path both compute with identical weights
(`tests/test_model_quantized.py`); the Triton kernels differ only by fp32 summation order
(`tests/test_kernels_quant_gemm.py`).
"""

from __future__ import annotations

import math

import torch
from dsv4.kernels import dispatch
from dsv4.runtime.checkpoint.quant import BLOCK, FP4_BLOCK, dequantize
from torch import nn


class FP8Linear(nn.Module):
    """A bias-free linear layer whose weight stays FP8 e4m3 with 128x128 UE8M0 block scales."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device | str = "meta"):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                    device=device))
        self.register_buffer("scale", torch.empty(math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK),
                                                  dtype=torch.uint8, device=device))

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, (self.out_features, self.in_features), "FP8Linear").to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.fp8_block_gemm(x, self.qweight, self.scale)


class FP8RowParallelLinear(FP8Linear):
    """`parallel/shard.RowParallelLinear` with the weight kept FP8: y = all_reduce(x_k · W_kᵀ)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, pg: object,
                 device: torch.device | str = "meta"):
        super().__init__(in_features, out_features, dtype, device)
        self.pg = pg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = super().forward(x)
        dist.all_reduce(y, group=self.pg)
        return y


def quantize_experts(experts: nn.Module) -> None:
    """Replace the stacked bf16/fp32 expert parameters by FP4 code and scale buffers (on the parameters' device,
    meta before materialisation)."""
    for name in ("w1", "w2", "w3"):
        p = getattr(experts, name)
        n, out_f, in_f = p.shape
        delattr(experts, name)
        experts.register_buffer(name + "_q", torch.empty(n, out_f, in_f // 2, dtype=torch.uint8, device=p.device))
        experts.register_buffer(name + "_s", torch.empty(n, out_f, math.ceil(in_f / FP4_BLOCK), dtype=torch.uint8,
                                                         device=p.device))
    experts.dtype = p.dtype
