"""`DeepseekV4Model`: the full network on the engine's flattened batch.

embed -> hc_mult copies -> per layer [mHC pre -> RMSNorm -> attention -> mHC post; mHC pre -> RMSNorm ->
MoE -> mHC post] -> hc_head fold -> RMSNorm -> head. Parameter names follow the checkpoint (see
`dsv4.runtime.checkpoint.names`), so a state dict maps 1:1 onto file tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from dsv4.runtime.config import CSA, HASH_MOE, HCA, SLIDING, ModelConfig
from dsv4.runtime.model.attention import Attention
from dsv4.runtime.model.batch import ForwardBatch
from dsv4.runtime.model.context import StepContext
from dsv4.runtime.model.kv_pools import KVPools, LayerPools
from dsv4.runtime.model.layers import MHC, MoE, RMSNorm
from dsv4.runtime.model.rope import cos_sin, inv_freq_for
from torch import nn

COMPRESSED_POOL = {CSA: "csa", HCA: "hca"}  # a layer kind's compressed-entry pool


class DecodeStep:
    """How decode steps (every sequence one token) run the blocks. `runtime/model/compiled.py` (`--compile`)
    sets either `stack`, a torch.compile'd `run_blocks` (every block in one compiled frame: the CPU graphs), or
    `block`, a torch.compile'd `Block.forward` called once per layer, with, for CUDA graphs, `buckets`: decode
    batches are padded with empty sequences to the next bucket size so each size has one static graph. None =
    eager, no padding. `guards`: the context the compiled code runs in (compiled.py: guards checked only where
    they tell the warmed graphs apart)."""

    stack: Callable[..., torch.Tensor] | None = None
    block: Callable[..., torch.Tensor] | None = None
    buckets: tuple[int, ...] | None = None
    guards: Callable[[], AbstractContextManager[Any]] = nullcontext
    prepare: Callable[[StepContext], StepContext] | None = None  # compiled.py: ctx as the graphs expect it
    layer_pools: bool = False  # pass each block its `LayerPools` (the CPU graphs take the pools as inputs)


def pad_decode_batch(batch: ForwardBatch, size: int) -> ForwardBatch:
    """`batch` plus `size - S` empty one-token sequences: position 0, every block-table entry -1 (so they read
    and write no cache row, emit no compressed entry and see only their own sink), no logits rows."""
    S, dev = batch.num_seqs, batch.input_ids.device
    n = size - S
    if n <= 0:
        return batch
    zeros = torch.zeros(n, dtype=batch.input_ids.dtype, device=dev)
    starts = batch.query_start[-1] + torch.arange(1, n + 1, dtype=batch.query_start.dtype, device=dev)
    tables = {k: torch.cat([t, torch.full((n, t.shape[1]), -1, dtype=t.dtype, device=dev)])
              for k, t in batch.block_tables.items()}
    return ForwardBatch(torch.cat([batch.input_ids, zeros]), torch.cat([batch.positions, zeros.to(batch.positions)]),
                        torch.cat([batch.query_start, starts]), tables,
                        torch.cat([batch.recompute_until, zeros.to(batch.recompute_until)]),
                        batch.logits_indices, dict(batch.extras))


def is_decode(batch: ForwardBatch) -> bool:
    return 0 < batch.num_tokens == batch.num_seqs


def compiled_decode() -> bool:
    return DecodeStep.stack is not None or DecodeStep.block is not None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, hash_moe: bool, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.layer_type = layer_type
        self.attn = Attention(cfg, layer_type, dtype)
        self.ffn = MoE(cfg, hash_moe, dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        hc = cfg.hc_mult
        mix = (2 + hc) * hc
        for sub in ("attn", "ffn"):
            self.register_parameter(f"hc_{sub}_fn", nn.Parameter(torch.empty(mix, hc * cfg.hidden_size)))
            self.register_parameter(f"hc_{sub}_base", nn.Parameter(torch.empty(mix)))
            self.register_parameter(f"hc_{sub}_scale", nn.Parameter(torch.empty(3)))

    def _pre(self, h: torch.Tensor, sub: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.cfg
        return MHC.pre(h, getattr(self, f"hc_{sub}_fn"), getattr(self, f"hc_{sub}_base"),
                       getattr(self, f"hc_{sub}_scale"), c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, ctx: StepContext, pools: KVPools, layer: int, inv_freq: torch.Tensor,
                input_ids: torch.Tensor, layer_pools: LayerPools | None = None) -> torch.Tensor:
        x, post, comb = self._pre(h, "attn")
        # attention's phases called here (it has no forward): where the compiled decode step breaks its graph at
        # the cache step (`select` as an eager island: CUDA graphs, FP8 pools), a break directly in this frame
        # resumes in this frame — two compiled frames per layer instead of four (each costs guards and a prologue)
        attn = self.attn
        cos, sin = cos_sin(ctx.pos, inv_freq)
        p = attn.project(self.attn_norm(x), ctx.pos, cos, sin)
        rows = attn.select(p, ctx, pools, layer, inv_freq, layer_pools=layer_pools)
        o = attn.combine(p["q"], rows, attn.attn_sink, attn.head_dim ** -0.5).to(p["kv"].dtype)
        h = MHC.post(attn.output(o, cos, sin), h, post, comb)
        x, post, comb = self._pre(h, "ffn")
        f = self.ffn(self.ffn_norm(x), input_ids)
        return MHC.post(f, h, post, comb)


def run_blocks(layers: nn.ModuleList, h: torch.Tensor, ctx: StepContext, pools: KVPools, inv_main: torch.Tensor,
               inv_compress: torch.Tensor, input_ids: torch.Tensor, layer_pools: list[LayerPools] | None = None,
               block: Callable[..., torch.Tensor] = Block.forward) -> torch.Tensor:
    """h -> every block in turn. Compiled as one frame (`DecodeStep.stack`), a decode step pays dynamo's guard
    check and inductor's call wrapper once instead of once per layer."""
    for i, layer in enumerate(layers):
        inv = inv_main if layer.layer_type == SLIDING else inv_compress
        h = block(layer, h, ctx, pools, i, inv, input_ids, layer_pools[i] if layer_pools is not None else None)
    return h


class HyperHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.hc_mult
        self.hc_fn = nn.Parameter(torch.empty(hc, hc * cfg.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(hc))
        self.hc_scale = nn.Parameter(torch.empty(1))


class MTPBlock(Block):
    """Multi-token-prediction block (weights load; used later for speculative decoding):
    h' = Block(e_proj(enorm(embed(next token))) + h_proj(hnorm(h))), logits = head(norm(hc_head(h')))."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__(cfg, SLIDING, False, dtype)
        H, hc = cfg.hidden_size, cfg.hc_mult
        self.e_proj = nn.Linear(H, H, bias=False, dtype=dtype)
        self.h_proj = nn.Linear(H, H, bias=False, dtype=dtype)
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(hc, hc * H))
        self.hc_head_base = nn.Parameter(torch.empty(hc))
        self.hc_head_scale = nn.Parameter(torch.empty(1))


class DeepseekV4Model(nn.Module):
    """forward(batch: ForwardBatch, pools: KVPools) -> logits [len(batch.logits_indices), vocab] fp32."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, with_mtp: bool = True):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        # no init on the meta device (the loader's path): nn.Embedding's normal_ there goes through torch._refs,
        # which imports torch._dynamo (~170 MB of RSS, seconds); real devices keep the default N(0, 1) init
        w = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=w)
        if not self.embed_tokens.weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(
            Block(cfg, cfg.layer_types[i], cfg.mlp_layer_types[i] == HASH_MOE, dtype)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        self.mtp = nn.ModuleList(MTPBlock(cfg, dtype) for _ in range(cfg.num_nextn_predict_layers if with_mtp else 0))
        self.register_buffer("inv_freq_main", inv_freq_for(cfg, compressed=False), persistent=False)
        self.register_buffer("inv_freq_compress", inv_freq_for(cfg, compressed=True), persistent=False)

    def hidden_states(self, batch: ForwardBatch, pools: KVPools) -> torch.Tensor:
        """The final hc streams [T, hc_mult, H] of every token (writes the cache as a side effect). Decode steps
        run the compiled code `--compile` set in `DecodeStep`."""
        cfg = self.cfg
        compiled = compiled_decode() and is_decode(batch)
        ctx = StepContext.build(batch, cfg, pools.spec)
        if compiled and DecodeStep.prepare is not None:
            ctx = DecodeStep.prepare(ctx)
        x = self.embed_tokens(batch.input_ids)
        h = x.unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()
        args = (self.layers, h, ctx, pools, self.inv_freq_main, self.inv_freq_compress, batch.input_ids)
        if not compiled:
            return run_blocks(*args, block=Block.__call__)
        lps = [pools.layer_pools(i, COMPRESSED_POOL.get(layer.layer_type)) for i, layer in enumerate(self.layers)] \
            if DecodeStep.layer_pools else None
        with DecodeStep.guards():
            if DecodeStep.stack is not None:
                return DecodeStep.stack(*args, lps)
            return run_blocks(*args, lps, block=DecodeStep.block)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        y = MHC.head(h, self.hc_head.hc_fn, self.hc_head.hc_base, self.hc_head.hc_scale, c.hc_eps, c.rms_norm_eps)
        return self.head(self.norm(y)).float()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pools: KVPools) -> torch.Tensor:
        if DecodeStep.buckets and compiled_decode() and is_decode(batch):
            size = next((b for b in DecodeStep.buckets if b >= batch.num_seqs), batch.num_seqs)
            batch = pad_decode_batch(batch, size)
        h = self.hidden_states(batch, pools)
        return self.logits(h[batch.logits_indices])


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: Any = "cpu",
                with_mtp: bool = True) -> DeepseekV4Model:
    return DeepseekV4Model(cfg, dtype, with_mtp).to(device)
