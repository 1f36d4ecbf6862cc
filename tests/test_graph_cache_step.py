"""The compiled CPU decode step's cache step, run eagerly here: `compiled._select_in_graph` (static-shape writes
through each pool's trash row, every token's would-be compressor entry, the traced indexer top-k) leaves the
pools exactly as `Attention.write` does and selects the same rows as `Attention.select` — for decode tokens
that complete a CSA group, an HCA group, both, or none, and for an empty padding sequence."""

from __future__ import annotations

import pytest
import torch
from dsv4.runtime.config import CSA, HCA, SLIDING
from dsv4.runtime.model import compiled
from dsv4.runtime.model.attention import Attention
from dsv4.runtime.model.batch import ForwardBatch
from dsv4.runtime.model.context import StepContext
from dsv4.runtime.model.model import COMPRESSED_POOL, pad_decode_batch
from dsv4.runtime.model.rope import cos_sin, inv_freq_for

from tests.model_utils import PagedRunner, tiny_configs


def random_attention(cfg, kind: str, seed: int) -> Attention:
    attn = Attention(cfg, kind, torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g) * 0.3)
    return attn


@pytest.mark.parametrize("groups_complete", [True, False])
@pytest.mark.parametrize("name", ["mix", "csa", "hca"])
def test_graph_cache_step_writes_and_selects_what_the_eager_one_does(name, groups_complete):
    cfg = tiny_configs()[name]
    hca_r, csa_r = cfg.compress_rates[HCA], cfg.compress_rates[CSA]
    # positions whose token completes: a CSA group and an HCA group / a CSA group only / nothing / both again;
    # or no token completes any group (the batch graphs then skip the pooling)
    positions = [2 * hca_r - 1, 3 * csa_r - 1 if (3 * csa_r) % hca_r else 5 * csa_r - 1, 2 * hca_r + 1, hca_r - 1]
    if not groups_complete:
        positions = [4, 6, 8]
    runners = [PagedRunner(None, cfg, max_tokens=64, n_seqs=len(positions), seed=3) for _ in range(2)]
    g = torch.Generator().manual_seed(7)
    for (pool, layer), t in runners[0].pools._t.items():  # earlier tokens' rows: random, the same in both
        t.copy_(torch.randn(t.shape, generator=g))
        runners[1].pools.tensor(pool, layer).copy_(t)
    tables = {n: [runners[0].tables[s][n] for s in range(len(positions))] for n in runners[0].tables[0]}
    batch = ForwardBatch.build([([5], p) for p in positions], tables)
    batch = pad_decode_batch(batch, len(positions) + 1)  # and one empty sequence: every row -1
    ctx = StepContext.build(batch, cfg, runners[0].spec)
    graph_ctx = compiled._ctx_for_the_graph(StepContext.build(batch, cfg, runners[0].spec))
    emitted = {kind: e.token.numel() for kind, e in ctx.emissions.items()}
    assert all(n >= 2 if groups_complete else n == 0 for n in emitted.values()), emitted
    x = torch.randn(batch.num_tokens, cfg.hidden_size, generator=g)
    for layer, kind in enumerate(cfg.layer_types):
        attn = random_attention(cfg, kind, layer)
        inv = inv_freq_for(cfg, compressed=kind != SLIDING)
        cos, sin = cos_sin(ctx.pos, inv)
        p = attn.project(x, ctx.pos, cos, sin)
        eager = attn.select(p, ctx, runners[0].pools, layer, inv)
        lp = runners[1].pools.layer_pools(layer, COMPRESSED_POOL.get(kind))
        trash_before = [t[-1].clone() for t in lp.tensors()]
        graph = compiled._select_in_graph(attn, p, graph_ctx, runners[1].pools, layer, inv, layer_pools=lp)
        for (pool, at), t in runners[0].pools._t.items():
            if at == layer:
                where = f"layer {layer} ({kind}) pool {pool}"
                torch.testing.assert_close(runners[1].pools.tensor(pool, layer), t, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, where=where: f"{where}: {m}")
        assert any(not torch.equal(t[-1], before) for t, before in zip(lp.tensors(), trash_before, strict=True))
        assert torch.equal(graph[1][:, :eager[1].shape[1]], eager[1])
        if kind == SLIDING:
            assert graph[2] is None
            continue
        for got, want in zip(graph[3].tolist(), eager[3].tolist(), strict=True):  # the same rows, any order
            assert sorted(r for r in got if r >= 0) == sorted(r for r in want if r >= 0)
