"""Parity of dsv4's DeepseekV4Model with transformers' DeepseekV4ForCausalLM on three tiny random configs
(saved with save_pretrained, loaded by our loader), and cache consistency through the paged pools."""

from __future__ import annotations

import pytest
import torch
from dsv4.runtime.model import load_model

from tests.model_utils import PagedRunner, save_hf_twin, tiny_configs

CONFIGS = tiny_configs()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def twin(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    out = tmp_path_factory.mktemp(f"twin_{request.param}")
    hf = save_hf_twin(cfg, out, seed=3)
    model, loaded_cfg, _ = load_model(out, progress=False)
    return request.param, hf, model, loaded_cfg


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_logits_match_transformers(twin):
    name, hf, model, cfg = twin
    n = 3 * cfg.hca_ratio + 3
    ids = _ids(n, cfg.vocab_size, 1)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = PagedRunner(model, cfg, max_tokens=n).step([(0, ids, 0)])
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"{name}: prefill logits differ by {diff}"
    assert ref.abs().max().item() > 1.0  # a non-degenerate model


def test_greedy_continuation_matches_transformers(twin):
    name, hf, model, cfg = twin
    prompt = _ids(11, cfg.vocab_size, 2)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, min_new_tokens=64,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    r = PagedRunner(model, cfg, max_tokens=len(prompt) + 64, seed=4)
    out = []
    logits = r.step([(0, prompt, 0)], logits="last")
    for i in range(64):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = r.step([(0, [tok], len(prompt) + i)], logits="last")
    first = next((i for i, (a, b) in enumerate(zip(out, ref, strict=True)) if a != b), None)
    assert out == ref, f"{name}: greedy continuation diverges at step {first}"


@pytest.mark.parametrize("sizes", [[1], [3, 1, 7, 2, 5, 9, 4]], ids=["one-by-one", "chunks"])
def test_incremental_decode_equals_full_forward(twin, sizes):
    name, _, model, cfg = twin
    n = 3 * cfg.hca_ratio + 5
    ids = _ids(n, cfg.vocab_size, 5)
    full = PagedRunner(model, cfg, max_tokens=n).step([(0, ids, 0)])
    r = PagedRunner(model, cfg, max_tokens=n, seed=11)  # different, scattered physical blocks
    outs, p, k = [], 0, 0
    while p < n:
        sz = sizes[k % len(sizes)]
        outs.append(r.step([(0, ids[p:p + sz], p)]))
        p += sz
        k += 1
    inc = torch.cat(outs)
    diff = (inc - full).abs().max(dim=-1).values
    assert diff.max().item() <= 1e-4, f"{name}: first mismatch at position {int((diff > 1e-4).nonzero()[0])}"


def test_mixed_batch_equals_separate_runs(twin):
    """One step with a decode token of sequence 0 and a prefill chunk of sequence 1 (flattened batch)."""
    name, _, model, cfg = twin
    a, b = _ids(20, cfg.vocab_size, 6), _ids(13, cfg.vocab_size, 7)
    solo_a = PagedRunner(model, cfg, max_tokens=32).step([(0, a, 0)])
    solo_b = PagedRunner(model, cfg, max_tokens=32).step([(0, b, 0)])
    r = PagedRunner(model, cfg, max_tokens=32, n_seqs=2, seed=9)
    first = r.step([(0, a[:19], 0), (1, b[:6], 0)])
    both = r.step([(1, b[6:], 6), (0, a[19:], 19)])
    assert torch.allclose(first[:19], solo_a[:19], atol=1e-4)
    assert torch.allclose(first[19:], solo_b[:6], atol=1e-4)
    assert torch.allclose(both[:7], solo_b[6:], atol=1e-4)
    assert torch.allclose(both[7:], solo_a[19:], atol=1e-4)


def test_recompute_until_rebuilds_state_without_rewriting_entries(twin):
    """After a prefix hit the engine re-runs the tail with recompute_until = cached tokens: swa/state rows are
    rebuilt, compressed entries (csa/idx/hca) are left alone, and the next token matches a full forward."""
    name, _, model, cfg = twin
    n = 2 * cfg.hca_ratio + 4
    ids = _ids(n + 1, cfg.vocab_size, 8)
    full = PagedRunner(model, cfg, max_tokens=n + 1).step([(0, ids, 0)])
    r = PagedRunner(model, cfg, max_tokens=n + 1, seed=13)
    r.step([(0, ids[:n], 0)])
    for k in r.pools._t:  # lose the token-granular rows (swa window, compressor state)
        if k[0] not in ("csa", "idx", "hca"):
            r.pools._t[k].zero_()
    writes: list[str] = []
    real_write = r.pools.write

    def spy(pool, layer, rows, values, cols=None):
        if int((rows >= 0).sum()):
            writes.append(pool)
        real_write(pool, layer, rows, values, cols)

    r.pools.write = spy
    start = max(0, n - cfg.sliding_window - 2 * max(cfg.csa_ratio, cfg.hca_ratio))
    r.step([(0, ids[start:n], start)], recompute_until=[n])
    assert "swa" in writes
    assert not {"csa", "idx", "hca"} & set(writes), f"{name}: compressed entries rewritten during recompute"
    nxt = r.step([(0, ids[n:], n)])
    assert torch.allclose(nxt[0], full[n], atol=1e-4)


def test_topk_selection_matters(twin):
    """The configs' top-k is smaller than the visible CSA entries, so the indexer really selects: keeping every
    visible entry instead moves the logits far beyond the 1e-4 parity bound (the parity test would see a wrong
    selection)."""
    name, hf, model, cfg = twin
    indexers = [m for m in model.modules() if hasattr(m, "weights_proj")]
    if not indexers:
        pytest.skip(f"{name}: no CSA layer, no indexer")
    n = 3 * cfg.hca_ratio + 3  # as in test_prefill_logits_match_transformers
    assert n // cfg.csa_ratio > cfg.index_topk, f"{name}: top-k {cfg.index_topk} keeps every visible entry"
    ids = _ids(n, cfg.vocab_size, 1)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    try:
        for m in indexers:
            m.k = n  # every causally visible entry
        dense = PagedRunner(model, cfg, max_tokens=n).step([(0, ids, 0)])
    finally:
        for m in indexers:
            m.k = cfg.index_topk
    assert (dense - ref).abs().max().item() > 1e-2, f"{name}: selection does not change the logits"
