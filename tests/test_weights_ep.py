"""Weight bytes per GPU of an expert-parallel rank (`dsv4 serve --dp N --ep`), from the published inventory, against
a hand count from the config's shapes: only the routed experts of the main layers are split over the ranks; the
shared expert, attention, embedding and head stay on every rank; the MTP block is not loaded by `dsv4 serve`."""

from __future__ import annotations

import pytest
from dsv4.operator import weights as W
from dsv4.runtime.config import ModelConfig, flash, pro, tiny

# bytes per routed-expert element as stored: FP4 e2m1 two per byte + one UE8M0 scale byte per 32 values; FP8 e4m3
# + one UE8M0 scale byte per 128x128 block; bf16 two bytes
_EXPERT_ELEMENT = {"fp8-fp4": 0.5 + 1 / 32, "fp8": 1 + 1 / (128 * 128), "bf16": 2.0}


def main_layer_expert_bytes(cfg: ModelConfig, quantization: str) -> float:
    """Hand count: num_hidden_layers x E experts x (w1, w3: I x H; w2: H x I) x bytes per element."""
    per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size
    return cfg.num_hidden_layers * cfg.n_routed_experts * per_expert * _EXPERT_ELEMENT[quantization]


@pytest.mark.parametrize("make", [tiny, flash, pro], ids=["tiny", "flash", "pro"])
@pytest.mark.parametrize("quantization", ["fp8-fp4", "bf16"])
def test_ep_rank_holds_its_share_of_the_main_layer_experts_and_everything_else_whole(make, quantization) -> None:
    cfg = make()
    whole = W.weight_bytes_per_gpu_ep(cfg, 1, quantization)
    assert whole == W.weight_bytes_per_gpu(cfg, 1, quantization)  # one rank holds everything
    experts = main_layer_expert_bytes(cfg, quantization)
    for dp in (2, 4, 8):
        if cfg.n_routed_experts % dp:
            continue
        held = W.weight_bytes_per_gpu_ep(cfg, dp, quantization)
        assert held == pytest.approx(whole - experts * (1 - 1 / dp), abs=8), dp
        # TP splits more (query heads, output projections, shared expert, vocab): a TP rank holds less
        assert held > W.weight_bytes_per_gpu(cfg, dp, quantization)


def test_pro_over_eight_h200s_as_dp_ep_leaves_almost_no_cache() -> None:
    """The numbers behind the planner's Pro-on-H200 verdict (docs/parallel.md): 822 GB of main-layer experts / 8
    = 102.8 GB + 28.7 GB whole on every rank (attention 20.6, shared expert 4.0, embedding + head 3.7; the MTP
    block, 14 GB, is not loaded) is 131.5 GB per rank, next to the 135.7 GB usable of a 141 GB H200 at 90 %;
    TP8 holds 109.5 GB."""
    cfg = pro()
    experts = main_layer_expert_bytes(cfg, "fp8-fp4")
    assert experts == pytest.approx(822.0e9, rel=1e-3)
    assert W.weight_bytes_per_gpu_ep(cfg, 8) == pytest.approx(experts / 8 + 28.65e9, rel=1e-3)
    assert W.weight_bytes_per_gpu_ep(cfg, 8) == pytest.approx(131.45e9, rel=1e-3)
    assert W.weight_bytes_per_gpu(cfg, 8) == pytest.approx(109.46e9, rel=1e-3)


def test_ep_decode_reads_the_rank_experts_touched_by_every_rank_tokens() -> None:
    cfg = flash()
    dense_and_head = W.decode_weight_bytes(cfg, "fp8-fp4", 1) - W.param_counts(cfg).routed * (0.5 + 1 / 32) * (
        1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts))
    for dp, b in ((2, 1), (8, 4), (8, 64)):
        touched = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** (dp * b)
        want = dense_and_head + W.param_counts(cfg).routed * (0.5 + 1 / 32) / dp * touched
        assert W.decode_weight_bytes_ep(cfg, "fp8-fp4", dp, b) == pytest.approx(want, rel=1e-9)
    # one rank at dp=1 is a TP1 replica
    assert W.decode_weight_bytes_ep(cfg, "fp8-fp4", 1, 16) == W.decode_weight_bytes(cfg, "fp8-fp4", 16)


def _share(name: str, dp: int, tp: int) -> int:
    """How many GPUs of a DP dp x TP tp + EP replica split tensor `name` (read from the model's structure, not from
    `parallel/ownership.py`): main-layer routed experts over all dp x tp GPUs; query heads (`wq_b`, `attn_sink`),
    output projections (`wo_a`, `wo_b`), shared expert, embedding and head over a rank's tp GPUs; everything else
    (K=V head, compressors, indexer, norms, mHC, router) whole on every GPU; the MTP block is not loaded."""
    parts = name.split(".")
    if parts[0] == "layers":
        if parts[2:4] == ["ffn", "experts"]:
            return dp * tp
        if parts[2:4] == ["ffn", "shared_experts"] or (parts[2] == "attn" and parts[3] in ("wq_b", "wo_a", "wo_b",
                                                                                          "attn_sink")):
            return tp
    return tp if name in ("embed.weight", "head.weight") else 1


@pytest.mark.parametrize("make", [tiny, flash, pro], ids=["tiny", "flash", "pro"])
@pytest.mark.parametrize("quantization", ["fp8-fp4", "bf16"])
def test_dp_tp_bytes_equal_the_per_tensor_sum(make, quantization) -> None:
    """weight_bytes_per_gpu_dp_tp = the sum over every held file tensor of its bytes / the GPUs that split it; its
    corners are the TP (dp 1) and EP (tp 1) functions."""
    from fractions import Fraction

    from dsv4.runtime.checkpoint.layout import held_nbytes, published_tensors
    from dsv4.runtime.parallel.ownership import TPConfigError, check_tp

    cfg = make()
    # (name, bytes held) of every file tensor, in the format `quantization` stores it
    held = [(name, held_nbytes(name, dtype, n)) for t in published_tensors(cfg, include_mtp=False)
            for name, dtype, n in W._file_entries(t, quantization)]
    checked = 0
    for tp in (1, 2, 4, 8):
        try:
            check_tp(cfg, tp)
        except TPConfigError:
            continue
        for dp in (1, 2, 4):
            if cfg.n_routed_experts % (dp * tp):
                continue
            want = sum(Fraction(n, _share(name, dp, tp)) for name, n in held)
            got = W.weight_bytes_per_gpu_dp_tp(cfg, dp, tp, quantization)
            if make is tiny:  # its FP8 block scales do not all split evenly at tp 8 (the loader dequantises those)
                assert abs(got - want) < 2, (dp, tp)
            else:
                assert got == want, (dp, tp)
            checked += 1
        assert W.weight_bytes_per_gpu_dp_tp(cfg, 1, tp, quantization) == W.weight_bytes_per_gpu(cfg, tp, quantization)
    assert W.weight_bytes_per_gpu_dp_tp(cfg, 4, 1, quantization) == W.weight_bytes_per_gpu_ep(cfg, 4, quantization)
    assert checked >= 3


def test_pro_layouts_hold_more_per_gpu_the_more_they_replicate() -> None:
    """TP4 inside each of 2 DP ranks splits the heads, shared expert and vocab 4 ways: 112.6 GB of Pro per GPU
    (TP8: 109.5 GB; DP4xTP2: 118.9; DP8+EP: 131.5, which leaves an H200 (135.7 GB usable) under 1 GB of cache
    per GPU after the reserve)."""
    cfg = pro()
    assert W.weight_bytes_per_gpu_dp_tp(cfg, 2, 4) == pytest.approx(112.6e9, rel=1e-3)
    assert (W.weight_bytes_per_gpu(cfg, 8) < W.weight_bytes_per_gpu_dp_tp(cfg, 2, 4)
            < W.weight_bytes_per_gpu_dp_tp(cfg, 4, 2) < W.weight_bytes_per_gpu_ep(cfg, 8))
