"""Online-softmax single-slot tail state for the HCA compressor (issue 4's option).

The raw-tail path keeps every not-yet-compressed token's `[C | Z]` row (up to `ratio - 1` = 127 rows of
2·d fp32 per HCA layer and request) and pools them when the group completes:

    e_j = RoPE_{j·ratio}(RMSNorm(Σ_i softmax_i(Z_i) ⊙ C_i)),   i over the `ratio` tokens of group j

HCA groups do not overlap (coff = 1), so the per-channel softmax can be folded token by token into one slot
of three d-vectors: running max `m`, running sum `s = Σ exp(Z_i - m)` and weighted sum
`a = Σ exp(Z_i - m) ⊙ C_i`. Folding a run of tokens with max `M' = max(m, max_i Z_i)`:

    s' = s·exp(m - M') + Σ_i exp(Z_i - M'),   a' = a·exp(m - M') + Σ_i exp(Z_i - M') ⊙ C_i

and at the group's end the pooled vector is `a / s` (then RMSNorm + RoPE as before); the next group starts empty.
State: 3·d fp32 per HCA layer and request (6 KiB for d = 512) instead of 128 rows x 2·d (512 KiB).

Vectorised over a chunk: tokens are grouped by `pos // ratio` (a segment max by `scatter_reduce`), so a
chunk that crosses several group boundaries is folded in one pass, no Python loop over tokens.

Selected by `CacheSpec.from_model(..., hca_state="online")`: the `hca_state` pool then has one row per group of
`hca_ratio` positions (a token-granular pool whose block is one group, so `CacheManager` needs no special case)
and `attention._run_compressor` calls `fold_rows` / `pooled_rows` instead of `dispatch.compressor_step`.
Torch only (no Triton kernel yet); `dsv4 serve` has no flag for it yet.
"""

from __future__ import annotations

import torch

M, S, A = 0, 1, 2  # rows of a state [3, d]: running max, running sum of exp, running weighted sum


def empty_state(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The state of a group with no token yet: m = -inf, s = 0, a = 0 (fp32 [3, dim])."""
    st = torch.zeros(3, dim, dtype=torch.float32, device=device)
    st[M] = float("-inf")
    return st


def fold_chunk(state: torch.Tensor, kv: torch.Tensor, score: torch.Tensor, first_pos: int,
               ratio: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one sequence's consecutive tokens at positions `first_pos ..` into the state.

    state [3, d] fp32 (the open group of `first_pos`, empty when `first_pos % ratio == 0`); kv, score [T, d]
    (score includes `ape[p mod ratio]`). Returns (new state [3, d], completed group indices j [E],
    pooled `a / s` of each completed group [E, d] fp32, before RMSNorm and RoPE)."""
    if state.shape != (3, kv.shape[1]) or kv.shape != score.shape:
        raise ValueError(f"state must be [3, d] and kv, score [T, d] alike; got {tuple(state.shape)}, "
                         f"{tuple(kv.shape)}, {tuple(score.shape)}")
    if ratio < 1 or first_pos < 0:
        raise ValueError(f"ratio must be >= 1 and first_pos >= 0, got ratio={ratio}, first_pos={first_pos}")
    T, d = kv.shape
    g0 = first_pos // ratio
    if T == 0:
        return state.clone(), torch.empty(0, dtype=torch.long), torch.empty(0, d)
    pos = first_pos + torch.arange(T)
    seg = (pos // ratio - g0).long()  # 0 = the open group the state belongs to
    G = int(seg[-1]) + 1
    c, z = kv.float(), score.float()
    idx = seg[:, None].expand(T, d)
    mx = torch.full((G, d), float("-inf")).scatter_reduce(0, idx, z, "amax", include_self=True)
    mx[0] = torch.maximum(mx[0], state[M])
    e = torch.exp(z - mx[seg])
    s = torch.zeros(G, d).index_add_(0, seg, e)
    a = torch.zeros(G, d).index_add_(0, seg, e * c)
    carry = torch.exp(state[M] - mx[0])  # 0 for an empty state (exp(-inf))
    s[0] += state[S] * carry
    a[0] += state[A] * carry
    last_done = (first_pos + T) % ratio == 0  # the chunk ends exactly on a group boundary
    n_done = G if last_done else G - 1
    new = empty_state(d) if last_done else torch.stack([mx[-1], s[-1], a[-1]])
    j = torch.arange(g0, g0 + n_done)
    return new, j, a[:n_done] / s[:n_done]


def fold_rows(state: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, score: torch.Tensor,
              ratio: int) -> None:
    """The model's step, in place, for a flattened batch: token t folds into state row `slot[t]` (one row per
    open group of a sequence, `[m | s | a]` in the first 3·d columns; -1 skipped). A row whose first token in
    this step starts its group (`pos % ratio == 0`) starts from the empty state, so recycled blocks need no
    clearing; otherwise it continues the partial group that an earlier step left in the row."""
    keep = slot >= 0
    if not bool(keep.all()):
        slot, pos, kv, score = slot[keep], pos[keep], kv[keep], score[keep]
    if slot.numel() == 0:
        return
    d = kv.shape[1]
    c, z = kv.float(), score.float()
    rows, seg = torch.unique(slot.long(), return_inverse=True)
    U = rows.numel()
    first = torch.full((U,), torch.iinfo(torch.long).max, dtype=torch.long, device=pos.device)
    first = first.scatter_reduce(0, seg, pos.long(), "amin", include_self=True)
    fresh = (first % ratio == 0)[:, None]
    prior = state[rows, : 3 * d].float().view(U, 3, d)
    pm = torch.where(fresh, torch.full_like(prior[:, M], float("-inf")), prior[:, M])
    ps = torch.where(fresh, torch.zeros_like(prior[:, S]), prior[:, S])
    pa = torch.where(fresh, torch.zeros_like(prior[:, A]), prior[:, A])
    mx = torch.full((U, d), float("-inf"), device=z.device)
    mx = torch.maximum(mx.scatter_reduce(0, seg[:, None].expand(-1, d), z, "amax", include_self=True), pm)
    e = torch.exp(z - mx[seg])
    carry = torch.exp(pm - mx)  # 0 for a fresh row
    s = torch.zeros(U, d, device=z.device).index_add_(0, seg, e) + ps * carry
    a = torch.zeros(U, d, device=z.device).index_add_(0, seg, e * c) + pa * carry
    state[rows, : 3 * d] = torch.cat([mx, s, a], dim=-1).to(state.dtype)


def pooled_rows(state: torch.Tensor, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """`a / s` of state rows (groups whose last token has been folded) -> [E, dim] fp32."""
    st = state[rows.long(), : 3 * dim].float().view(-1, 3, dim)
    return st[:, A] / st[:, S]
