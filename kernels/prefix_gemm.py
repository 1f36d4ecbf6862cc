"""The torch path's indexer scores and compressed attention without a copy of the rows per query.

The references (`reference.py`, the test oracles) gather a [T, C, D] tensor: every query gets its own copy
of its candidate rows, ~1 GB per 512-token chunk per CSA layer for the indexer at 64K context. In a prefill
chunk the queries of one sequence see nested prefixes of the same compressed entries (query t sees entries
[0, n_t) with n_t non-decreasing), so the chunk needs the rows once and one GEMM serves all its queries:

    K       = rows of the run's last (longest) candidate row                  [C, D]
    indexer:   I[t, c] = Σ_h w[t,h] · ReLU(q[t,h] · K[c])                     [(t·h), D] @ [D, C]
    attention: o[t,h]  = (Σ_w p[t,h,w] v_w + Σ_c p[t,h,c] K[c]) ,  p = softmax over window ∪ K ∪ sink
    -inf logits / scores where the candidate is -1

HCA layers always have this shape (every visible entry is attended); CSA layers have it while a sequence
has at most top-k entries. Runs come from the index rows alone: consecutive rows whose visible columns hold
the same rows as the next row's (`cand[t] < 0 or cand[t] == cand[t+1]`, column by column), so the rule
holds for any batch layout, prefix hits and holes included. Rows outside runs of RUN_MIN or more (decode
tokens) take the reference path, except in the indexer when they share all but a few candidates with their
longest row (sequences decoding after the same prompt): one GEMM against that row's keys plus the few other
entries. Results equal the reference's up to fp32 summation order.
"""

from __future__ import annotations

import torch
from dsv4.kernels.reference import gather_index, gather_kv, indexer_scores_ref, sparse_attention_ref

RUN_MIN = 4  # shorter runs gain nothing over the batched gather
MIN_RUN_COLS = 64  # attention looks for runs from this many compressed rows (fewer: the gather is as cheap)
FEW_ROWS = 32  # fewer rows (no run, <= 2x the window of compressed rows): the reference is faster (~30-120 µs)
BLOCK_ELEMS = 1 << 22  # fp32 [rows, heads, C] per GEMM block (16 MiB: 8-32 rows measured fastest on CPU)
# fp32 rows gathered per block of queries ([t, W + K, D]: window + compressed rows, 32 MiB). Unblocked, a 2,048-token
# prefill step gathered ~400 MiB per layer at W 128 + top-k 256, D 128 (and 4x that at an 8,192-token step budget),
# which the process then keeps as heap (runtime/malloc_tuning.py): the working set grew with the step budget.
GATHER_BLOCK_ELEMS = 1 << 23


def gather_rows_per_block(window: int, comp: int, head_dim: int) -> int:
    """Queries per block whose gathered window + compressed rows stay within GATHER_BLOCK_ELEMS."""
    return max(1, GATHER_BLOCK_ELEMS // max(1, (window + comp) * head_dim))


def prefix_runs(cand_idx: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) row ranges of at least RUN_MIN rows in which each row's candidates are a masked prefix of
    the last row's."""
    T = cand_idx.shape[0]
    if T < RUN_MIN or cand_idx.shape[1] == 0:
        return []
    cur, nxt = cand_idx[:-1], cand_idx[1:]
    extends = ((cur == nxt) | (cur < 0)).all(dim=1)  # row t's visible candidates are row t+1's, same columns
    ends = torch.nonzero(~extends).flatten().tolist() + [T - 1]  # inclusive last row of each run
    runs, start = [], 0
    for last in ends:
        if last + 1 - start >= RUN_MIN:
            runs.append((start, last + 1))
        start = last + 1
    return runs


def _scores_against(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Σ_h w[t,h] · ReLU(q[t,h] · k[c]) for every row t and every key c: [T, C] fp32, blocked GEMMs."""
    T, H, Di = q.shape
    C = k.shape[0]
    out = torch.empty((T, C), dtype=torch.float32, device=q.device)
    k_t = k.t()
    block = max(1, BLOCK_ELEMS // max(1, H * C))
    for s in range(0, T, block):
        e = min(T, s + block)
        scores = torch.relu_((q[s:e].float().reshape(-1, Di) @ k_t).view(e - s, H, C))
        out[s:e] = torch.bmm(weights[s:e].float().unsqueeze(1), scores).squeeze(1)
    return out


def _scores_beside_a_base_row(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, cand_idx: torch.Tensor,
                              index_format: str | None) -> torch.Tensor:
    """Rows outside runs. When they hold the same rows as their longest row at all but at most C entries
    (decode tokens of sequences that share a prompt: a prefix hit), one GEMM against that row's keys and the
    few other entries one by one; otherwise the reference's gather."""
    T, C = cand_idx.shape
    if T > 1 and C:
        base = cand_idx[int((cand_idx >= 0).sum(dim=1).argmax())]
        t_i, c_i = torch.nonzero((cand_idx != base) & (cand_idx >= 0), as_tuple=True)
        if t_i.numel() <= C:
            di = q.shape[2]
            out = _scores_against(q, weights, gather_index(keys, base, di, index_format)[0])
            if t_i.numel():
                own = gather_index(keys, cand_idx[t_i, c_i], di, index_format)[0]  # [P, Di]
                out[t_i, c_i] = (torch.relu_(torch.einsum("phd,pd->ph", q[t_i].float(), own))
                                 * weights[t_i].float()).sum(dim=-1)
            return out
    return indexer_scores_ref(q, weights, keys, cand_idx, index_format=index_format)


def indexer_scores_shared(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, cand_idx: torch.Tensor, *,
                          index_format: str | None = None) -> torch.Tensor:
    """Same contract as `reference.indexer_scores_ref`: [T, C] fp32, -inf where the candidate is -1."""
    T, C = cand_idx.shape
    out = torch.empty((T, C), dtype=torch.float32, device=q.device)
    covered = torch.zeros(T, dtype=torch.bool, device=q.device)
    for start, end in prefix_runs(cand_idx):
        k = gather_index(keys, cand_idx[end - 1], q.shape[2], index_format)[0]
        out[start:end] = _scores_against(q[start:end], weights[start:end], k)
        covered[start:end] = True
    rest = torch.nonzero(~covered).flatten()
    if rest.numel() == T:
        out = _scores_beside_a_base_row(q, weights, keys, cand_idx, index_format)
    elif rest.numel():
        out[rest] = _scores_beside_a_base_row(q[rest], weights[rest], keys, cand_idx[rest], index_format)
    return out.masked_fill_(cand_idx < 0, float("-inf"))


def _window(qs: torch.Tensor, swa_kv: torch.Tensor, swa_idx: torch.Tensor, scale: float,
            rope_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's window rows [t, W, D] and their logits [t, H, W] (-inf where the row is -1)."""
    rows, ok = gather_kv(swa_kv, swa_idx, qs.shape[-1], rope_dim)
    logits = torch.einsum("thd,twd->thw", qs, rows).mul_(scale).masked_fill_(~ok[:, None, :], float("-inf"))
    return rows, logits


def _softmax_with_sink(logits: list[torch.Tensor], sink: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One softmax over the concatenation of `logits` (each [t, H, n]) and the sink, without concatenating:
    the unnormalised probabilities of each part (in place of its logits) and the common denominator [t, H]."""
    sink_logit = sink.float()[None, :]
    m = sink_logit.expand(logits[0].shape[0], -1)  # finite: fully masked rows stay finite
    for lg in logits:
        if lg.shape[-1]:
            m = torch.maximum(m, lg.amax(dim=-1))
    probs = [torch.exp_(lg.sub_(m[..., None])) for lg in logits]
    den = torch.exp(sink_logit - m)
    for p in probs:
        den = den + p.sum(dim=-1)
    return probs, den


def sparse_attention_shared(q: torch.Tensor, swa_kv: torch.Tensor, swa_idx: torch.Tensor,
                            comp_kv: torch.Tensor | None, comp_idx: torch.Tensor | None, sink: torch.Tensor,
                            scale: float, *, rope_dim: int | None = None) -> torch.Tensor:
    """Same contract as `reference.sparse_attention_ref` ([T, H, D] fp32). The compressed rows of each run
    are read once and multiplied as one GEMM; other rows are gathered per query as there. Window and
    compressed logits share one softmax without being concatenated (nor their rows)."""
    T, H, D = q.shape
    has_comp = comp_kv is not None and comp_idx is not None and comp_idx.shape[1] > 0
    out = torch.empty((T, H, D), dtype=torch.float32, device=q.device)
    covered = torch.zeros(T, dtype=torch.bool, device=q.device)
    if has_comp and comp_idx.shape[1] >= MIN_RUN_COLS:
        C = comp_idx.shape[1]
        block = min(max(1, BLOCK_ELEMS // max(1, H * C)), gather_rows_per_block(swa_idx.shape[1], 0, D))
        for start, end in prefix_runs(comp_idx):
            comp, _ = gather_kv(comp_kv, comp_idx[end - 1:end], D, rope_dim)
            comp = comp[0]  # [C, D]
            for s in range(start, end, block):
                e = min(end, s + block)
                qs = q[s:e].float()
                win, lw = _window(qs, swa_kv, swa_idx[s:e], scale, rope_dim)
                lc = (qs.reshape(-1, D) @ comp.t()).view(e - s, H, C).mul_(scale).masked_fill_(
                    (comp_idx[s:e] < 0)[:, None, :], float("-inf"))
                (pw, pc), den = _softmax_with_sink([lw, lc], sink)
                o = torch.einsum("thw,twd->thd", pw, win) + (pc.reshape(-1, C) @ comp).view(e - s, H, D)
                out[s:e] = o.div_(den[..., None])
            covered[start:end] = True
    if bool(covered.all()):
        return out
    whole = not bool(covered.any())  # no run: every row below, without copying
    n_comp = comp_idx.shape[1] if has_comp else 0
    if whole and T < FEW_ROWS and n_comp <= 2 * swa_idx.shape[1]:  # few rows, short lists: the reference's
        # fewer operators cost less than the concatenation they need
        return sparse_attention_ref(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, scale, rope_dim=rope_dim)
    rows_left = torch.arange(T, device=q.device) if whole else torch.nonzero(~covered).flatten()
    step = gather_rows_per_block(swa_idx.shape[1], n_comp, D)
    if whole and T <= step:
        return _attend_gathered(q.float(), swa_kv, swa_idx, comp_kv if has_comp else None, comp_idx, sink, scale,
                                rope_dim)
    for b in range(0, rows_left.numel(), step):
        r = rows_left[b:b + step]
        out[r] = _attend_gathered(q[r].float(), swa_kv, swa_idx[r], comp_kv if has_comp else None,
                                  comp_idx[r] if has_comp else None, sink, scale, rope_dim)
    return out


def _attend_gathered(qs: torch.Tensor, swa_kv: torch.Tensor, swa_idx: torch.Tensor, comp_kv: torch.Tensor | None,
                     comp_idx: torch.Tensor | None, sink: torch.Tensor, scale: float,
                     rope_dim: int | None) -> torch.Tensor:
    """Attention of queries `qs` [t, H, D] over their own gathered window (and compressed) rows."""
    win, lw = _window(qs, swa_kv, swa_idx, scale, rope_dim)
    if comp_kv is not None:
        rows, ok = gather_kv(comp_kv, comp_idx, qs.shape[-1], rope_dim)  # [t, K, D]
        lc = torch.einsum("thd,tkd->thk", qs, rows).mul_(scale).masked_fill_(~ok[:, None, :], float("-inf"))
        (pw, pc), den = _softmax_with_sink([lw, lc], sink)
        o = torch.einsum("thw,twd->thd", pw, win) + torch.einsum("thk,tkd->thd", pc, rows)
    else:
        (pw,), den = _softmax_with_sink([lw], sink)
        o = torch.einsum("thw,twd->thd", pw, win)
    return o.div_(den[..., None])
