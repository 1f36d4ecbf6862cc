"""Data-parallel attention + expert parallelism at the model level, on real gloo ranks: each rank runs its OWN
sequences (different lengths, one rank idle in some steps) through the DP step channel and the MoE token
exchange, and gets the logits the dense model gives for those sequences alone."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from dsv4.runtime.config import tiny
from dsv4.runtime.parallel.ownership import TPConfigError, check_ep

NUM_BLOCKS = 16


def _tables(slot: int) -> dict[str, list[list[int]]]:
    tok = list(range(8 * slot, 8 * slot + 8))
    return {"swa": [tok], "csa_state": [tok], "hca_state": [tok], "csa": [[slot]], "hca": [[slot]]}


def rank_scripts(vocab: int) -> list[list]:
    """Per rank, its steps: (tokens, first position) of one sequence, or None (idle that step)."""
    a = [(7 * i + 3) % vocab for i in range(40)]
    b = [(11 * i + 5) % vocab for i in range(30)]
    s0 = [(a[:24], 0), (a[24:], 24)] + [([(13 * i + 1) % vocab], 40 + i) for i in range(3)]
    s1 = [(b, 0), ([4], 30), None, ([9], 31), None]  # idle in steps 2 and 4
    return [s0, s1]


def _batch(step, slot: int):
    from dsv4.runtime.model import ForwardBatch

    if step is None:
        return None
    return ForwardBatch.build([step], _tables(slot), logits="all")


def dense_logits(model_dir: str) -> list[list[torch.Tensor | None]]:
    from dsv4.runtime.model import KVPools, cache_spec, load_model

    model, cfg, _ = load_model(model_dir, progress=False)
    out = []
    for script in rank_scripts(cfg.vocab_size):
        pools = KVPools.for_model(cfg, cache_spec(cfg, kv_dtype="fp32"), NUM_BLOCKS)
        with torch.inference_mode():
            out.append([None if s is None else model.forward(_batch(s, 0), pools).float() for s in script])
    return out


def _rank_main(rank: int, world: int, tp: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from dsv4.runtime.model import KVPools, cache_spec, load_model
    from dsv4.runtime.parallel.codec import CMD_STEP, CMD_STOP
    from dsv4.runtime.parallel.dp_channel import DPChannel, rank_step
    from dsv4.runtime.parallel.group import init_group, shard_for

    torch.set_num_threads(1)
    info = init_group(rank, world, "127.0.0.1", port, "cpu", 120.0, tp=tp)
    try:
        model, cfg, _ = load_model(model_dir, progress=False, shard=shard_for(info, data_parallel=True))
        assert model.layers[0].ffn.experts.w1.shape[0] == cfg.n_routed_experts // world
        assert model.layers[0].attn.n_heads == cfg.num_attention_heads // tp
        pools = KVPools.for_model(cfg, cache_spec(cfg, kv_dtype="fp32"), NUM_BLOCKS)
        chan = DPChannel(info)
        scripts = rank_scripts(cfg.vocab_size)
        got = []
        with torch.inference_mode():
            if rank == 0:
                for steps in zip(*scripts, strict=True):
                    batches = [_batch(s, 0) for s in steps]
                    header = chan.send(CMD_STEP, batches)
                    got.append(rank_step(model, batches[0], pools, header, info))
                chan.send(CMD_STOP)
                torch.save(got, out)
            else:
                while True:
                    cmd, batch, header = chan.recv()
                    if cmd == CMD_STOP:
                        break
                    assert rank_step(model, batch, pools, header, info) is None
    finally:
        dist.destroy_process_group()


def test_check_ep_names_the_field():
    cfg = tiny()  # 8 routed experts
    for n in (1, 2, 4, 8):
        check_ep(cfg, n)
    with pytest.raises(TPConfigError, match="dp=3 must divide the model's n_routed_experts \\(8\\)"):
        check_ep(cfg, 3)


@pytest.mark.parametrize(("dp", "tp"), [(2, 1), (2, 2)])
def test_each_rank_gets_the_dense_logits_of_its_own_sequences(dp: int, tp: int):
    """dp attention ranks (each a TP group of tp processes when tp > 1), routed experts over all dp x tp."""
    import torch.multiprocessing as mp
    from dsv4.runtime.server.build import ensure_tiny_model
    from dsv4.runtime.server.config import default_model_dir
    from dsv4.runtime.server.launch import free_port

    model_dir = str(default_model_dir())
    ensure_tiny_model(model_dir)
    dense = dense_logits(model_dir)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "logits.pt")
        mp.start_processes(_rank_main, args=(dp * tp, tp, free_port(), model_dir, out), nprocs=dp * tp, join=True,
                           start_method="fork")
        got = torch.load(out)
    assert len(got) == len(dense[0])
    for step, per_rank in enumerate(got):
        assert len(per_rank) == dp
        for r in range(dp):
            want = dense[r][step]
            if want is None:  # the idle rank sent no rows
                assert per_rank[r].shape[0] == 0, (step, r)
                continue
            assert per_rank[r].shape == want.shape, (step, r)
            diff = float((per_rank[r] - want).abs().max())
            assert diff < 1e-4, f"step {step} rank {r}: max |ep - dense| = {diff:.3g}"
