"""Token constraints in the sampler (sampling.apply_constraints): constrained rows sample only allowed tokens,
unconstrained rows in the same batch sample exactly what they would alone, and a ban that removes every
allowed token gives way to the constraint."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from dsv4.runtime.engine.request import SamplingParams
from dsv4.runtime.engine.sampling import RowSpec, make_generator, sample
from dsv4.runtime.server.forced_output import ForcedTokens, set_bit

V = 100


@dataclass
class AllowSet:
    allowed: list[int]
    seen: list[int] = field(default_factory=list)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        for t in self.allowed:
            set_bit(bitmask[row], t)

    def accept(self, token_id: int) -> None:
        self.seen.append(token_id)


def rows(n: int, constraints: dict[int, AllowSet], banned: list[int] | None = None) -> list[RowSpec]:
    p = SamplingParams(temperature=1.0)
    return [RowSpec(p, make_generator(i), {}, banned or [], None, constraints.get(i)) for i in range(n)]


def test_constrained_rows_take_allowed_tokens_and_others_are_untouched():
    torch.manual_seed(0)
    high = [31, 32, 63, 64, 99]  # word boundaries and bit 31 (the int32 sign bit)
    for step in range(20):
        logits = torch.randn(6, V)
        alone = sample(logits.clone(), rows(6, {}))[0]
        cons = {1: AllowSet(high), 4: AllowSet([7])}
        mixed = sample(logits.clone(), rows(6, cons))[0]
        assert mixed[1] in high and mixed[4] == 7
        assert [mixed[i] for i in (0, 2, 3, 5)] == [alone[i] for i in (0, 2, 3, 5)], step
        assert cons[1].seen == [mixed[1]] and cons[4].seen == [7]


def test_forced_tokens_then_end_and_bans_give_way():
    spec = ForcedTokens([5, 40, 95], end_ids=[1])
    row = RowSpec(SamplingParams(temperature=0.0), None, {}, [], None, spec.start())
    got = [sample(torch.randn(1, V), [row])[0][0] for _ in range(5)]
    assert got == [5, 40, 95, 1, 1]
    banned = rows(1, {0: AllowSet([1])}, banned=[1])  # EOS banned (min_tokens) but the grammar allows only it
    assert sample(torch.randn(1, V), banned)[0] == [1]
