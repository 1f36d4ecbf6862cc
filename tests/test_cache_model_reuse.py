"""Model level: decoding after a prefix hit (each SWA policy) gives the same logits as decoding without reuse.

The tiny model runs through the real CacheManager block tables and KVPools; the warm run re-runs only
`[recompute_from, len)` with `recompute_until = cached_tokens`, as the engine does.
"""

from __future__ import annotations

import pytest
import torch
from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import tiny
from dsv4.runtime.model.batch import ForwardBatch
from dsv4.runtime.model.kv_pools import KVPools
from dsv4.runtime.model.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny()
    m = build_model(cfg, torch.float32, with_mtp=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter and buffer deterministic (the module allocates them empty)
        for name, p in m.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in m.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, cfg.n_routed_experts, b.shape, generator=g))
            elif name.endswith("gate.bias"):
                b.zero_()
    return cfg, m


def _forward(model, pools, mgr, rid, tokens, n0, n1, until):
    tables = {p: [t] for p, t in mgr.block_tables(rid).items()}
    batch = ForwardBatch.build([(tokens[n0:n1], n0)], tables, recompute_until=[until])
    return model(batch, pools)[-1]


def _serve(model, pools, mgr, rid, prompt, decode=3, chunk=64):
    hit = mgr.start(rid, prompt)
    toks, n, logits = list(prompt), hit.recompute_from, []
    while n < len(toks):
        n2 = min(len(toks), n + chunk)
        assert mgr.allocate(rid, n2)
        last = _forward(model, pools, mgr, rid, toks, n, n2, hit.cached_tokens)
        mgr.commit(rid, toks, n2)
        n = n2
    logits.append(last)
    for _ in range(decode):
        toks.append(int(logits[-1].argmax()))
        assert mgr.allocate(rid, n + 1)
        logits.append(_forward(model, pools, mgr, rid, toks, n, n + 1, hit.cached_tokens))
        mgr.commit(rid, toks, n + 1)
        n += 1
    mgr.free(rid)
    return hit, torch.stack(logits)


@pytest.mark.parametrize("policy", ["full", "checkpoint", "recompute"])
def test_logits_after_prefix_hit_match_cold(model, policy):
    cfg, m = model
    spec = CacheSpec.from_model(cfg, "fp32")
    nb = {p: 48 for p in spec.block_pools}
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, cfg.vocab_size, (230,), generator=g).tolist()

    cold_mgr = CacheManager(spec, nb, policy, enable_prefix_caching=False)
    _, cold = _serve(m, KVPools.for_model(cfg, spec, nb), cold_mgr, "c", prompt)

    mgr = CacheManager(spec, nb, policy, checkpoint_every=2)
    pools = KVPools.for_model(cfg, spec, nb)
    _serve(m, pools, mgr, "a", prompt[:200])  # first turn: registers 3 blocks
    hit, warm = _serve(m, pools, mgr, "b", prompt)  # second turn extends the first
    assert hit.cached_tokens == 192
    assert hit.recompute_from == (96 if policy == "recompute" else 192)
    torch.testing.assert_close(warm, cold, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cold[0], cold[1], atol=1e-3)  # the logits do depend on the context


def test_recomputing_only_the_window_is_not_exact(model):
    """Why recompute_from = c - layers x window: re-running only the last W tokens leaves deeper layers'
    window rows computed from missing context, and the logits change."""
    cfg, m = model
    spec = CacheSpec.from_model(cfg, "fp32")
    nb = {p: 48 for p in spec.block_pools}
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, cfg.vocab_size, (230,), generator=g).tolist()
    _, cold = _serve(m, KVPools.for_model(cfg, spec, nb), CacheManager(spec, nb, "recompute",
                                                                       enable_prefix_caching=False), "c", prompt)
    mgr = CacheManager(spec, nb, "recompute")
    mgr.recompute_span = cfg.sliding_window
    pools = KVPools.for_model(cfg, spec, nb)
    _serve(m, pools, mgr, "a", prompt[:200])
    hit, warm = _serve(m, pools, mgr, "b", prompt)
    assert hit.recompute_from == 192 - cfg.sliding_window
    assert (warm - cold).abs().max() > 1e-2
