"""DeepSeek-V4 attention (one layer) on the flattened batch, reading and writing the paged pools.

q  = RoPE(RMS_h(W_qb · RMSNorm(W_qa x)))           [T, H, D]   (per-head weightless RMS; RoPE on last r dims)
kv = RoPE(RMSNorm(W_kv x))                         [T, D]      (one head, K = V) -> swa pool row of (s, p)
CSA/HCA: compressor state rows -> pooled entries (csa/hca pool); CSA: indexer keys (idx pool) + top-k.
Quantised indexer keys (index_dtype fp8 / fp4): q and k are Hadamard-rotated (k_s ← H k_s, q ← Q(H q)) before
quantisation, as in DeepSeek's reference; (H q)·(H k) = q·k, so only the quantisation error changes.
o  = Σ_{s ∈ window ∪ compressed} softmax(q·k_s / sqrt(D); sink) k_s     (dsv4.kernels.dispatch)
out = W_ob · groupwise(W_oa) · RoPE⁻¹(o)
"""

from __future__ import annotations

from typing import Any

import torch
from dsv4.kernels import dispatch
from dsv4.kernels.index_quant import fake_quantize_index, hadamard_rotate
from dsv4.runtime.config import CSA, HCA, SLIDING
from dsv4.runtime.model import hca_online
from dsv4.runtime.model.context import Emission, StepContext
from dsv4.runtime.model.kv_pools import KVPools
from dsv4.runtime.model.layers import RMSNorm, rms
from dsv4.runtime.model.rope import apply_rope, cos_sin
from torch import nn

# (swa_kv, swa_idx, comp_kv, comp_idx): the rows attention reads and, per query, their indices (-1 = none)
VisibleRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class Compressor(nn.Module):
    """Gated pooling of `ratio` tokens (CSA: coff = 2, overlapping 2·ratio window; HCA: coff = 1).

    Per token: C = W_kv x, Z = W_gate x + ape[p mod ratio] (both coff·d wide), stored in the state pool.
    Entry j = RMSNorm(Σ_t softmax_t(Z_t) ⊙ C_t) over its window, per channel; CSA takes channels [:d] from the
    previous group and [d:] from its own group; then RoPE at position j·ratio.
    """

    def __init__(self, hidden: int, dim: int, ratio: int, coff: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.dim, self.ratio, self.coff = dim, ratio, coff
        self.ape = nn.Parameter(torch.empty(ratio, coff * dim, dtype=torch.float32))
        self.wkv = nn.Linear(hidden, coff * dim, bias=False, dtype=dtype)
        self.wgate = nn.Linear(hidden, coff * dim, bias=False, dtype=dtype)
        self.norm = RMSNorm(dim, eps)

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.wkv(x)
        score = self.wgate(x) + self.ape[pos % self.ratio].to(x.dtype)
        return kv, score

    def pool(self, state: torch.Tensor, valid: torch.Tensor, inv_freq: torch.Tensor, j: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
        """state [E, coff·ratio, 2·coff·d] rows [kv | score]; valid [E, coff·ratio] -> entries [E, d]."""
        d, r, cw = self.dim, self.ratio, self.coff * self.dim
        kv, score = state[..., :cw].to(dtype), state[..., cw:].to(dtype)
        if self.coff == 2:
            kv = torch.cat([kv[:, :r, :d], kv[:, r:, d:]], dim=1)
            score = torch.cat([score[:, :r, :d], score[:, r:, d:]], dim=1)
        kv = torch.where(valid[..., None], kv, torch.zeros_like(kv))
        score = torch.where(valid[..., None], score, torch.full_like(score, float("-inf")))
        w = score.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
        out = self.norm((kv * w).sum(dim=1))
        c, s = cos_sin(j * r, inv_freq)
        return apply_rope(out, c, s)


def _run_compressor(comp: Compressor, projected: tuple[torch.Tensor, torch.Tensor], ctx: StepContext, kind: str,
                    pools: KVPools, layer: int, state_pool: str, cols: tuple[int, int], out_pool: str,
                    inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
    """Write this step's state rows (`projected` = `comp.project(x, pos)`), then emit every completed entry into
    `out_pool`. One `dispatch.compressor_step` (Triton on CUDA; torch reference otherwise, bit-identical to
    `Compressor.pool` + `KVPools.write`)."""
    kv, score = projected
    em: Emission = ctx.emissions[kind]
    if kind == HCA and getattr(pools.spec, "hca_state", "raw") == "online":
        _run_hca_online(comp, kv, score, ctx, em, pools, layer, state_pool, out_pool, inv_freq)
        return
    fmt = "plain"
    if pools.is_fp8(out_pool):
        fmt = f"{pools.spec.index_dtype}_index" if out_pool == "idx" else "fp8_kv"
    if out_pool == "idx" and fmt != "plain":
        _run_rotated_index_compressor(comp, kv, score, ctx, em, pools, layer, state_pool, cols, fmt, inv_freq,
                                      dtype)
        return
    dispatch.compressor_step(kv, score, pools.tensor(state_pool, layer), ctx.state_slot[kind], em.state_rows,
                             em.entry, em.dest, pools.tensor(out_pool, layer), comp.norm.weight, inv_freq,
                             ratio=comp.ratio, coff=comp.coff, eps=comp.norm.eps, col_offset=cols[0], out_format=fmt,
                             rope_dim=pools.rope_dim, compute_dtype=dtype)


def _run_rotated_index_compressor(comp: Compressor, kv: torch.Tensor, score: torch.Tensor, ctx: StepContext,
                                  em: Emission, pools: KVPools, layer: int, state_pool: str, cols: tuple[int, int],
                                  fmt: str, inv_freq: torch.Tensor, dtype: torch.dtype) -> None:
    """The indexer's compressor with quantised keys, DeepSeek's order: pool + RMSNorm + RoPE into plain entries,
    rotate them (`hadamard_rotate`), then quantise into the idx pool (`fmt` "fp8_index" / "fp4_index")."""
    n_emit = em.dest.shape[0]
    entries = torch.zeros(n_emit, comp.dim, dtype=dtype, device=kv.device)
    local = torch.arange(n_emit, dtype=em.dest.dtype, device=em.dest.device)
    local = torch.where(em.dest >= 0, local, torch.full_like(local, -1))
    dispatch.compressor_step(kv, score, pools.tensor(state_pool, layer), ctx.state_slot[CSA], em.state_rows,
                             em.entry, local, entries, comp.norm.weight, inv_freq, ratio=comp.ratio, coff=comp.coff,
                             eps=comp.norm.eps, col_offset=cols[0], out_format="plain", compute_dtype=dtype)
    if n_emit:
        dispatch.store_rows(hadamard_rotate(entries), em.dest, pools.tensor("idx", layer), out_format=fmt)


def _run_hca_online(comp: Compressor, kv: torch.Tensor, score: torch.Tensor, ctx: StepContext, em: Emission,
                    pools: KVPools, layer: int, state_pool: str, out_pool: str, inv_freq: torch.Tensor) -> None:
    """HCA with the online-softmax single-slot state (`cache_spec(..., hca_state="online")`): fold every token
    into its group's slot, then RMSNorm + RoPE the completed groups' `a / s` into the HCA pool (torch only)."""
    state = pools.tensor(state_pool, layer)
    slot = ctx.state_slot[HCA]
    hca_online.fold_rows(state, slot, ctx.pos, kv, score, comp.ratio)
    if em.token.numel() == 0:
        return
    pooled = hca_online.pooled_rows(state, slot[em.token], comp.dim).to(kv.dtype)
    c, s = cos_sin(em.entry * comp.ratio, inv_freq)
    pools.write(out_pool, layer, em.dest, apply_rope(comp.norm(pooled), c, s))


class Indexer(nn.Module):
    """Lightning indexer: I(t, s) = Σ_h w_{t,h} · ReLU(q_{t,h} · k_s); keeps the top-k visible entries."""

    def __init__(self, cfg: Any, dtype: torch.dtype):
        super().__init__()
        self.n, self.d, self.k = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n * self.d, bias=False, dtype=dtype)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n, bias=False, dtype=dtype)
        self.compressor = Compressor(cfg.hidden_size, self.d, cfg.csa_ratio, 2, cfg.rms_norm_eps, dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Any, layer_type: str, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.layer_type = layer_type
        # traced code branches on these bools: dynamo guards a module's bool attributes, not its str ones, so a
        # graph traced for one layer kind would otherwise be reused for another
        self.compressed, self.sparse = layer_type != SLIDING, layer_type == CSA
        H, D, nH = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
        self.n_heads, self.head_dim = nH, D
        self.wq_a = nn.Linear(H, cfg.q_lora_rank, bias=False, dtype=dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, nH * D, bias=False, dtype=dtype)
        self.wkv = nn.Linear(H, D, bias=False, dtype=dtype)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.wo_a = nn.Linear(nH * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False, dtype=dtype)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, H, bias=False, dtype=dtype)
        self.attn_sink = nn.Parameter(torch.empty(nH, dtype=torch.float32))
        if layer_type != SLIDING:
            coff = 2 if layer_type == CSA else 1
            self.compressor = Compressor(H, D, cfg.compress_rates[layer_type], coff, cfg.rms_norm_eps, dtype)
        if layer_type == CSA:
            self.indexer = Indexer(cfg, dtype)
        self.eps = cfg.rms_norm_eps

    def project(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> dict[str, Any]:
        """The dense part before the cache, every projection of x: q [T, H, D] and kv [T, D] with RoPE; the
        compressors' (kv, score) rows; the indexer's queries qi [T, n, d] (RoPE) and head weights w [T, n]."""
        T = x.shape[0]
        qr = self.q_norm(self.wq_a(x))
        q = rms(self.wq_b(qr).view(T, self.n_heads, self.head_dim), self.eps)
        out: dict[str, Any] = {"q": apply_rope(q, cos, sin), "kv": apply_rope(self.norm(self.wkv(x)), cos, sin)}
        if self.compressed:
            out["comp"] = self.compressor.project(x, pos)
        if self.sparse:
            ix = self.indexer
            out["index_comp"] = ix.compressor.project(x, pos)
            out["qi"] = apply_rope(ix.wq_b(qr).view(T, ix.n, ix.d), cos, sin)
            out["w"] = ix.weights_proj(x).float() * (ix.n ** -0.5 * ix.d ** -0.5)
        return out

    def write(self, p: dict[str, Any], ctx: StepContext, pools: KVPools, layer: int, inv_freq: torch.Tensor) -> None:
        """The cache writes of this step, on `project`'s outputs: kv into the window pool, the compressors' state
        rows, and every compressed entry a compression group completes (emissions: data-dependent counts)."""
        dtype = p["kv"].dtype
        pools.write("swa", layer, ctx.swa_slot, p["kv"])
        if self.layer_type == HCA:
            D = self.head_dim
            _run_compressor(self.compressor, p["comp"], ctx, HCA, pools, layer, "hca_state", (0, 2 * D), "hca",
                            inv_freq, dtype)
        elif self.layer_type == CSA:
            D, Di = self.head_dim, self.cfg.index_head_dim
            _run_compressor(self.compressor, p["comp"], ctx, CSA, pools, layer, "csa_state", (0, 4 * D), "csa",
                            inv_freq, dtype)
            _run_compressor(self.indexer.compressor, p["index_comp"], ctx, CSA, pools, layer, "csa_state",
                            (4 * D, 4 * D + 4 * Di), "idx", inv_freq, dtype)

    def select(self, p: dict[str, Any], ctx: StepContext, pools: KVPools, layer: int, inv_freq: torch.Tensor,
               layer_pools: Any = None) -> VisibleRows:
        """The paged-cache part, on `project`'s outputs: `write`, then select the visible entries — the window,
        and the top-k (CSA, `top_entries`) or every (HCA) compressed entry. Its shapes depend on the data
        (emissions, visible counts), so `--compile` keeps it eager, or on CPU with plain pools traces a
        static-shape equivalent (`compiled._select_in_graph`, which takes `layer_pools`; unused here)."""
        self.write(p, ctx, pools, layer, inv_freq)
        swa_kv, swa_idx = pools.gather_view("swa", layer, ctx.swa_idx)
        comp_kv = comp_idx = None
        if self.layer_type == HCA:
            comp_kv, comp_idx = pools.gather_view("hca", layer, ctx.visible[HCA])
        elif self.layer_type == CSA:
            comp_kv, comp_idx = pools.gather_view("csa", layer, self.top_entries(p, ctx, pools, layer))
        return swa_kv, swa_idx, comp_kv, comp_idx

    def top_entries(self, p: dict[str, Any], ctx: StepContext, pools: KVPools, layer: int) -> torch.Tensor:
        """A CSA layer's lightning-indexer selection: per query the physical csa rows of its top-k visible entries
        [T, k] (-1 padded), scored with `project`'s indexer queries against the idx pool."""
        ix = self.indexer
        qi = p["qi"]
        if pools.is_fp8("idx"):  # the reference's q: rotated like the keys, then quantised like them
            qi = fake_quantize_index(hadamard_rotate(qi), pools.spec.index_dtype)
        cand = ctx.visible[CSA]
        keys, kidx = pools.gather_view("idx", layer, cand)
        top = dispatch.indexer_topk(qi, p["w"], keys, kidx, ix.k)  # ties: the lower entry index wins, topk.py
        if keys is not pools.tensor("idx", layer):  # fp8 / compacted view: map back to physical rows
            top = _unmap(top, kidx, cand)
        return top

    @staticmethod
    def combine(q: torch.Tensor, rows: VisibleRows, sink: torch.Tensor, scale: float) -> torch.Tensor:
        """o = Σ_s softmax(q·k_s · scale; sink) k_s over the selected rows, fp32 [T, H, D] (`dispatch`: Triton
        on CUDA, the torch path otherwise). `--compile` on CPU traces the torch reference into the graph."""
        return dispatch.sparse_attention(q, *rows, sink, scale)

    def output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The dense part after the cache: RoPE⁻¹, then W_ob · groupwise(W_oa)."""
        T, cfg = o.shape[0], self.cfg
        o = apply_rope(o, cos, sin, inverse=True)
        g = cfg.o_groups
        og = o.reshape(T, g, -1)
        wa = self.wo_a.weight.view(g, cfg.o_lora_rank, -1)
        y = torch.einsum("tgi,goi->tgo", og, wa).reshape(T, -1)
        return self.wo_b(y)


def _unmap(top: torch.Tensor, kidx: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Indices into a compacted row set -> physical rows, via the candidate table (same positions)."""
    # each compacted index value v corresponds to the physical row at any candidate position with kidx == v
    flat_k, flat_c = kidx.reshape(-1), cand.reshape(-1)
    ok = flat_k >= 0
    size = int(flat_k[ok].max().item()) + 1 if bool(ok.any()) else 1
    back = torch.full((size,), -1, dtype=cand.dtype, device=cand.device)
    back[flat_k[ok]] = flat_c[ok]
    return torch.where(top >= 0, back[top.clamp(min=0)], torch.full_like(top, -1))



