"""Token sampling for one step: penalties, greedy / temperature / top-k / top-p, per-choice seeded streams,
and logprobs.

For row i with generated-token counts c:
    l'   = l - frequency_penalty * c - presence_penalty * [c > 0]          (banned tokens -> -inf)
    greedy:  argmax l'
    else:    q = softmax(l' / T); keep the top_k largest; keep the smallest prefix (by descending q) whose mass
             reaches top_p; renormalise; draw by inverse CDF:
                 token = min { j : C_j > u * C_V },   C = cumsum(q) in float64,  u ~ U[0, 1)
             with one u per row and step from the choice's own `random.Random` (seeded when the request gives
             a seed), so a seed gives the same tokens whatever the batch. Tokens with q_j = 0 have
             C_j = C_(j-1) and can never be drawn.
Reported logprobs are log_softmax(l') — before temperature, as vLLM and OpenAI report them.

One uniform per row replaces V exponential draws per row (`torch.multinomial`, or a Gumbel/exponential race):
at 64 rows of the tiny model's 1,024-token vocabulary that is ~10x less sampling time, and the draw is a
batched cumsum + searchsorted on any device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import torch
from dsv4.runtime.engine.request import SamplingParams, TokenLogprob


class TokenConstraint(Protocol):
    """One choice's rule for which tokens may come next (grammar-constrained decoding, a test's forced output).
    The token bitmask is xgrammar's / llguidance's layout: int32 words, bit j of word w allows token 32 w + j."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the whole of `bitmask[row]`: the tokens allowed next."""

    def accept(self, token_id: int) -> None:
        """The token sampled for this choice (always one the last mask allowed)."""


class ConstraintSpec(Protocol):
    """What a request carries in `SamplingParams.constraint`: makes each choice's own TokenConstraint."""

    def start(self) -> TokenConstraint: ...


@dataclass
class RowSpec:
    """What the sampler needs for one logits row."""

    params: SamplingParams
    generator: random.Random | None  # the choice's uniform stream; None only for greedy rows
    counts: dict[int, int]  # token id -> times generated so far (penalties)
    banned: list[int]  # token ids that may not be sampled now (e.g. EOS before min_tokens)
    num_logprobs: int | None  # None: no logprobs for this row
    constraint: TokenConstraint | None = None  # the tokens allowed next, when the request is constrained


def bitmask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def apply_constraints(logits: torch.Tensor, rows: list[RowSpec]) -> list[int]:
    """Mask the constrained rows of a float32 [N, V] tensor in place (disallowed tokens -> -inf): one bitmask
    for all of them, filled row by row, applied in one batched operation. Returns the constrained rows."""
    idx = [i for i, r in enumerate(rows) if r.constraint is not None]
    if not idx:
        return idx
    vocab = logits.shape[-1]
    bitmask = torch.empty((len(idx), bitmask_words(vocab)), dtype=torch.int32)
    for j, i in enumerate(idx):
        rows[i].constraint.fill_bitmask(bitmask, j)  # type: ignore[union-attr]
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(len(idx), -1)[:, :vocab].bool()
    allowed = allowed.to(logits.device)
    rows_t = torch.tensor(idx, dtype=torch.long)
    masked = logits[rows_t].masked_fill(~allowed, float("-inf"))
    # a ban (EOS before min_tokens) may remove the only tokens the grammar allows: the grammar wins
    dead = ~torch.isfinite(masked).any(dim=-1)
    if bool(dead.any()):
        masked[dead] = torch.zeros_like(masked[dead]).masked_fill(~allowed[dead], float("-inf"))
    logits[rows_t] = masked
    return idx


def make_generator(seed: int | None) -> random.Random:
    """A choice's stream of uniforms: seeded (the seed taken mod 2^64) when the request gives one, else from
    fresh OS entropy."""
    return random.Random() if seed is None else random.Random(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def apply_penalties(logits: torch.Tensor, rows: list[RowSpec]) -> torch.Tensor:
    """Presence/frequency penalties and bans, in place on a float32 [N, V] tensor; returns it."""
    for i, r in enumerate(rows):
        p = r.params
        if r.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(r.counts.keys()), dtype=torch.long)
            cnt = torch.tensor(list(r.counts.values()), dtype=logits.dtype)
            logits[i, ids] -= p.frequency_penalty * cnt + p.presence_penalty
        if r.banned:
            logits[i, torch.tensor(r.banned, dtype=torch.long)] = float("-inf")
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask a 1-D logits row to its top-k and nucleus (top-p) set with -inf. Always keeps the best token."""
    out = logits.clone()
    v = out.numel()
    if 0 < top_k < v:
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= top_p
        drop[0] = False
        out[order[drop]] = float("-inf")
    return out


INVALID = -1  # the token `sample` returns for a row whose probabilities are NaN / inf (non-finite logits)


def sample(logits: torch.Tensor, rows: list[RowSpec]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample one token per row of `logits` [N, V]. Returns token ids and (where asked) their logprobs.
    A sampled row whose distribution is not finite gets INVALID (and no logprobs): the engine fails that
    request alone instead of the whole step."""
    logits = apply_penalties(logits.float().clone(), rows)
    constrained = apply_constraints(logits, rows)
    tokens = [0] * len(rows)
    vocab = logits.shape[-1]
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        best, best_ids = torch.max(take_rows(logits, greedy), dim=-1)  # max propagates NaN: one pass finds both
        for i, t, bad in zip(greedy, best_ids.tolist(), torch.isnan(best).tolist(), strict=True):
            tokens[i] = INVALID if bad else t
    if drawn:
        temps = torch.tensor([rows[i].params.temperature for i in drawn], dtype=logits.dtype)
        scaled = take_rows(logits, drawn) / temps[:, None]
        for j, i in enumerate(drawn):  # top-k / top-p rows are masked one by one; the rest need nothing
            p = rows[i].params
            if 0 < p.top_k < vocab or p.top_p < 1.0:
                scaled[j] = filter_top_k_top_p(scaled[j], p.top_k, p.top_p)
        uniforms = [_uniform(rows[i]) for i in drawn]
        for j, t in enumerate(draw_inverse_cdf(torch.softmax(scaled, dim=-1), uniforms)):
            tokens[drawn[j]] = t
    lps: list[TokenLogprob | None] = [None] * len(rows)
    need = [i for i, r in enumerate(rows) if r.num_logprobs is not None and tokens[i] != INVALID]
    if need:
        logp = torch.log_softmax(logits[need], dim=-1)
        for j, i in enumerate(need):
            lps[i] = token_logprob(logp[j], tokens[i], rows[i].num_logprobs or 0)
    for i in constrained:
        if tokens[i] != INVALID:
            rows[i].constraint.accept(tokens[i])  # type: ignore[union-attr]
    return tokens, lps


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] (a copy), or x itself when `rows` (increasing, as every caller builds them) is every row: the
    common batch where all rows sample."""
    return x if len(rows) == x.shape[0] else x[rows]


def _uniform(row: RowSpec) -> float:
    if row.generator is None:
        raise ValueError("a sampled (non-greedy) row needs a generator; make one with make_generator(seed)")
    return row.generator.random()


def draw_inverse_cdf(probs: torch.Tensor, uniforms: list[float]) -> list[int]:
    """Row i's token: the first j with cumsum(probs[i])_j > u_i * sum(probs[i]). `probs` must be non-negative
    (a softmax); it need not be normalised, and zero-probability tokens are never drawn. A row with a NaN or
    inf, or no mass at all, gets INVALID."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    u = torch.tensor(uniforms, dtype=torch.float64, device=probs.device)[:, None]
    # u < 1, but u * total may round up to total: stay strictly below it so the last positive token is the max
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).tolist()
    # a NaN or inf anywhere in a row makes its total NaN or inf: one check of N numbers instead of N x V
    ok = torch.isfinite(total) & (total > 0)
    if not bool(ok.all()):
        tokens = [t if good else INVALID for t, good in zip(tokens, ok.squeeze(1).tolist(), strict=True)]
    return tokens


def token_logprob(logp_row: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """The chosen token's logprob and the top_n alternatives of a log-softmax row."""
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, ids = torch.topk(logp_row, min(top_n, logp_row.numel()))
        top = [(int(t), float(v)) for t, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    return TokenLogprob(int(token_id), float(logp_row[token_id]), top)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], top_n: int) -> list[TokenLogprob]:
    """Logprobs of the prompt: row j of `logits` predicts `next_ids[j]`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [token_logprob(logp[j], t, top_n) for j, t in enumerate(next_ids)]
