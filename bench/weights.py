"""Weight bytes of a DeepSeek-V4 config from its shapes (for the capacity budget; no checkpoint needed).

Parameters per decoder layer (H hidden, D head_dim, h heads, r_q q_lora_rank, r_o o_lora_rank,
g o_groups, E routed experts, I moe_intermediate_size, Di/hi indexer dims/heads, m = hc_mult):

    attention   H*r_q + r_q*h*D + H*D + h*D*r_o + g*r_o*H           (wq_a, wq_b, wkv, wo_a grouped, wo_b)
    compressor  2*H*c*D + m_ratio*c*D                                (wkv, wgate, ape; c = 2 for CSA, 1 for HCA)
    indexer     r_q*hi*Di + H*hi + 2*H*2*Di + 4*2*Di                 (CSA layers: wq_b, weights_proj, compressor)
    routed      E*3*H*I      shared  n_shared*3*H*I      router  E*H
    mHC         2 * (m*H) * (m*m + 2*m)                              (hc_attn_fn, hc_ffn_fn)
plus embedding and LM head (vocab*H each) and `num_nextn_predict_layers` MTP layers (one layer + 2H*H).

Storage: routed experts MXFP4 (4 bits + one UE8M0 scale per 32 values = 0.53125 B/param), the LM
head and embedding BF16, everything else FP8 (1 B/param; block scales are < 0.01% and ignored).
Without the MTP layer Flash comes to 284.3B parameters and Pro to 1.57T (published: 284B, 1.6T);
the MTP layer (loaded for speculative decoding, counted by default) adds 6.4B / 26B.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.runtime.config import CSA, HCA, ModelConfig

FP4_BYTES = 0.5 + 1 / 32
FP8_BYTES = 1.0
BF16_BYTES = 2.0


@dataclass(frozen=True)
class WeightBytes:
    routed_params: int
    dense_params: int  # FP8 part: attention, compressors, indexers, shared experts, routers, mHC
    embed_params: int  # embedding + LM head (BF16)

    @property
    def total_params(self) -> int:
        return self.routed_params + self.dense_params + self.embed_params

    @property
    def bytes(self) -> int:
        return int(self.routed_params * FP4_BYTES + self.dense_params * FP8_BYTES + self.embed_params * BF16_BYTES)


def weight_bytes(cfg: ModelConfig, include_mtp: bool = True) -> WeightBytes:
    H, D, h = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    Di, hi, m = cfg.index_head_dim, cfg.index_n_heads, cfg.hc_mult
    attn = (H * cfg.q_lora_rank + cfg.q_lora_rank * h * D + H * D + h * D * cfg.o_lora_rank
            + cfg.o_groups * cfg.o_lora_rank * H)
    hc = 2 * (m * H) * (m * m + 2 * m)
    shared = cfg.n_shared_experts * 3 * H * cfg.moe_intermediate_size
    router = cfg.n_routed_experts * H
    routed_per_layer = cfg.n_routed_experts * 3 * H * cfg.moe_intermediate_size
    dense = 0
    for kind in cfg.layer_types:
        dense += attn + hc + shared + router
        if kind == CSA:
            dense += 2 * H * 2 * D + cfg.csa_ratio * 2 * D
            dense += cfg.q_lora_rank * hi * Di + H * hi + 2 * H * 2 * Di + cfg.csa_ratio * 2 * Di
        elif kind == HCA:
            dense += 2 * H * D + cfg.hca_ratio * D
    mtp = cfg.num_nextn_predict_layers if include_mtp else 0
    dense += mtp * (attn + hc + shared + router + 2 * H * H)
    routed = (cfg.num_hidden_layers + mtp) * routed_per_layer
    return WeightBytes(routed, dense, 2 * cfg.vocab_size * H)
