"""Each TP rank loads only its shard: `load_checkpoint(..., shard=TPShard(rank, world))` equals loading the whole
model and cutting it with `shard_model`, tensor for tensor, for the published (FP8/FP4, block-unaligned head
slices) and Hugging Face layouts, with whole-group and split-group `wo_a`; and it reads a fraction of the bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dsv4.runtime.checkpoint.loader import TPShard, load_checkpoint
from dsv4.runtime.checkpoint.published import write_published_checkpoint
from dsv4.runtime.checkpoint.random_init import random_tensors, write_random_checkpoint
from dsv4.runtime.parallel.shard import shard_model

from tests.model_utils import tiny_configs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cfg = dataclasses.replace(tiny_configs()["mix"], n_routed_experts=8)
    root = tmp_path_factory.mktemp("tpload")
    write_published_checkpoint(cfg, random_tensors(cfg, seed=5), root / "published", max_shard_bytes=120_000)
    write_random_checkpoint(cfg, root / "hf", seed=5)
    return cfg, root


@pytest.mark.parametrize("layout", ["published", "hf"])
@pytest.mark.parametrize("world", [2, 4], ids=["tp2-whole-groups", "tp4-split-groups"])
def test_rank_load_equals_full_load_then_shard(checkpoints, layout, world):
    cfg, root = checkpoints
    path = root / layout
    full_bytes = None
    for rank in range(world):
        ref, _ = load_checkpoint(path, dtype="float32", progress=False)
        full_bytes = ref.load_stats["bytes_read"]
        shard_model(ref, cfg, rank, world, None)
        got, _ = load_checkpoint(path, dtype="float32", progress=False, shard=TPShard(rank, world))
        a, b = ref.state_dict(), got.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (rank, k)
        assert got.load_stats["bytes_read"] < full_bytes
        assert got.load_stats["files_opened"] == len({p.name for p in path.glob("*.safetensors")})


def test_progress_bar_reports_bytes_and_tensors_per_second(checkpoints, capfd):
    cfg, root = checkpoints
    load_checkpoint(root / "published", dtype="float32", progress=True, shard=TPShard(1, 2))
    err = capfd.readouterr().err
    assert "loading weights" in err and "B/s" in err and "tensors, " in err and "/s" in err


@pytest.mark.parametrize("layout", ["published", "hf"])
def test_without_mtp_the_main_model_is_the_same_and_the_mtp_bytes_are_not_read(checkpoints, layout, caplog):
    """What `dsv4 serve` loads (`with_mtp=False`: the MTP block is not run): every main-model tensor equal to a
    full load, no MTP module, fewer bytes read, one log line naming what was left out."""
    _, root = checkpoints
    full, _ = load_checkpoint(root / layout, dtype="float32", progress=False)
    with caplog.at_level("INFO", logger="dsv4.checkpoint"):
        lean, _ = load_checkpoint(root / layout, dtype="float32", progress=False, with_mtp=False)
    assert len(full.mtp) == 1 and len(lean.mtp) == 0
    a, b = full.state_dict(), lean.state_dict()
    assert sorted(b) == sorted(k for k in a if not k.startswith("mtp."))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert lean.load_stats["bytes_read"] < full.load_stats["bytes_read"]
    assert "not loading the MTP block" in caplog.text


def test_a_rank_load_does_not_import_sympy(checkpoints):
    """Cutting and materialising the meta model must not go through torch._refs (its first use imports sympy:
    ~0.5 s of every cold start, more than the reads of a few hundred MB)."""
    import subprocess
    import sys

    _, root = checkpoints
    code = ("import sys; from dsv4.runtime.checkpoint.loader import TPShard, load_checkpoint; "
            f"load_checkpoint({str(root / 'published')!r}, progress=False, shard=TPShard(0, 2), "
            "weights_dtype='checkpoint'); print('sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
