"""DeepSeek-V4 model configuration: `config.json` in both the transformers and DeepSeek layouts.

One dataclass, `ModelConfig`, read by the model, the cache (bytes per entry per pool), the planner
and the capacity benchmark. Field names follow transformers' `DeepseekV4Config`; DeepSeek's own
keys (`compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `compress_rate_csa/hca`) are folded
in by `from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)


class ConfigError(ValueError):
    """A config.json that cannot describe a DeepSeek-V4 model; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=lambda: {CSA: 4, HCA: 128})
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN parameters of the compressed branches
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            raise ConfigError("layer_types (or compress_ratios) must be given explicitly")
        if not self.mlp_layer_types:
            self.mlp_layer_types = [HASH_MOE] * min(3, self.num_hidden_layers) + [MOE] * max(
                0, self.num_hidden_layers - 3
            )
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def compress_ratio(self, layer: int) -> int:
        """0 for sliding-only layers, else the layer type's compression ratio."""
        kind = self.layer_types[layer]
        return 0 if kind == SLIDING else int(self.compress_rates[kind])

    @property
    def csa_ratio(self) -> int:
        return int(self.compress_rates[CSA])

    @property
    def hca_ratio(self) -> int:
        return int(self.compress_rates[HCA])

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == kind]

    @property
    def compress_ratios(self) -> list[int]:
        """DeepSeek's per-layer list (0 = sliding only), without the MTP layer."""
        return [self.compress_ratio(i) for i in range(self.num_hidden_layers)]

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        n = self.num_hidden_layers
        need(n >= 1, f"num_hidden_layers must be >= 1, got {n}")
        need(len(self.layer_types) == n, f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {n}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        need(not bad, f"layer_types entries must be one of {LAYER_TYPES}, got {bad}")
        need(len(self.mlp_layer_types) == n, f"mlp_layer_types has {len(self.mlp_layer_types)} entries, expected {n}")
        bad = sorted({t for t in self.mlp_layer_types if t not in MLP_LAYER_TYPES})
        need(not bad, f"mlp_layer_types entries must be one of {MLP_LAYER_TYPES}, got {bad}")
        need(self.num_key_value_heads == 1,
             f"num_key_value_heads must be 1 (shared K=V), got {self.num_key_value_heads}")
        need(0 < self.qk_rope_head_dim <= self.head_dim and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even and in (0, head_dim={self.head_dim}], got {self.qk_rope_head_dim}")
        need(self.num_attention_heads % self.o_groups == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by o_groups ({self.o_groups})")
        need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok must be in [1, n_routed_experts={self.n_routed_experts}], "
             f"got {self.num_experts_per_tok}")
        need(self.scoring_func in ("sqrtsoftplus", "softmax", "sigmoid"),
             f"scoring_func must be sqrtsoftplus, softmax or sigmoid, got {self.scoring_func!r}")
        need(self.sliding_window >= 1, f"sliding_window must be >= 1, got {self.sliding_window}")
        for kind in (CSA, HCA):
            r = int(self.compress_rates.get(kind, 0))
            need(r >= 1, f"compress_rates[{kind!r}] must be >= 1, got {r}")
        need(self.index_topk >= 1, f"index_topk must be >= 1, got {self.index_topk}")
        need(self.hc_mult >= 1, f"hc_mult must be >= 1, got {self.hc_mult}")
        need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")

    # ---- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        d = dict(raw)
        model_type = d.get("model_type", "deepseek_v4")
        if model_type not in ("deepseek_v4",):
            raise ConfigError(f"unknown model_type {model_type!r}: dsv4 serves model_type 'deepseek_v4' only")
        n = int(d.get("num_hidden_layers", 43))
        rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
        if "compress_rate_csa" in d:
            rates[CSA] = int(d["compress_rate_csa"])
        if "compress_rate_hca" in d:
            rates[HCA] = int(d["compress_rate_hca"])
        d["compress_rates"] = rates
        if not d.get("layer_types") and d.get("compress_ratios") is not None:
            by_ratio = {0: SLIDING, 1: SLIDING, rates[CSA]: CSA, rates[HCA]: HCA}
            try:
                d["layer_types"] = [by_ratio[int(r)] for r in d["compress_ratios"][:n]]
            except KeyError as e:
                raise ConfigError(
                    f"compress_ratios contains {e.args[0]}, expected 0, {rates[CSA]} or {rates[HCA]}") from e
        if not d.get("mlp_layer_types") and "num_hash_layers" in d:
            k = int(d["num_hash_layers"])
            d["mlp_layer_types"] = [HASH_MOE] * min(n, k) + [MOE] * max(0, n - k)
        if "qk_rope_head_dim" not in d and d.get("partial_rotary_factor"):
            d["qk_rope_head_dim"] = int(round(int(d.get("head_dim", 512)) * float(d["partial_rotary_factor"])))
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
            comp = dict(rp["compress"])
            d.setdefault("compress_rope_theta", comp.get("rope_theta", 160000.0))
            if isinstance(rp.get("main"), dict):
                d.setdefault("rope_theta", rp["main"].get("rope_theta", 10000.0))
            if comp.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor")}
                d.setdefault("rope_scaling", scaling)
        if d.get("dtype") and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:  # a wrong type in a field
            raise ConfigError(str(e)) from e

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise ConfigError(f"{p}: no config.json")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers' DeepseekV4Config and our loader both read."""
        d = dataclasses.asdict(self)
        d["model_type"] = "deepseek_v4"
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["compress_ratios"] = self.compress_ratios + [0] * self.num_nextn_predict_layers
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                    "partial_rotary_factor": d["partial_rotary_factor"]}
        if self.rope_scaling:
            compress.update(self.rope_scaling)
        d["rope_parameters"] = {
            "main": {"rope_type": "default", "rope_theta": self.rope_theta,
                     "partial_rotary_factor": d["partial_rotary_factor"]},
            "compress": compress,
        }
        d.pop("rope_scaling")
        return {k: v for k, v in d.items() if v is not None}


_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
         "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}


def flash() -> ModelConfig:
    """DeepSeek-V4-Flash shapes (284B total / 13B active); for planning without weights."""
    return ModelConfig(
        num_hidden_layers=43, hidden_size=4096, num_attention_heads=64, q_lora_rank=1024,
        o_groups=8, o_lora_rank=1024, n_routed_experts=256, moe_intermediate_size=2048,
        routed_scaling_factor=1.5, index_topk=512,
        layer_types=[SLIDING, SLIDING] + [CSA, HCA] * 20 + [CSA],
        rope_scaling=dict(_YARN),
    )


def pro() -> ModelConfig:
    """DeepSeek-V4-Pro shapes (1.6T total / 49B active); for planning without weights."""
    return ModelConfig(
        num_hidden_layers=61, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536,
        o_groups=16, o_lora_rank=1024, n_routed_experts=384, moe_intermediate_size=3072,
        routed_scaling_factor=2.5, index_topk=1024,
        layer_types=[HCA, HCA] + [CSA, HCA] * 29 + [CSA],
        rope_scaling=dict(_YARN),
    )


def tiny() -> ModelConfig:
    """The built-in tiny model: every layer kind, a few million parameters, runs on 2 CPU cores.

    Ratios and window are shrunk (CSA 4, HCA 16, window 16) so that short prompts cross every
    compression boundary; top-k (4) is smaller than the visible CSA entries beyond 16 tokens.
    """
    return ModelConfig(
        vocab_size=1024, hidden_size=128, num_hidden_layers=6, num_attention_heads=8, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=64, routed_scaling_factor=1.5,
        layer_types=[SLIDING, CSA, HCA, CSA, HCA, CSA],
        mlp_layer_types=[HASH_MOE, HASH_MOE, MOE, MOE, MOE, MOE],
        compress_rates={CSA: 4, HCA: 16}, sliding_window=16, index_n_heads=4, index_head_dim=32,
        index_topk=4, hc_mult=4, max_position_embeddings=131072, torch_dtype="float32",
    )


PRESETS = {"flash": flash, "pro": pro, "tiny": tiny}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
