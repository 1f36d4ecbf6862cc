"""Sampling, stop strings and request validation (pure functions, no model)."""

from __future__ import annotations

import math

import pytest
import torch
from dsv4.runtime.engine.detok import TextState
from dsv4.runtime.engine.request import RequestError, SamplingParams
from dsv4.runtime.engine.sampling import RowSpec, filter_top_k_top_p, make_generator, sample


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


def test_batched_plain_rows_draw_what_multinomial_draws():
    """The plain-row fast path (one exponential_ per row, one batched argmax) picks exactly the tokens
    torch.multinomial(softmax(l / T), 1) picks from identically seeded generators."""
    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(3)) * 3
    temps = [0.5 + 0.05 * i for i in range(32)]
    toks, _ = sample(logits.clone(), [row(SamplingParams(temperature=t), seed=100 + i) for i, t in enumerate(temps)])
    want = [int(torch.multinomial(torch.softmax(logits[i] / t, -1), 1, generator=make_generator(100 + i)))
            for i, t in enumerate(temps)]
    assert toks == want
