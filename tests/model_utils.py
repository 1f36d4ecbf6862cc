"""Shared helpers of the model tests: tiny configs, a transformers twin saved with save_pretrained,
and a driver that runs sequences through `DeepseekV4Model` with scattered paged blocks."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from dsv4.runtime.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig
from dsv4.runtime.model import ForwardBatch, KVPools, cache_spec


def tiny_configs() -> dict[str, ModelConfig]:
    base = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, head_dim=32, qk_rope_head_dim=8,
                q_lora_rank=32, o_groups=2, o_lora_rank=16, moe_intermediate_size=32, index_n_heads=8,
                index_head_dim=16, hc_mult=4, torch_dtype="float32", max_position_embeddings=4096,
                hc_sinkhorn_iters=20)
    return {
        # every layer kind, hash then learned routing, window 8, HCA 8, top-k 2
        "mix": ModelConfig(**base, num_hidden_layers=4, layer_types=[SLIDING, CSA, HCA, CSA],
                           mlp_layer_types=[HASH_MOE, MOE, MOE, MOE], compress_rates={CSA: 4, HCA: 8},
                           sliding_window=8, index_topk=2, n_routed_experts=6, num_experts_per_tok=2),
        # CSA-heavy, ratio 2, bigger window than HCA ratio, top-k 3, softmax-free sigmoid routing, 3 hash layers
        "csa": ModelConfig(**base, num_hidden_layers=3, layer_types=[CSA, CSA, HCA],
                           mlp_layer_types=[HASH_MOE, HASH_MOE, MOE], compress_rates={CSA: 2, HCA: 4},
                           sliding_window=6, index_topk=3, n_routed_experts=4, num_experts_per_tok=3,
                           scoring_func="sigmoid", routed_scaling_factor=2.0),
        # sliding + HCA only, window 4, ratios 4/16, YaRN on the compressed branch
        "hca": ModelConfig(**base, num_hidden_layers=3, layer_types=[SLIDING, HCA, HCA],
                           mlp_layer_types=[MOE, MOE, MOE], compress_rates={CSA: 4, HCA: 16},
                           sliding_window=4, index_topk=2, n_routed_experts=8, num_experts_per_tok=2,
                           rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                         "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}),
    }


def save_hf_twin(cfg: ModelConfig, out: Path, seed: int = 0):
    """Build transformers' DeepseekV4ForCausalLM from cfg, randomise every parameter (so that sinks, biases,
    hash tables are not trivially zero), save_pretrained to `out` and return the HF model (eval, fp32)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    hc = DeepseekV4Config(**cfg.to_dict())
    m = DeepseekV4ForCausalLM(hc).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))
            if name.endswith("embed_tokens.weight"):
                p.mul_(math.sqrt(p.shape[-1]))
        for name, b in m.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand((b.shape[0], cfg.n_routed_experts), generator=g).argsort(-1)[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    m.save_pretrained(out)
    return m


class PagedRunner:
    """Runs sequences through the model with their own scattered (non-contiguous) physical blocks."""

    def __init__(self, model, cfg: ModelConfig, kv_dtype: str = "fp32", max_tokens: int = 256, n_seqs: int = 1,
                 seed: int = 0, block_size: int | None = None, swa_block_size: int | None = None,
                 hca_state: str = "raw"):
        self.model, self.cfg = model, cfg
        self.spec = cache_spec(cfg, kv_dtype, block_size=block_size, swa_block_size=swa_block_size,
                               hca_state=hca_state)
        g = torch.Generator().manual_seed(seed)
        self.tables: list[dict[str, list[int]]] = [{} for _ in range(n_seqs)]
        nblocks = {}
        for name, ps in self.spec.pools.items():
            if name == "idx":
                continue
            per_seq = math.ceil(max_tokens / ps.tokens_per_block)
            total = per_seq * n_seqs + 3
            perm = torch.randperm(total, generator=g).tolist()
            nblocks[name] = total
            for s in range(n_seqs):
                self.tables[s][name] = perm[s * per_seq:(s + 1) * per_seq]
        self.pools = KVPools.for_model(cfg, self.spec, nblocks)

    def step(self, chunks: list[tuple[int, list[int], int]], logits: str = "all",
             recompute_until: list[int] | None = None) -> torch.Tensor:
        """chunks: [(seq index, token ids, first position)] -> logits of every token (or last of each)."""
        tables = {name: [self.tables[s][name] for s, _, _ in chunks] for name in self.tables[0]}
        b = ForwardBatch.build([(t, p) for _, t, p in chunks], tables, recompute_until=recompute_until,
                               logits=logits)
        return self.model(b, self.pools)


@contextlib.contextmanager
def one_thread():
    """Tiny shapes run several times faster on one intra-op thread (no OpenMP spin on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def prefill_logits(model, cfg: ModelConfig, ids: list[int] | None = None) -> torch.Tensor:
    """Logits of every position of one prompt (default: 40 tokens, past every tiny config's compression boundary)
    prefilled through fresh paged pools."""
    return PagedRunner(model, cfg, max_tokens=64).step([(0, ids or list(range(5, 45)), 0)])
