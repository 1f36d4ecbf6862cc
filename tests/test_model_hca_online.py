"""The online-softmax single-slot HCA state (`runtime/model/hca_online.py`) gives the same compressed entries
as pooling the raw tail rows (`Compressor.pool`, the model's path), for any chunking, to 1e-5 in fp32."""

from __future__ import annotations

import math

import pytest
import torch
from dsv4.runtime.checkpoint.random_init import write_random_checkpoint
from dsv4.runtime.model import load_model
from dsv4.runtime.model.attention import Compressor
from dsv4.runtime.model.hca_online import empty_state, fold_chunk
from dsv4.runtime.model.rope import apply_rope, cos_sin
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.model_utils import PagedRunner, one_thread, tiny_configs

HIDDEN, DIM, RATIO = 24, 16, 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))  # RoPE on the last 8 of 16 dims


def _compressor(seed: int) -> Compressor:
    g = torch.Generator().manual_seed(seed)
    comp = Compressor(HIDDEN, DIM, RATIO, 1, 1e-6, torch.float32)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) + (1.0 if p.dim() == 1 else 0.0))
    return comp


def _raw_entries(comp: Compressor, kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Entries of every completed group from the raw tail rows, exactly as the model pools them."""
    n = kv.shape[0] // RATIO
    state = torch.cat([kv, score], dim=-1)[: n * RATIO].view(n, RATIO, 2 * DIM)
    valid = torch.ones(n, RATIO, dtype=torch.bool)
    return comp.pool(state, valid, INV_FREQ, torch.arange(n), torch.float32)


def _online_entries(comp: Compressor, kv: torch.Tensor, score: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    st, p, k, out = empty_state(DIM), 0, 0, []
    while p < kv.shape[0]:
        sz = sizes[k % len(sizes)]
        st, j, pooled = fold_chunk(st, kv[p:p + sz], score[p:p + sz], p, RATIO)
        if j.numel():
            c, s = cos_sin(j * RATIO, INV_FREQ)
            out.append(apply_rope(comp.norm(pooled), c, s))  # the tail of Compressor.pool
        p, k = p + sz, k + 1
    return torch.cat(out)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3 * RATIO), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 30.0]), extra=st.integers(0, RATIO - 1))
def test_online_state_equals_raw_tail_pooling(sizes, seed, scale, extra):
    comp = _compressor(seed)
    n = 3 * RATIO + extra  # three full groups and an open one
    x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed + 1)) * scale
    with torch.no_grad():
        kv, score = comp.project(x, torch.arange(n))
        ref = _raw_entries(comp, kv, score)
        got = _online_entries(comp, kv, score, sizes)
    assert got.shape == ref.shape == (3, DIM)
    assert (got - ref).abs().max().item() <= 1e-5


def test_open_group_state_is_one_slot_and_resets_on_the_boundary():
    comp = _compressor(0)
    x = torch.randn(RATIO + 3, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        kv, score = comp.project(x, torch.arange(RATIO + 3))
    st, j, _ = fold_chunk(empty_state(DIM), kv[:5], score[:5], 0, RATIO)
    assert st.shape == (3, DIM) and j.numel() == 0 and torch.isfinite(st).all()
    assert torch.equal(st[0], score[:5].max(0).values)  # running max
    st, j, _ = fold_chunk(st, kv[5:RATIO], score[5:RATIO], 5, RATIO)
    assert j.tolist() == [0] and torch.equal(st, empty_state(DIM))  # boundary: emitted, slot reset
    assert empty_state(512).numel() * 4 == 6 * 1024  # 6 KiB per HCA layer vs 128 rows x 2 x 512 x 4 B = 512 KiB


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"state must be \[3, d\]"):
        fold_chunk(empty_state(4), torch.zeros(2, 5), torch.zeros(2, 5), 0, RATIO)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        fold_chunk(empty_state(4), torch.zeros(2, 4), torch.zeros(2, 4), 0, 0)


@pytest.fixture(scope="module", params=sorted(tiny_configs()))
def tiny_model(request, tmp_path_factory):
    cfg = tiny_configs()[request.param]
    d = tmp_path_factory.mktemp(f"hca_online_{request.param}")
    write_random_checkpoint(cfg, d, seed=4)
    model, cfg, _ = load_model(d, progress=False)
    return request.param, model, cfg


@pytest.mark.parametrize("sizes", [[1], [5, 1, 9, 2, 13]], ids=["one-by-one", "chunks"])
def test_model_with_online_hca_state_equals_raw_tail(tiny_model, sizes):
    """Decoding through the paged pools with `hca_state="online"` (one slot per open HCA group) gives the
    logits of the raw-tail full forward at every position, over 3x the HCA ratio (every boundary crossed)."""
    name, model, cfg = tiny_model
    n = 3 * cfg.hca_ratio + 5
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    with one_thread(), torch.no_grad():
        ref = PagedRunner(model, cfg, max_tokens=n).step([(0, ids, 0)])
        r = PagedRunner(model, cfg, max_tokens=n, seed=7, hca_state="online")
        assert r.spec.pools["hca_state"].rows_per_block == 1
        for key, t in r.pools._t.items():  # recycled blocks: stale state must not leak into a new group
            if key[0] == "hca_state":
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)) * 50)
        outs, p, k = [], 0, 0
        while p < n:
            sz = sizes[k % len(sizes)]
            outs.append(r.step([(0, ids[p:p + sz], p)]))
            p, k = p + sz, k + 1
    diff = (torch.cat(outs) - ref).abs().max().item()
    assert diff <= 1e-5, f"{name}: online HCA state differs from the raw tail by {diff}"
