"""Building blocks: RMSNorm, mHC (manifold-constrained hyper-connections), MoE with hash / learned routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from dsv4.kernels import dispatch
from torch import nn


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last dim, in fp32, returned in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps); fp32 weight, computed in fp32, cast back once."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def hc_pre(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int,
           hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC mixing weights for one sublayer. h [T, hc, D] -> (collapsed [T, D], post [T, hc], comb [T, hc, hc]).

    m = RMS(flatten(h)) · fnᵀ; pre = σ(m_pre·s0 + b_pre) + eps; post = 2σ(m_post·s1 + b_post);
    comb = Sinkhorn(softmax(m_comb·s2 + b_comb) + eps) (column-normalise, then iters-1 row/column rounds);
    collapsed = Σ_i pre_i · h_i.
    """
    flat = rms(h.flatten(1).float(), norm_eps)
    mixes = F.linear(flat, fn.float())
    pre, post, comb = MHC.weights(mixes, base, scale, hc, iters, hc_eps)
    collapsed = (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)
    return collapsed, post, comb


def mhc_weights(mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int, hc_eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre [T, hc], post [T, hc], comb [T, hc, hc]) from the mixing logits [T, (2 + hc)·hc]: ~120 tiny
    elementwise / reduction operators (the Sinkhorn rounds), the part `--compile` fuses into one kernel."""
    T = mixes.shape[0]
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)
    comb = torch.softmax(comb_w.view(T, hc, hc) * s[2] + comb_b.view(hc, hc), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    return pre, post, comb


def hc_post(out: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """h'_k = post_k · out + Σ_j comb[j, k] · h_j."""
    dt = h.dtype
    return post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), h)


def hc_head(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """Final fold of the hc streams: Σ_i (σ(m_i·s + b_i) + eps) · h_i."""
    flat = rms(h.flatten(1).float(), norm_eps)
    mixes = F.linear(flat, fn.float())
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)


class MHC:
    """The mHC functions the model calls. `runtime/model/compiled.py` swaps in torch.compile'd versions
    (`dsv4 serve --compile`) and back; the eager definitions above stay the reference."""

    pre = staticmethod(hc_pre)
    weights = staticmethod(mhc_weights)
    post = staticmethod(hc_post)
    head = staticmethod(hc_head)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) · clamp(up, -limit, limit)."""
    if limit and limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class Expert(nn.Module):
    """The shared expert: w2(swiglu(w1 x, w3 x))."""

    def __init__(self, hidden: int, inter: int, limit: float, dtype: torch.dtype):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.w2 = nn.Linear(inter, hidden, bias=False, dtype=dtype)
        self.w3 = nn.Linear(hidden, inter, bias=False, dtype=dtype)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


GATHER_BYTES = 16 * 2**20  # expert matrices `Experts.forward_gathered` may copy per call


class Experts(nn.Module):
    """Routed experts stacked: w1, w3 [E, I, H], w2 [E, H, I] (file tensors `experts.e.wK.weight` fill row e)."""

    def __init__(self, n: int, hidden: int, inter: int, limit: float, dtype: torch.dtype):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, inter, hidden, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(n, hidden, inter, dtype=dtype))
        self.w3 = nn.Parameter(torch.empty(n, inter, hidden, dtype=dtype))
        self.n = n
        self.limit = limit

    @property
    def fp4(self) -> bool:
        """Whether the weights are FP4 codes + E8M0 scales (`quantized.quantize_experts`: buffers `w1_q`, `w1_s`,
        ...) instead of the stacked parameters."""
        return "w1_q" in self._buffers

    def matrix(self, name: str, e: int) -> torch.Tensor:
        """Expert e's `name` (w1 / w2 / w3) in the model dtype: a row of the stacked parameter, or dequantised from
        the FP4 codes + scales that `model/quantized.quantize_experts` keeps instead."""
        codes = self._buffers.get(name + "_q")
        if codes is None:
            return getattr(self, name)[e]
        from dsv4.kernels.quant_gemm import expert_weight

        return expert_weight(codes, self._buffers[name + "_s"], e, self.dtype, name)

    def forward_sorted(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert outputs for rows sorted by expert: xs [R, H] holds counts[e] rows for expert e, in order; returns
        [R, H], row r = expert_e(xs[r]).

        FP4 experts on the Triton backend (CUDA, or the interpreter): three grouped GEMMs over all rows at once
        (`dispatch.mxfp4_grouped_gemm`: w1, w3, then w2 on the SwiGLU). Otherwise a loop over the experts with
        rows (`experts_loop`, each FP4 matrix dequantised on the fly): the torch path, whose numbers do not depend on
        how the rows are batched."""
        bufs = self._buffers
        if self.fp4 and dispatch.choose_backend(xs, bufs["w1_q"]) != "torch":
            up = [dispatch.mxfp4_grouped_gemm(xs, bufs[n + "_q"], bufs[n + "_s"], counts, backend="triton")
                  for n in ("w1", "w3")]
            return dispatch.mxfp4_grouped_gemm(swiglu(*up, self.limit), bufs["w2_q"], bufs["w2_s"], counts,
                                               backend="triton")
        return experts_loop(xs, counts, self.matrix, self.limit)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H]; idx, w [T, k] -> Σ_k w · expert_idx(x). Eager: `forward_grouped`. Inside the compiled decode
        step (`compiled.py`) a small batch (T·k <= experts, plain weights) gathers its experts' matrices instead,
        so the step needs no graph break here; larger batches call `forward_grouped` (on CPU with plain weights
        `layers.padded_experts` around the `dsv4::padded_expert_rows` op, otherwise an eager island)."""
        T, k = idx.shape
        if torch.compiler.is_compiling() and self.gathers(T * k):
            return self.forward_gathered(x, idx, w)
        return self.forward_grouped(x, idx, w)

    def gathers(self, pairs: int) -> bool:
        """Whether `forward_gathered` serves `pairs` (token, choice) pairs: plain weights, no more pairs than
        experts, and the gathered matrices within `GATHER_BYTES` (a real model's experts never qualify)."""
        if self.fp4:
            return False
        pair_bytes = 3 * self.w1.shape[1] * self.w1.shape[2] * self.w1.element_size()
        return pairs <= self.n and pairs * pair_bytes <= GATHER_BYTES

    def forward_gathered(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_k w · w2_e · swiglu(w1_e · x, w3_e · x) with e = idx, one batched matmul per weight over the (token,
        choice) pairs: no data-dependent shapes (reads k matrices per token: for small decode batches only)."""
        T, k = idx.shape
        e = idx.reshape(-1)
        xs = x.repeat_interleave(k, dim=0)[:, :, None]
        h = swiglu(torch.bmm(self.w1[e], xs), torch.bmm(self.w3[e], xs), self.limit)
        y = torch.bmm(self.w2[e], h)[..., 0]
        return (y * w.reshape(-1, 1).to(y.dtype)).view(T, k, -1).sum(dim=1)

    def forward_grouped(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The (token, choice) pairs sorted by expert through `forward_sorted` (`grouped_pairs`)."""
        return grouped_pairs(x, idx, w, self.n, self.forward_sorted)


def experts_loop(xs: torch.Tensor, counts: list[int], matrix: Callable[[str, int], torch.Tensor], limit: float
                 ) -> torch.Tensor:
    """Rows sorted by expert (counts[e] rows for expert e, in order) through their experts, one expert at a time:
    w2_e · swiglu(w1_e · x, w3_e · x), `matrix(name, e)` giving expert e's w1 / w2 / w3."""
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts):
        if c:
            xe = xs[start:start + c]
            ys[start:start + c] = F.linear(swiglu(F.linear(xe, matrix("w1", e)), F.linear(xe, matrix("w3", e)), limit),
                                           matrix("w2", e))
        start += c
    return ys


def grouped_pairs(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, n: int,
                  run_sorted: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
    """Σ_k w · expert_idx(x) with the (token, choice) pairs sorted by expert and run by `run_sorted(rows, counts)`.
    Each pair writes its own row of a [T·k, H] buffer (a plain index put: no scatter-add, which is slow on CPU),
    then the k rows of a token are summed."""
    T, k = idx.shape
    flat_e = idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    counts = torch.bincount(flat_e, minlength=n).tolist()
    y = run_sorted(x[order // k], counts)
    ys = torch.empty(T * k, x.shape[-1], dtype=x.dtype, device=x.device)
    ys[order] = (y * w.reshape(-1)[order, None].to(y.dtype)).to(x.dtype)
    return ys.view(T, k, -1).sum(dim=1)


def padded_experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   w3: torch.Tensor, limit: float, rows_fn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_k w · expert_idx(x) over plain stacks w1, w3 [E, I, H], w2 [E, H, I]: each (token, choice) pair's row
    through `padded_rows` (`rows_fn`: the compiled decode step passes its `dsv4::padded_expert_rows` op, the one
    part whose shapes depend on the routing; eager keeps the per-expert loop, whose rows do not depend on the
    batch). Every step here but that one has static shapes, so the compiled graph traces them."""
    T, k = idx.shape
    e = idx.reshape(-1)
    xs = x[:, None, :].expand(T, k, x.shape[-1]).reshape(T * k, -1)
    y = (rows_fn or padded_rows)(xs, e, expert_ranks(e, w1.shape[0]), w1, w2, w3, limit)
    return (y.view(T, k, -1) * w[..., None].to(y.dtype)).to(x.dtype).sum(dim=1)


def expert_ranks(e: torch.Tensor, n: int) -> torch.Tensor:
    """Each pair's place among the pairs of its expert e[p] (0, 1, ... in pair order), of n experts."""
    return (F.one_hot(e, n).cumsum(0) - 1).gather(1, e[:, None])[:, 0]


def padded_rows(xs: torch.Tensor, e: torch.Tensor, rank: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                w3: torch.Tensor, limit: float) -> torch.Tensor:
    """expert_e(xs) for pair rows xs [P, H] (pair p to expert e[p], its `expert_ranks` place rank[p]) as three
    batched matmuls: the rows packed into an [E, cap, H] buffer (cap = the most pairs of one expert, unused slots
    zero), so every expert's matrices are read once and the step is three GEMM calls instead of three per expert.
    Wasted work: E·cap - P rows, small next to the weights for decode batches."""
    cap = int(rank.max()) + 1 if rank.numel() else 0
    rows = xs.new_zeros(w1.shape[0], cap, xs.shape[-1])
    rows[e, rank] = xs
    h = swiglu(torch.bmm(rows, w1.transpose(1, 2)), torch.bmm(rows, w3.transpose(1, 2)), limit)
    return torch.bmm(h, w2.transpose(1, 2))[e, rank]


class Gate(nn.Module):
    """Router. Hash layers pick experts by `tid2eid[token]`; others by top-k of score + bias.
    Weights are the scores of the chosen experts, normalised to sum 1, times `routed_scaling_factor`."""

    def __init__(self, cfg: Any, hash_moe: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype))
        self.hash = hash_moe
        if hash_moe:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.k = cfg.num_experts_per_tok
        self.func = cfg.scoring_func
        self.scale = cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        if self.func == "sqrtsoftplus":
            scores = torch.sqrt(F.softplus(logits))
        elif self.func == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        if self.hash:
            idx = self.tid2eid[input_ids].long()
        else:
            idx = torch.topk(scores + self.bias, self.k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.scale


class MoE(nn.Module):
    def __init__(self, cfg: Any, hash_moe: bool, dtype: torch.dtype):
        super().__init__()
        self.gate = Gate(cfg, hash_moe, dtype)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit,
                               dtype)
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size,
                                     cfg.swiglu_limit, dtype)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x, input_ids)
        return self.experts(x, idx, w) + self.shared_experts(x)
