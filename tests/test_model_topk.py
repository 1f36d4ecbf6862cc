"""Indexer top-k tie-breaking (`dsv4.runtime.model.topk.select_topk`): the lower entry index wins, the same
selection for any candidate width, row order or batch composition."""

from __future__ import annotations

import pytest
import torch
from dsv4.runtime.model.topk import select_topk
from hypothesis import given, settings
from hypothesis import strategies as st


def _rule(scores: list[float], k: int) -> set[int]:
    """The documented rule, brute force: sort by (-score, column) and keep the first k finite ones."""
    order = sorted((c for c, s in enumerate(scores) if s != float("-inf")), key=lambda c: (-scores[c], c))
    return set(order[:k])


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    cand = torch.tensor([[10, 11, 12, 13, 14]])
    assert sorted(select_topk(scores, cand, 3)[0].tolist()) == [10, 11, 14]


def test_fewer_finite_than_k_pads_with_minus_one():
    scores = torch.tensor([[0.5, float("-inf"), 0.1, float("-inf")]])
    cand = torch.tensor([[7, -1, 9, -1]])
    assert select_topk(scores, cand, 3)[0].tolist() == [7, 9, -1]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="scores and cand_idx"):
        select_topk(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_topk(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 0)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_selection_follows_the_rule_for_any_width_and_batch(data):
    T = data.draw(st.integers(1, 6), label="T")
    C = data.draw(st.integers(1, 40), label="C")
    k = data.draw(st.integers(1, 8), label="k")
    # few distinct values so ties are the norm; -inf marks invisible candidates
    vals = st.sampled_from([0.0, 0.0, 1.0, 2.0, -1.0, float("-inf")])
    rows = [data.draw(st.lists(vals, min_size=C, max_size=C), label=f"row{t}") for t in range(T)]
    scores = torch.tensor(rows)
    cand = torch.arange(T * C).view(T, C) + 100
    cand = torch.where(torch.isfinite(scores), cand, torch.full_like(cand, -1))
    out = select_topk(scores, cand, k)
    pad = data.draw(st.integers(0, 9), label="pad")  # a wider batch: extra invisible columns
    wide = select_topk(torch.cat([scores, torch.full((T, pad), float("-inf"))], 1),
                       torch.cat([cand, torch.full((T, pad), -1)], 1), k)
    for t in range(T):
        want = {int(cand[t, c]) for c in _rule(rows[t], k)}
        got = out[t].tolist()
        assert {g for g in got if g >= 0} == want and got.count(-1) == k - len(want)
        assert wide[t].tolist() == got
        assert select_topk(scores[t:t + 1], cand[t:t + 1], k)[0].tolist() == got  # alone in its batch
