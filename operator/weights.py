"""Weight size of a DeepSeek-V4 checkpoint, from the published layout's inventory (`runtime/checkpoint/layout.py`).

Every tensor of the released files (MTP block included: it is loaded) with its exact format:

    fp8-fp4 (as released): routed experts FP4 e2m1 packed two per byte + one UE8M0 scale byte per 32 values;
             other projections FP8 e4m3 + one UE8M0 scale byte per 128x128 block; embeddings, head, router,
             compressors, indexer weights_proj and norms bf16; sinks, compressor position biases, mHC, router
             biases fp32; hash tables int64.
    fp8:     the same with the routed experts FP8 + 128x128 block scales.
    bf16:    2 bytes for every logical element.

Parameters are logical elements (a packed FP4 byte holds 2, scales are not parameters): Flash 290.9e9 (284e9
without the MTP block), Pro 1.599e12; released bytes Flash 159.6 GB, Pro 864.7 GB (805 GiB).
`weight_bytes_per_gpu` divides the tensors `parallel/ownership.py` marks as split over the TP ranks and counts the
replicated ones whole, in the format the rank holds them (the file's, but RMSNorm weights fp32): what one rank of
`parallel/shard.py` holds after loading. `weight_bytes_per_gpu_ep` is the same for one of `dp` expert-parallel ranks
(`dsv4 serve --dp N --ep`): only the routed experts are split (`split_and_whole(..., mode="ep")`), the shared expert,
attention, embedding and head are whole on every rank. `dsv4 model info` reports the same numbers from
a checkpoint's headers (`tests/test_model_info.py` checks they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.runtime.checkpoint.layout import FP4, FP8, LayoutTensor, held_nbytes, published_tensors
from dsv4.runtime.config import ModelConfig
from dsv4.runtime.parallel.ownership import rank_bytes, split_and_whole

QUANTIZATIONS = ("fp8-fp4", "fp8", "bf16")
_FP8 = 1.0 + 1.0 / (128 * 128)
_FP4 = 0.5 + 1.0 / 32
_BF16 = 2.0


@dataclass(frozen=True)
class ParamCounts:
    attention: int   # attention, compressors, indexers, norms, mHC, router biases, hash tables (dense)
    routed: int      # routed experts (EP-sharded)
    shared: int      # shared experts
    router: int      # expert-routing gates (kept bf16)
    embeddings: int  # input embedding + lm_head

    @property
    def total(self) -> int:
        return self.attention + self.routed + self.shared + self.router + self.embeddings


def _component(name: str) -> str:
    if ".ffn.experts." in name:
        return "routed"
    if ".ffn.shared_experts." in name:
        return "shared"
    if name.endswith(".ffn.gate.weight"):
        return "router"
    if name in ("embed.weight", "head.weight"):
        return "embeddings"
    return "attention"


@dataclass(frozen=True)
class _Summary:
    counts: ParamCounts
    file_bytes: dict[str, int]  # quantization -> bytes of the checkpoint files
    split_whole: dict[str, tuple[int, int]]  # quantization -> (held bytes split over TP ranks, held replicated)
    split_whole_ep: dict[str, tuple[int, int]]  # the same over expert-parallel ranks (routed experts split)


_SUMMARIES: dict[str, _Summary] = {}  # repr(config) -> summary: the inventory of a large model takes seconds


def _summary(cfg: ModelConfig) -> _Summary:
    key = repr(cfg)
    if key not in _SUMMARIES:
        _SUMMARIES[key] = _summarise(cfg)
    return _SUMMARIES[key]


def _summarise(cfg: ModelConfig) -> _Summary:
    tensors = published_tensors(cfg)
    counts = dict.fromkeys(("attention", "routed", "shared", "router", "embeddings"), 0)
    for t in tensors:
        counts[_component(t.name)] += t.parameters
    file_bytes = {q: sum(n for t in tensors for _, _, n in _file_entries(t, q)) for q in QUANTIZATIONS}
    held = {q: [(name, held_nbytes(name, dtype, n)) for t in tensors for name, dtype, n in _file_entries(t, q)]
            for q in QUANTIZATIONS}
    return _Summary(ParamCounts(**counts), file_bytes, {q: split_and_whole(held[q]) for q in QUANTIZATIONS},
                    {q: split_and_whole(held[q], mode="ep") for q in QUANTIZATIONS})


def param_counts(cfg: ModelConfig) -> ParamCounts:
    return _summary(cfg).counts


def bytes_per_param(quantization: str) -> dict[str, float]:
    """Bytes per parameter of each component under `quantization`."""
    if quantization == "fp8-fp4":
        return {"attention": _FP8, "routed": _FP4, "shared": _FP8, "router": _BF16, "embeddings": _BF16}
    if quantization == "fp8":
        return {"attention": _FP8, "routed": _FP8, "shared": _FP8, "router": _BF16, "embeddings": _BF16}
    if quantization == "bf16":
        return dict.fromkeys(("attention", "routed", "shared", "router", "embeddings"), _BF16)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def _file_entries(t: LayoutTensor, quantization: str) -> list[tuple[str, str, int]]:
    """(name, safetensors dtype, bytes) of each file tensor `t` is stored as under `quantization`."""
    if quantization == "fp8-fp4":
        return [(e.name, e.dtype, e.nbytes) for e in t.file_entries()]
    if quantization == "fp8":
        as_fp8 = LayoutTensor(t.name, t.shape, FP8) if t.fmt == FP4 else t
        return [(e.name, e.dtype, e.nbytes) for e in as_fp8.file_entries()]
    return [(t.name, "BF16", 2 * t.parameters)]


def weight_bytes_per_gpu(cfg: ModelConfig, tp: int = 1, quantization: str = "fp8-fp4") -> int:
    """Weight bytes one of `tp` tensor-parallel ranks holds once loaded with the weights kept as stored (split
    tensors / tp + replicated ones whole; RMSNorm weights, bf16 in the files, held fp32: `layout.held_nbytes`).
    `tests/test_weights_held.py` checks it equals the parameters + buffers of a loaded rank, byte for byte."""
    _check(quantization)
    return rank_bytes(*_summary(cfg).split_whole[quantization], tp)


def weight_bytes_per_gpu_ep(cfg: ModelConfig, dp: int, quantization: str = "fp8-fp4") -> int:
    """Weight bytes one of `dp` expert-parallel ranks holds (E/dp routed experts + every other tensor whole), in
    the format held as for `weight_bytes_per_gpu`."""
    _check(quantization)
    return rank_bytes(*_summary(cfg).split_whole_ep[quantization], dp)


def _check(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def weight_bytes(cfg: ModelConfig, quantization: str = "fp8-fp4") -> int:
    """Bytes of all weights as stored (the checkpoint size at `quantization`)."""
    _check(quantization)
    return _summary(cfg).file_bytes[quantization]


def active_bytes_per_token(cfg: ModelConfig, quantization: str = "fp8-fp4") -> int:
    """Weight bytes one decode token touches: dense parts plus num_experts_per_tok routed experts."""
    dense, routed = _dense_and_routed_bytes(cfg, quantization)
    return int(dense + routed * cfg.num_experts_per_tok / cfg.n_routed_experts)


def active_params_per_token(cfg: ModelConfig) -> int:
    """Parameters multiplied per token (FLOPs per token = 2 x this)."""
    c = param_counts(cfg)
    return int(c.attention + c.shared + c.router + c.routed * cfg.num_experts_per_tok / cfg.n_routed_experts
               + cfg.vocab_size * cfg.hidden_size)


def _dense_and_routed_bytes(cfg: ModelConfig, quantization: str) -> tuple[float, float]:
    """(bytes every decode step reads whole: dense parts + lm_head, bytes of all routed experts)."""
    counts, bpp = param_counts(cfg), bytes_per_param(quantization)
    dense = counts.attention * bpp["attention"] + counts.shared * bpp["shared"] + counts.router * bpp["router"]
    return dense + cfg.vocab_size * cfg.hidden_size * bpp["embeddings"], counts.routed * bpp["routed"]


def experts_touched(cfg: ModelConfig, tokens: int) -> float:
    """Expected fraction of routed experts `tokens` tokens touch: 1 - (1 - k/E)^tokens (k experts per token)."""
    return 1.0 - (1.0 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** max(1, tokens)


def decode_weight_bytes(cfg: ModelConfig, quantization: str, batch: int) -> int:
    """Weight bytes one decode step of `batch` sequences reads: all dense weights plus the expected
    fraction of routed experts touched, 1 - (1 - k/E)^batch (k experts per token, E experts)."""
    dense, routed = _dense_and_routed_bytes(cfg, quantization)
    return int(dense + routed * experts_touched(cfg, batch))


def decode_weight_bytes_ep(cfg: ModelConfig, quantization: str, dp: int, rank_batch: int) -> int:
    """Weight bytes one of `dp` expert-parallel ranks reads in a decode step where every rank decodes `rank_batch`
    sequences: its whole dense weights, plus its E/dp experts touched by the tokens of all ranks (the MoE layer
    sees the dp x rank_batch gathered tokens)."""
    dense, routed = _dense_and_routed_bytes(cfg, quantization)
    return int(dense + routed / dp * experts_touched(cfg, dp * rank_batch))
