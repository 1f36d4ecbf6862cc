"""DeepSeek-V4's published checkpoint layout, written down once: every tensor with its file format and shape rule.

The released DeepSeek-V4-Flash / -Pro folders (and our `published.py` test fixture, generated from this table) hold:

| tensor (per main layer `layers.N.`, MTP block `mtp.J.`) | format | logical shape |
|---|---|---|
| `embed.weight`, `head.weight` | bf16 | [vocab, H] |
| `norm.weight` | bf16 | [H] |
| `hc_head_fn` / `hc_head_base` / `hc_head_scale` | f32 | [hc, hc·H] / [hc] / [1] |
| `attn.wq_a` / `attn.wq_b` / `attn.wkv` | fp8 | [q_lora, H] / [nH·D, q_lora] / [D, H] |
| `attn.q_norm.weight` / `attn.kv_norm.weight` | bf16 | [q_lora] / [D] |
| `attn.wo_a` / `attn.wo_b` | fp8 | [g·r_o, nH·D/g] / [H, g·r_o] |
| `attn.attn_sink` | f32 | [nH] |
| `attn.compressor.ape` (CSA, HCA) | f32 | [ratio, coff·D] (coff 2 for CSA, 1 for HCA) |
| `attn.compressor.{wkv,wgate}.weight` / `.norm.weight` | bf16 | [coff·D, H] / [D] |
| `attn.indexer.wq_b` (CSA) | fp8 | [nI·dI, q_lora] |
| `attn.indexer.weights_proj.weight` | bf16 | [nI, H] |
| `attn.indexer.compressor.*` | as the compressor | with dI, coff 2 |
| `attn_norm.weight`, `ffn_norm.weight` | bf16 | [H] |
| `ffn.gate.weight` | bf16 | [E, H] |
| `ffn.gate.tid2eid` (hash layers) / `ffn.gate.bias` (others, MTP) | i64 / f32 | [vocab, k] / [E] |
| `ffn.experts.e.{w1,w3}` / `w2` | fp4 | [I, H] / [H, I] |
| `ffn.shared_experts.{w1,w3}` / `w2` | fp8 | [I, H] / [H, I] |
| `hc_{attn,ffn}_fn` / `_base` / `_scale` | f32 | [(2+hc)·hc, hc·H] / [(2+hc)·hc] / [3] |
| MTP only: `e_proj`, `h_proj` | fp8 | [H, H] |
| MTP only: `enorm`, `hnorm`, `norm` (`.weight`) | bf16 | [H] |
| MTP only: `hc_head_fn` / `_base` / `_scale` | f32 | as the top-level ones |

File encodings of the formats (`file_entries`):

* fp8: `X.weight` `F8_E4M3` [out, in] + `X.scale` `F8_E8M0` [ceil(out/128), ceil(in/128)] (one per 128x128 block);
* fp4: `X.weight` `I8` [out, in/2], two e2m1 codes per byte, low nibble = even column, + `X.scale` `F8_E8M0`
  [out, in/32]; re-exports may store the weight as safetensors `F4` with the logical shape [out, in];
* bf16 / f32 / i64: one tensor `BF16` / `F32` / `I64`.

The MTP block is a sliding-window, learned-routing block (`compress_ratios` ends with 0 for it) that shares the
embedding and head of the main model. Sources: DeepSeek's `inference/model.py` of the V4 release (module tree and
dtypes: `Linear` default FP8, `wo_a`/experts/norms/compressor comments), transformers' `deepseek_v4` conversion
mapping (the names), TensorRT-LLM's DeepSeek-V4 checkpoint-layout test (safetensors dtypes and shapes of the
released Flash files). Counting this table reproduces the released tensor counts (Flash 69,187, Pro 145,116;
`tests/test_checkpoint_layout.py`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dsv4.runtime.config import CSA, HASH_MOE, SLIDING, ModelConfig

MTP_PREFIX = "mtp."  # names of the MTP block's tensors (published and canonical alike); `dsv4 serve` leaves them unread

BF16, F32, I64, FP8, FP4 = "bf16", "f32", "i64", "fp8", "fp4"
FP8_BLOCK = 128
FP4_BLOCK = 32
_HELD = {BF16: "param", FP8: "param", FP4: "param", F32: "float32", I64: "int64"}
_PLAIN_DTYPE = {BF16: "BF16", F32: "F32", I64: "I64"}


def is_norm_weight(name: str) -> bool:
    """An RMSNorm weight: stored bf16, held fp32 by the model (`model/layers.py` RMSNorm), in either layout."""
    return name.endswith("norm.weight")


def held_nbytes(name: str, dtype: str, nbytes: int) -> int:
    """Bytes the loaded model holds for the file tensor `name` of safetensors `dtype` and `nbytes` bytes, when the
    weights are kept as stored (`weights_dtype="checkpoint"`): the file's bytes, except bf16 norms held fp32."""
    return 2 * nbytes if dtype == "BF16" and is_norm_weight(name) else nbytes


@dataclass(frozen=True)
class FileEntry:
    """One tensor as it sits in a published safetensors file."""

    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        width = {"BF16": 2, "F32": 4, "I64": 8, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1}[self.dtype]
        return math.prod(self.shape) * width


@dataclass(frozen=True)
class LayoutTensor:
    """One logical tensor of the published layout: its name, file format and dequantised shape."""

    name: str
    shape: tuple[int, ...]
    fmt: str
    @property
    def norm(self) -> bool:
        return is_norm_weight(self.name)

    @property
    def held(self) -> str:
        """The dtype the model holds it in: "param" (the weight dtype), "float32" or "int64"."""
        return "float32" if self.norm else _HELD[self.fmt]

    @property
    def scale_name(self) -> str:
        return self.name[: -len(".weight")] + ".scale"

    def scale_shape(self) -> tuple[int, int]:
        out_f, in_f = self.shape
        if self.fmt == FP8:
            return (math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK))
        return (out_f, math.ceil(in_f / FP4_BLOCK))

    def file_entries(self) -> list[FileEntry]:
        if self.fmt == FP8:
            return [FileEntry(self.name, "F8_E4M3", self.shape),
                    FileEntry(self.scale_name, "F8_E8M0", self.scale_shape())]
        if self.fmt == FP4:
            out_f, in_f = self.shape
            return [FileEntry(self.name, "I8", (out_f, in_f // 2)),
                    FileEntry(self.scale_name, "F8_E8M0", self.scale_shape())]
        return [FileEntry(self.name, _PLAIN_DTYPE[self.fmt], self.shape)]

    @property
    def parameters(self) -> int:
        return math.prod(self.shape)


def _compressor(p: str, cfg: ModelConfig, ratio: int, dim: int, coff: int) -> list[LayoutTensor]:
    H = cfg.hidden_size
    return [
        LayoutTensor(p + "ape", (ratio, coff * dim), F32),
        LayoutTensor(p + "wkv.weight", (coff * dim, H), BF16),
        LayoutTensor(p + "wgate.weight", (coff * dim, H), BF16),
        LayoutTensor(p + "norm.weight", (dim,), BF16),
    ]


def _block(cfg: ModelConfig, p: str, layer_type: str, hash_moe: bool) -> list[LayoutTensor]:
    H, D, nH, q = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.q_lora_rank
    g, ro, hc = cfg.o_groups, cfg.o_lora_rank, cfg.hc_mult
    E, inter, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    a = p + "attn."
    out = [
        LayoutTensor(a + "wq_a.weight", (q, H), FP8),
        LayoutTensor(a + "q_norm.weight", (q,), BF16),
        LayoutTensor(a + "wq_b.weight", (nH * D, q), FP8),
        LayoutTensor(a + "wkv.weight", (D, H), FP8),
        LayoutTensor(a + "kv_norm.weight", (D,), BF16),
        LayoutTensor(a + "wo_a.weight", (g * ro, nH * D // g), FP8),
        LayoutTensor(a + "wo_b.weight", (H, g * ro), FP8),
        LayoutTensor(a + "attn_sink", (nH,), F32),
    ]
    if layer_type != SLIDING:
        out += _compressor(a + "compressor.", cfg, cfg.compress_rates[layer_type], D, 2 if layer_type == CSA else 1)
    if layer_type == CSA:
        ni, di = cfg.index_n_heads, cfg.index_head_dim
        out += [
            LayoutTensor(a + "indexer.wq_b.weight", (ni * di, q), FP8),
            LayoutTensor(a + "indexer.weights_proj.weight", (ni, H), BF16),
        ]
        out += _compressor(a + "indexer.compressor.", cfg, cfg.csa_ratio, di, 2)
    out += [
        LayoutTensor(p + "attn_norm.weight", (H,), BF16),
        LayoutTensor(p + "ffn_norm.weight", (H,), BF16),
    ]
    f = p + "ffn."
    out.append(LayoutTensor(f + "gate.weight", (E, H), BF16))
    out.append(LayoutTensor(f + "gate.tid2eid", (cfg.vocab_size, k), I64) if hash_moe
               else LayoutTensor(f + "gate.bias", (E,), F32))
    for e in range(E):
        out += [
            LayoutTensor(f"{f}experts.{e}.w1.weight", (inter, H), FP4),
            LayoutTensor(f"{f}experts.{e}.w2.weight", (H, inter), FP4),
            LayoutTensor(f"{f}experts.{e}.w3.weight", (inter, H), FP4),
        ]
    out += [  # one shared expert of the routed experts' width (the reference asserts n_shared_experts == 1)
        LayoutTensor(f + "shared_experts.w1.weight", (inter, H), FP8),
        LayoutTensor(f + "shared_experts.w2.weight", (H, inter), FP8),
        LayoutTensor(f + "shared_experts.w3.weight", (inter, H), FP8),
    ]
    mix = (2 + hc) * hc
    for sub in ("attn", "ffn"):
        out += [
            LayoutTensor(f"{p}hc_{sub}_fn", (mix, hc * H), F32),
            LayoutTensor(f"{p}hc_{sub}_base", (mix,), F32),
            LayoutTensor(f"{p}hc_{sub}_scale", (3,), F32),
        ]
    return out


def _hc_head(p: str, cfg: ModelConfig) -> list[LayoutTensor]:
    hc, H = cfg.hc_mult, cfg.hidden_size
    return [
        LayoutTensor(p + "hc_head_fn", (hc, hc * H), F32),
        LayoutTensor(p + "hc_head_base", (hc,), F32),
        LayoutTensor(p + "hc_head_scale", (1,), F32),
    ]


def published_tensors(cfg: ModelConfig, include_mtp: bool = True) -> list[LayoutTensor]:
    """Every logical tensor of the published layout for `cfg`, in a stable order."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out = [LayoutTensor("embed.weight", (V, H), BF16)]
    for i in range(cfg.num_hidden_layers):
        out += _block(cfg, f"layers.{i}.", cfg.layer_types[i], cfg.mlp_layer_types[i] == HASH_MOE)
    out += [LayoutTensor("norm.weight", (H,), BF16), *_hc_head("", cfg),
            LayoutTensor("head.weight", (V, H), BF16)]
    if include_mtp:
        for j in range(cfg.num_nextn_predict_layers):
            p = f"{MTP_PREFIX}{j}."
            out += _block(cfg, p, SLIDING, hash_moe=False)
            out += [
                LayoutTensor(p + "e_proj.weight", (H, H), FP8),
                LayoutTensor(p + "h_proj.weight", (H, H), FP8),
                LayoutTensor(p + "enorm.weight", (H,), BF16),
                LayoutTensor(p + "hnorm.weight", (H,), BF16),
                LayoutTensor(p + "norm.weight", (H,), BF16),
                *_hc_head(p, cfg),
            ]
    return out


def published_file_entries(cfg: ModelConfig, include_mtp: bool = True) -> list[FileEntry]:
    """Every tensor of the published safetensors files (weights and their `.scale` companions)."""
    return [e for t in published_tensors(cfg, include_mtp) for e in t.file_entries()]


# ---- names: published -> the Hugging Face (transformers `save_pretrained`) layout ------------------------------
_TOP_TO_HF = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_KV_NORM = re.compile(r"\.attn\.kv_norm\.")


def hf_name(published: str) -> str:
    """The Hugging Face layout name of a published tensor name (our canonical name)."""
    if published in _TOP_TO_HF:
        return _TOP_TO_HF[published]
    name = _KV_NORM.sub(".attn.norm.", published)
    return "model." + name if name.startswith("layers.") else name


# ---- known extras of published variants: skipped with one warning per kind ----------------------------------
@dataclass(frozen=True)
class KnownExtra:
    """Tensors or config keys a later release adds that this runtime does not use."""

    kind: str          # what the warning calls them
    config_key: str    # config.json key prefix that marks the variant
    tensor_pattern: re.Pattern[str] | None  # tensor names of the variant we skip (None: config keys only)


KNOWN_EXTRAS = (
    # V4-Flash-0731: the DSpark speculative drafter (config `dspark_*`, extra MTP stages / tensors).
    KnownExtra("DSpark drafter (V4-Flash-0731)", "dspark_", re.compile(r"^(mtp\.\d+\.|dspark)")),
)
