"""Issue 17: the planner's weight bytes per GPU (`operator/weights.weight_bytes_per_gpu`) equal what a TP rank
actually holds after loading a published-layout checkpoint with the weights kept as stored, byte for byte.

The tiny dims are 128-aligned where a rank's FP8 slice starts (query heads, `wo_a` groups, shared-expert width), as
they are in the released models, so every FP8 part keeps its block scales (an unaligned slice is dequantised at
load: `loader._block_aligned`). The only tensors of the model that are not weights are the two rope frequency
tables (`inv_freq_*`, non-persistent buffers computed from the config); every other parameter and buffer counts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dsv4.operator import weights as W
from dsv4.runtime.checkpoint.loader import TPShard, load_checkpoint
from dsv4.runtime.checkpoint.published import write_published_checkpoint
from dsv4.runtime.checkpoint.random_init import random_tensors

from tests.model_utils import tiny_configs

NOT_WEIGHTS = ("inv_freq_main", "inv_freq_compress")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    cfg = dataclasses.replace(tiny_configs()["mix"], n_routed_experts=8, head_dim=128, o_lora_rank=128,
                              moe_intermediate_size=256, torch_dtype="bfloat16")
    path = tmp_path_factory.mktemp("held") / "published"
    write_published_checkpoint(cfg, random_tensors(cfg, seed=3), path, max_shard_bytes=400_000)
    return cfg, path


def held_bytes(model: torch.nn.Module) -> tuple[int, dict[str, int]]:
    """Bytes of every parameter and buffer except the rope tables, and the same per dtype."""
    total, per_dtype = 0, {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in NOT_WEIGHTS:
            continue
        n = t.numel() * t.element_size()
        total += n
        per_dtype[str(t.dtype)] = per_dtype.get(str(t.dtype), 0) + n
    return total, per_dtype


@pytest.mark.parametrize("world", [1, 2])
def test_planner_bytes_per_gpu_equal_what_each_rank_holds(published, world):
    cfg, path = published
    for rank in range(world):
        model, loaded_cfg = load_checkpoint(path, progress=False, shard=TPShard(rank, world),
                                            weights_dtype="checkpoint", with_mtp=False)
        want = W.weight_bytes_per_gpu(loaded_cfg, world, "fp8-fp4")  # the config.json the operator reads
        got, per_dtype = held_bytes(model)
        # kept quantised: FP8 codes, FP4 packed codes + E8M0 scales (uint8), hash tables; bf16; fp32 norms/mHC/sinks
        assert {"torch.float8_e4m3fn", "torch.uint8", "torch.bfloat16", "torch.float32"} <= set(per_dtype)
        assert got == want, (world, rank, got, want, per_dtype)


@pytest.mark.parametrize("world", [2, 4])
def test_planner_bytes_per_gpu_equal_what_each_ep_rank_holds(published, world):
    """Expert parallelism (`dsv4 serve --dp N --ep`): each rank holds 1/N of the routed experts and every other
    tensor whole; the planner's `weight_bytes_per_gpu_ep` is what the loader's `mode="ep"` rank holds."""
    cfg, path = published
    for rank in range(world):
        model, loaded_cfg = load_checkpoint(path, progress=False, shard=TPShard(rank, world, mode="ep"),
                                            weights_dtype="checkpoint", with_mtp=False)
        got, per_dtype = held_bytes(model)
        want = W.weight_bytes_per_gpu_ep(loaded_cfg, world, "fp8-fp4")
        assert got == want, (world, rank, got, want, per_dtype)
        assert want > W.weight_bytes_per_gpu(loaded_cfg, world, "fp8-fp4")  # TP splits more than the experts


@pytest.mark.parametrize(("dp", "tp"), [(2, 2)])
def test_planner_bytes_per_gpu_equal_what_each_dp_tp_rank_holds(published, dp, tp):
    """TP inside data-parallel ranks (`dsv4 serve --dp 2 --tp 2 --ep`): experts over all dp x tp ranks, the rest cut
    by the rank's TP group; `weight_bytes_per_gpu_dp_tp` is what each of the four loaded ranks holds."""
    cfg, path = published
    for rank in range(dp * tp):
        model, loaded_cfg = load_checkpoint(path, progress=False, shard=TPShard(rank, dp * tp, mode="ep", tp=tp),
                                            weights_dtype="checkpoint", with_mtp=False)
        got, per_dtype = held_bytes(model)
        assert got == W.weight_bytes_per_gpu_dp_tp(loaded_cfg, dp, tp, "fp8-fp4"), (rank, got, per_dtype)


def test_the_served_model_leaves_the_mtp_block_out_of_the_bytes_per_gpu(published):
    """The planner counts what `dsv4 serve` loads: a full load (MTP included) holds more than its figure."""
    cfg, path = published
    model, loaded_cfg = load_checkpoint(path, progress=False, weights_dtype="checkpoint")
    full = held_bytes(model)[0]
    assert len(model.mtp) == 1 and full > W.weight_bytes_per_gpu(loaded_cfg, 1, "fp8-fp4")
    # the full model holds more than the files by the norms alone: bf16 in the files, fp32 in memory
    assert full > W.weight_bytes(loaded_cfg)


def test_replicated_parts_do_not_divide(published):
    cfg, _ = published
    one, two = W.weight_bytes_per_gpu(cfg, 1), W.weight_bytes_per_gpu(cfg, 2)
    assert one / 2 < two < one
