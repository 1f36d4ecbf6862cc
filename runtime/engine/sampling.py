"""Token sampling for one step: penalties, greedy / temperature / top-k / top-p, per-choice seeded generators,
and logprobs.

For row i with generated-token counts c:
    l'   = l - frequency_penalty * c - presence_penalty * [c > 0]          (banned tokens -> -inf)
    greedy:  argmax l'
    else:    q = softmax(l' / T); keep the top_k largest; keep the smallest prefix (by descending q) whose mass
             reaches top_p; renormalise; draw with the row's torch.Generator (reproducible for a given seed).
Reported logprobs are log_softmax(l') — before temperature, as vLLM and OpenAI report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dsv4.runtime.engine.request import SamplingParams, TokenLogprob


@dataclass
class RowSpec:
    """What the sampler needs for one logits row."""

    params: SamplingParams
    generator: torch.Generator | None
    counts: dict[int, int]  # token id -> times generated so far (penalties)
    banned: list[int]  # token ids that may not be sampled now (e.g. EOS before min_tokens)
    num_logprobs: int | None  # None: no logprobs for this row


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded when the request gives a seed, else from fresh entropy."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


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


def sample(logits: torch.Tensor, rows: list[RowSpec]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample one token per row of `logits` [N, V]. Returns token ids and (where asked) their logprobs."""
    logits = apply_penalties(logits.float().clone(), rows)
    tokens = torch.argmax(logits, dim=-1).tolist()
    vocab = logits.shape[-1]
    # rows without top-k / top-p: one batched softmax, then a draw per row with its own generator
    plain = [i for i, r in enumerate(rows) if not r.params.greedy and not 0 < r.params.top_k < vocab
             and r.params.top_p >= 1.0]
    if plain:
        temps = torch.tensor([rows[i].params.temperature for i in plain], dtype=logits.dtype)
        probs = torch.softmax(logits[plain] / temps[:, None], dim=-1)
        if bool(torch.isfinite(probs).all()):
            # torch.multinomial(p, 1) is argmax(p / q), q ~ Exp(1) drawn from the generator: the same draws,
            # with one exponential_ per row and one batched argmax (a third less time at 64 rows)
            q = torch.empty_like(probs)
            for j, i in enumerate(plain):
                q[j].exponential_(1, generator=rows[i].generator)
            for j, t in enumerate(torch.argmax(probs / q, dim=-1).tolist()):
                tokens[plain[j]] = int(t)
        else:  # multinomial's own error for NaN / inf rows
            for j, i in enumerate(plain):
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator).item())
    done = set(plain)
    for i, r in enumerate(rows):
        p = r.params
        if p.greedy or i in done:
            continue
        row = filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
    lps: list[TokenLogprob | None] = [None] * len(rows)
    need = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
    if need:
        logp = torch.log_softmax(logits[need], dim=-1)
        for j, i in enumerate(need):
            lps[i] = token_logprob(logp[j], tokens[i], rows[i].num_logprobs or 0)
    return tokens, lps


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
