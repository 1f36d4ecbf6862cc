"""Weight size of a DeepSeek-V4 checkpoint at a given quantization, computed from config shapes.

Parameter count (per decoder layer; the MTP layer counts as one more decoder layer):

    attention  = hidden*q_lora + q_lora*heads*head_dim          (wq_a, wq_b)
               + hidden*head_dim                                (wkv: one shared K=V head)
               + heads*head_dim*o_lora                          (wo_a, grouped)
               + o_groups*o_lora*hidden                         (wo_b)
               + heads                                          (attention sink)
    compressor = 2 * hidden * coff*head_dim        (CSA coff=2, HCA coff=1: kv and gate projections)
    indexer    = q_lora*index_heads*index_head_dim + hidden*index_heads + 2*hidden*2*index_head_dim   (CSA only)
    routed     = n_routed_experts * 3*hidden*moe_inter          (gate, up, down of every routed expert)
    shared     = n_shared_experts * 3*hidden*moe_inter
    router     = hidden*n_routed_experts
    embeddings = vocab*hidden (input) + vocab*hidden (lm_head, unless tied)

Bytes per parameter by `quantization`:
    fp8-fp4 (as released): routed experts FP4 e2m1 = 0.5 B + one UE8M0 scale per 32 values = 17/32 B;
             other linear layers FP8 e4m3 = 1 B + one fp32 scale per 128x128 tile (4/16384 B);
             embeddings, lm_head, norms, sinks and routers bf16 (2 B).
    fp8:     all linear layers (experts too) FP8 with 128x128 fp32 tile scales; embeddings bf16.
    bf16:    everything 2 B.

Flash gives ~284e9 parameters / ~158 GB at fp8-fp4, Pro ~1.6e12 / ~860 GB (cf. ~850 GB quoted for
staging V4-Pro on node NVMe). Norms and hyper-connection mixers are < 0.01 % and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.runtime.config import CSA, HCA, ModelConfig

QUANTIZATIONS = ("fp8-fp4", "fp8", "bf16")
_FP8 = 1.0 + 4.0 / (128 * 128)
_FP4 = 0.5 + 1.0 / 32
_BF16 = 2.0


@dataclass(frozen=True)
class ParamCounts:
    attention: int   # attention, compressors and indexers of every layer (dense, TP-sharded)
    routed: int      # routed experts (EP-sharded)
    shared: int      # shared experts
    router: int      # expert-routing gates (kept bf16)
    embeddings: int  # input embedding + lm_head

    @property
    def total(self) -> int:
        return self.attention + self.routed + self.shared + self.router + self.embeddings


def param_counts(cfg: ModelConfig) -> ParamCounts:
    h, d, heads = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    attn_layer = (h * cfg.q_lora_rank + cfg.q_lora_rank * heads * d + h * d + heads * d * cfg.o_lora_rank
                  + cfg.o_groups * cfg.o_lora_rank * h + heads)
    csa_extra = (2 * h * 2 * d + cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim
                 + h * cfg.index_n_heads + 2 * h * 2 * cfg.index_head_dim)
    hca_extra = 2 * h * d
    n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    n_csa, n_hca = len(cfg.layers_of(CSA)), len(cfg.layers_of(HCA))
    attention = attn_layer * n_layers + csa_extra * n_csa + hca_extra * n_hca
    expert = 3 * h * cfg.moe_intermediate_size
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return ParamCounts(
        attention=attention,
        routed=cfg.n_routed_experts * expert * n_layers,
        shared=cfg.n_shared_experts * expert * n_layers,
        router=h * cfg.n_routed_experts * n_layers,
        embeddings=emb,
    )


def bytes_per_param(quantization: str) -> dict[str, float]:
    """Bytes per parameter of each component under `quantization`."""
    if quantization == "fp8-fp4":
        return {"attention": _FP8, "routed": _FP4, "shared": _FP8, "router": _BF16, "embeddings": _BF16}
    if quantization == "fp8":
        return {"attention": _FP8, "routed": _FP8, "shared": _FP8, "router": _BF16, "embeddings": _BF16}
    if quantization == "bf16":
        return dict.fromkeys(("attention", "routed", "shared", "router", "embeddings"), _BF16)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def weight_bytes(cfg: ModelConfig, quantization: str = "fp8-fp4") -> int:
    """Bytes of all weights (to be split evenly over a TP/EP group)."""
    counts, bpp = param_counts(cfg), bytes_per_param(quantization)
    return int(sum(getattr(counts, k) * v for k, v in bpp.items()))


def active_bytes_per_token(cfg: ModelConfig, quantization: str = "fp8-fp4") -> int:
    """Weight bytes one decode token touches: dense parts plus num_experts_per_tok routed experts."""
    counts, bpp = param_counts(cfg), bytes_per_param(quantization)
    routed_per_token = counts.routed * cfg.num_experts_per_tok / cfg.n_routed_experts
    dense = counts.attention * bpp["attention"] + counts.shared * bpp["shared"] + counts.router * bpp["router"]
    lm_head = cfg.vocab_size * cfg.hidden_size * bpp["embeddings"]
    return int(dense + routed_per_token * bpp["routed"] + lm_head)


def active_params_per_token(cfg: ModelConfig) -> int:
    """Parameters multiplied per token (FLOPs per token = 2 x this)."""
    c = param_counts(cfg)
    return int(c.attention + c.shared + c.router + c.routed * cfg.num_experts_per_tok / cfg.n_routed_experts
               + cfg.vocab_size * cfg.hidden_size)


def decode_weight_bytes(cfg: ModelConfig, quantization: str, batch: int) -> int:
    """Weight bytes one decode step of `batch` sequences reads: all dense weights plus the expected
    fraction of routed experts touched, 1 - (1 - k/E)^batch (k experts per token, E experts)."""
    counts, bpp = param_counts(cfg), bytes_per_param(quantization)
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    touched = 1.0 - (1.0 - k / e) ** max(1, batch)
    dense = counts.attention * bpp["attention"] + counts.shared * bpp["shared"] + counts.router * bpp["router"]
    lm_head = cfg.vocab_size * cfg.hidden_size * bpp["embeddings"]
    return int(dense + counts.routed * bpp["routed"] * touched + lm_head)
