"""Chunked prefill in any chunk sizes equals one full forward (fp32, 1e-4).

Chunks that end mid CSA group, mid overlapping CSA window (2·ratio), mid HCA group, and one-token decode steps,
on the three parity configs against transformers' full forward (explicit splits + hypothesis random splits),
and on the built-in tiny model through the real CacheManager (out-of-window blocks freed between chunks).
The tiny model has 4 indexer heads, so exactly-tied (zero) indexer scores occur: the deterministic top-k
tie-break is what makes its chunked prefill match.
"""

from __future__ import annotations

import pytest
import torch
from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import tiny
from dsv4.runtime.model import ForwardBatch, KVPools, build_model, load_model
from dsv4.runtime.model import topk as topk_mod
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.model_utils import PagedRunner, one_thread, save_hf_twin, tiny_configs

CONFIGS = tiny_configs()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def twin(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    out = tmp_path_factory.mktemp(f"chunk_{request.param}")
    hf = save_hf_twin(cfg, out, seed=21)
    model, loaded_cfg, _ = load_model(out, progress=False)
    n = 3 * loaded_cfg.hca_ratio + 5  # crosses 3 HCA boundaries and many CSA ones
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(22)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    return request.param, model, loaded_cfg, ids, ref


def _chunked(model, cfg, ids: list[int], sizes: list[int], seed: int = 5) -> torch.Tensor:
    r = PagedRunner(model, cfg, max_tokens=len(ids), seed=seed)
    outs, p = [], 0
    for sz in sizes:
        outs.append(r.step([(0, ids[p:p + sz], p)]))
        p += sz
    assert p == len(ids)
    return torch.cat(outs)


def _split(n: int, pattern: list[int]) -> list[int]:
    sizes, p, k = [], 0, 0
    while p < n:
        sz = min(pattern[k % len(pattern)], n - p)
        sizes.append(sz)
        p += sz
        k += 1
    return sizes


def _pattern(cfg, kind: str) -> list[int]:
    c, h = cfg.csa_ratio, cfg.hca_ratio
    return {
        "decode": [1],
        "mid-csa-group": [c + 1, c - 1, 2 * c + 1],       # boundaries at 1 and 3 mod ratio
        "mid-csa-window": [2 * c - 1, 3, 2 * c + 3],      # inside the overlapping 2·ratio window
        "mid-hca-group": [h // 2 + 1, h - 1, h + 3],
        "prefill-then-decode": [h + h // 2 + 1, 1, 1, 2 * c + 1],
    }[kind]


@pytest.mark.parametrize("kind", ["decode", "mid-csa-group", "mid-csa-window", "mid-hca-group",
                                  "prefill-then-decode"])
def test_chunked_prefill_equals_transformers_full_forward(twin, kind):
    name, model, cfg, ids, ref = twin
    sizes = _split(len(ids), _pattern(cfg, kind))
    diff = (_chunked(model, cfg, ids, sizes) - ref).abs().max(dim=-1).values
    assert diff.max().item() <= 1e-4, (f"{name} {kind} {sizes}: first mismatch at position "
                                       f"{int((diff > 1e-4).nonzero()[0])}, max diff {diff.max().item():.3g}")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_chunk_splits_equal_transformers_full_forward(twin, data):
    name, model, cfg, ids, ref = twin
    n = len(ids)
    cuts = data.draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=8, unique=True), label="cuts")
    bounds = [0, *sorted(cuts), n]
    sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    diff = (_chunked(model, cfg, ids, sizes, seed=len(cuts)) - ref).abs().max().item()
    assert diff <= 1e-4, f"{name} {sizes}: max diff {diff:.3g}"


# --- the built-in tiny model through the real cache manager --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    cfg = tiny()
    m = build_model(cfg, torch.float32, with_mtp=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) * 0.05)
        for name, b in m.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, cfg.n_routed_experts, b.shape, generator=g))
            elif name.endswith("gate.bias"):
                b.zero_()
    return cfg, m


def _serve(cfg, m, prompt: list[int], chunk: int) -> torch.Tensor:
    spec = CacheSpec.from_model(cfg, "fp32")
    nb = {p: 24 for p in spec.block_pools}
    mgr = CacheManager(spec, nb, "recompute", enable_prefix_caching=False)
    pools = KVPools.for_model(cfg, spec, nb)
    mgr.start("a", prompt)
    outs, n = [], 0
    while n < len(prompt):
        n2 = min(len(prompt), n + chunk)
        assert mgr.allocate("a", n2)
        tables = {p: [t] for p, t in mgr.block_tables("a").items()}
        outs.append(m(ForwardBatch.build([(prompt[n:n2], n)], tables, logits="all"), pools))
        mgr.commit("a", prompt, n2)  # frees blocks that left the window / compressor tail
        n = n2
    return torch.cat(outs)


def test_tiny_model_chunks_of_50_and_64_equal_full_prefill(tiny_model, monkeypatch):
    cfg, m = tiny_model
    prompt = torch.randint(2, cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    ties = []
    real = topk_mod.select_topk

    def spy(scores, cand, k, backend=None):
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        ties.append(int(((scores == kth).sum(-1) > 1).sum()))
        return real(scores, cand, k, backend=backend)

    monkeypatch.setattr("dsv4.kernels.dispatch.select_topk", spy)  # what the indexer's top-k calls
    full = _serve(cfg, m, prompt, len(prompt))
    assert sum(ties) > 0, "no tied indexer scores: this test would not exercise the tie-break"
    for chunk in (50, 64, 13):
        diff = (_serve(cfg, m, prompt, chunk) - full).abs().max().item()
        assert diff <= 1e-4, f"chunks of {chunk}: max diff {diff:.3g}"


def test_step_without_logits_returns_empty_and_still_fills_the_cache(twin):
    """A step of mid-prompt prefill chunks only (empty logits_indices) returns [0, vocab] and writes the cache
    exactly as a step with logits would: the following chunk matches the full forward."""
    name, model, cfg, ids, ref = twin
    r = PagedRunner(model, cfg, max_tokens=len(ids), seed=7)
    cut = cfg.hca_ratio + 1
    none = r.step([(0, ids[:cut], 0)], logits="none")
    assert none.shape == (0, cfg.vocab_size) and none.dtype == torch.float32
    rest = r.step([(0, ids[cut:], cut)])
    assert (rest - ref[cut:]).abs().max().item() <= 1e-4, name
