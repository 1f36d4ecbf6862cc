"""Sampling, stop strings and request validation (pure functions, no model)."""

from __future__ import annotations

import math

import pytest
import torch
from dsv4.runtime.engine.detok import TextState
from dsv4.runtime.engine.request import RequestError, SamplingParams
from dsv4.runtime.engine.sampling import INVALID, RowSpec, filter_top_k_top_p, make_generator, sample


def row(params: SamplingParams, seed: int | None = 0, counts=None, banned=None, lp=None) -> RowSpec:
    return RowSpec(params, make_generator(seed), dict(counts or {}), list(banned or []), lp)


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=0.0, logprobs=5)
    toks, lps = sample(logits, [row(p, lp=5) for _ in range(3)])
    assert toks == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    for i in range(3):
        assert lps[i].token_id == toks[i]
        assert math.isclose(lps[i].logprob, float(ref[i, toks[i]]), rel_tol=1e-5)
        assert [t for t, _ in lps[i].top] == ref[i].topk(5).indices.tolist()
        assert lps[i].top[0][1] >= lps[i].top[-1][1]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0)
    g = row(p, seed=7)
    a = [sample(logits, [g])[0][0] for _ in range(20)]
    g2 = row(p, seed=7)
    b = [sample(logits, [g2])[0][0] for _ in range(20)]
    g3 = row(p, seed=8)
    c = [sample(logits, [g3])[0][0] for _ in range(20)]
    assert a == b
    assert a != c


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    k2 = filter_top_k_top_p(logits, 2, 1.0)
    assert torch.isfinite(k2).tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, -1)  # ~[0.66, 0.24, 0.09, ...]
    p = filter_top_k_top_p(logits, 0, 0.8)
    assert torch.isfinite(p).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.8 <= probs[0] + probs[1]
    # top_p small keeps at least the best token
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.01)).sum() == 1
    # sampled tokens stay in the support
    params = SamplingParams(temperature=1.0, top_k=2)
    g = row(params, seed=3)
    seen = {sample(logits[None], [g])[0][0] for _ in range(200)}
    assert seen == {0, 1}


def test_penalties_and_bans():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    p = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.0)
    assert sample(logits, [row(p, counts={0: 1})])[0] == [1]  # 2.0 - 0.5 < 1.9
    p2 = SamplingParams(temperature=0.0, presence_penalty=0.05)
    assert sample(logits, [row(p2, counts={0: 3})])[0] == [0]  # presence does not scale with count
    assert sample(logits, [row(SamplingParams(temperature=0.0), banned=[0, 1])])[0] == [2]


@pytest.mark.parametrize("kw, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"logprobs": 21}, "logprobs"), ({"n": 0}, "n"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop_token_ids": [5000]}, "stop_token_ids"), ({"top_k": -2}, "top_k"),
])
def test_sampling_params_validation_names_field(kw, field):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kw).validate(vocab_size=1024)
    assert e.value.field == field
    assert field in str(e.value)


class CharTok:
    """Each id is one character (id 0 = 'a' ...), enough to test text handling."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def test_stop_string_cuts_text_and_holds_back_prefixes():
    ts = TextState(stops=["cde"])
    tok = CharTok()
    released = ""
    for t in [0, 1, 2]:  # "abc": "c" may start the stop string -> held back
        assert ts.push(tok, t) is None
        released += ts.release(final=False)
    assert released == "ab"
    assert ts.push(tok, 3) is None
    released += ts.release(final=False)
    assert released == "ab"  # "cd" still a prefix of "cde"
    assert ts.push(tok, 4) == "cde"
    released += ts.release(final=True)
    assert released == "ab"
    ts2 = TextState(stops=["cde"], include_stop=True)
    for t in [0, 1, 2, 3, 4]:
        hit = ts2.push(tok, t)
    assert hit == "cde" and ts2.release(final=True) == "abcde"


def test_text_without_stops_is_released_at_once():
    ts = TextState()
    tok = CharTok()
    out = ""
    for t in range(5):
        ts.push(tok, t)
        out += ts.release(final=False)
    assert out == "abcde"


def test_sampled_frequencies_match_softmax_of_logits_over_temperature():
    """20,000 seeded draws per row (plain, top-k and top-p rows in one batch) land on each token with the
    probability softmax(l / T) restricted to the kept set gives: every count within 5 standard deviations and
    a chi-square statistic below its 99.99 % quantile. Deterministic seeds: the test never flakes."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]] * 3)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=3),
              SamplingParams(temperature=1.0, top_p=0.8)]
    rows = [row(p, seed=11 + i) for i, p in enumerate(params)]
    n = 20_000
    counts = torch.zeros(3, 6)
    for _ in range(n):
        toks, _ = sample(logits.clone(), rows)
        for i, t in enumerate(toks):
            counts[i, t] += 1
    for i, p in enumerate(params):
        kept = torch.isfinite(filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p))
        want = torch.softmax(torch.where(kept, logits[i] / p.temperature, -torch.inf), -1)
        assert (counts[i][~kept] == 0).all(), f"row {i} drew a token outside its top-k / top-p set"
        expected = n * want[kept]
        sd = (expected * (1 - want[kept])).sqrt()
        assert ((counts[i][kept] - expected).abs() <= 5 * sd).all(), (i, counts[i], n * want)
        chi2 = float(((counts[i][kept] - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_9999[int(kept.sum()) - 1], (i, chi2)


CHI2_9999 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74}  # 99.99 % quantiles of chi-square by d.o.f.


def test_zero_probability_tokens_are_never_drawn_even_at_the_edges():
    """Banned tokens (-inf) at either end of the vocabulary and between live ones are never drawn, also with
    uniforms at the extremes of [0, 1)."""
    from dsv4.runtime.engine.sampling import draw_inverse_cdf
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    assert draw_inverse_cdf(probs, [0.0, 0.0]) == [1, 2]
    assert draw_inverse_cdf(probs, [1.0 - 2 ** -53, 1.0 - 2 ** -53]) == [3, 2]
    assert draw_inverse_cdf(probs, [0.2999, 0.5]) == [1, 2]
    assert draw_inverse_cdf(probs, [0.3001, 0.5]) == [3, 2]
    bad = torch.tensor([[float("nan"), 1.0], [0.25, 0.75], [float("inf"), 1.0], [0.0, 0.0]])
    assert draw_inverse_cdf(bad, [0.5] * 4) == [INVALID, 1, INVALID, INVALID]
    logits = torch.randn(4, 64)
    p = SamplingParams(temperature=5.0)
    ban = [0, 17, 63]
    seen = set()
    rows = [row(p, seed=s, banned=ban) for s in range(4)]
    for _ in range(500):
        seen.update(sample(logits.clone(), rows)[0])
    assert not seen & set(ban) and len(seen) > 40


def test_a_seeded_row_draws_the_same_tokens_whatever_the_batch():
    """A choice's tokens depend on its seed and logits only: alone, or in a batch beside greedy, filtered and
    other seeded rows, it draws the same sequence."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 300, generator=g) * 2
    target = SamplingParams(temperature=0.9)
    alone = row(target, seed=42)
    solo = [sample(logits[2:3].clone(), [alone])[0][0] for _ in range(30)]
    mates = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=1.0, top_k=5), seed=1),
             row(target, seed=42), row(SamplingParams(temperature=1.2, top_p=0.5), seed=2),
             row(SamplingParams(temperature=1.0), seed=3)]
    batched = [sample(logits.clone(), mates)[0][2] for _ in range(30)]
    assert solo == batched
    assert len(set(solo)) > 5


def test_a_row_with_nan_logits_is_invalid_and_the_others_are_sampled():
    """NaN logits in one row (greedy or sampled) mark that row INVALID; the other rows are sampled as usual."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    plain = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=1.0), seed=4),
             row(SamplingParams(temperature=1.0), seed=5), row(SamplingParams(temperature=0.0))]
    want = sample(logits.clone(), plain)[0]
    broken = logits.clone()
    broken[1, 7] = float("nan")
    broken[3, 0] = float("nan")
    rows = [row(SamplingParams(temperature=0.0), lp=2), row(SamplingParams(temperature=1.0), seed=4, lp=2),
            row(SamplingParams(temperature=1.0), seed=5, lp=2), row(SamplingParams(temperature=0.0), lp=2)]
    toks, lps = sample(broken, rows)
    assert toks == [want[0], INVALID, want[2], INVALID]
    assert lps[1] is None and lps[3] is None and lps[0].token_id == want[0]
