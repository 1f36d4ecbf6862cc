"""Weight size of a DeepSeek-V4 checkpoint, from the published layout's inventory (`runtime/checkpoint/layout.py`).

Every tensor of the released files (the MTP block included in the file sizes) with its exact format:

    fp8-fp4 (as released): routed experts FP4 e2m1 packed two per byte + one UE8M0 scale byte per 32 values;
             other projections FP8 e4m3 + one UE8M0 scale byte per 128x128 block; embeddings, head, router,
             compressors, indexer weights_proj and norms bf16; sinks, compressor position biases, mHC, router
             biases fp32; hash tables int64.
    fp8:     the same with the routed experts FP8 + 128x128 block scales.
    bf16:    2 bytes for every logical element.

Parameters are logical elements (a packed FP4 byte holds 2, scales are not parameters): Flash 290.9e9 (284e9
without the MTP block), Pro 1.599e12; released bytes Flash 159.6 GB, Pro 864.7 GB (805 GiB).
What one GPU holds after loading — `dsv4 serve` does not load the MTP block (it is not run: no speculative
decoding), in the format the rank holds it (the file's, but RMSNorm weights fp32) — has one formula for every
layout: `dp` data-parallel attention ranks, each a tensor-parallel group of `tp` GPUs, the routed
experts split over all dp x tp GPUs (expert parallelism):

    weights/GPU = routed / (dp * tp) + tp_split / tp + whole

routed = the routed experts (`parallel/ownership.split_over_ep_ranks`), tp_split = the other tensors
`split_over_ranks` marks as split over TP ranks (query heads, output projections, shared expert, vocab rows of embed
and head), whole = the rest (K=V head, compressors, indexer, norms, mHC, router), replicated everywhere.
`weight_bytes_per_gpu_dp_tp` is that formula; `weight_bytes_per_gpu` (dp = 1: one TP group, `parallel/shard.py`)
and `weight_bytes_per_gpu_ep` (tp = 1: `dsv4 serve --dp N --ep`) are its two corners. `dsv4 model info` reports
the same numbers from a checkpoint's headers (`tests/test_model_info.py` checks they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.runtime.checkpoint.layout import FP4, FP8, MTP_PREFIX, LayoutTensor, held_nbytes, published_tensors
from dsv4.runtime.config import ModelConfig
from dsv4.runtime.parallel.ownership import split_over_ep_ranks, split_over_ranks

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
class _HeldParts:
    """Held bytes of a model: routed experts (split over every GPU of a replica), the other TP-split tensors
    (split over one TP group) and the replicated rest."""

    routed: int
    tp_split: int
    whole: int


def _held_parts(entries: list[tuple[str, int]]) -> _HeldParts:
    routed = tp_split = whole = 0
    for name, n in entries:
        if split_over_ep_ranks(name):
            routed += n
        elif split_over_ranks(name):
            tp_split += n
        else:
            whole += n
    return _HeldParts(routed, tp_split, whole)


@dataclass(frozen=True)
class _Summary:
    counts: ParamCounts
    file_bytes: dict[str, int]  # quantization -> bytes of the checkpoint files
    held: dict[str, _HeldParts]  # quantization -> held bytes by how a layout splits them


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
    served = [t for t in tensors if not t.name.startswith(MTP_PREFIX)]  # `dsv4 serve` does not load the MTP block
    held = {q: [(name, held_nbytes(name, dtype, n)) for t in served for name, dtype, n in _file_entries(t, q)]
            for q in QUANTIZATIONS}
    return _Summary(ParamCounts(**counts), file_bytes, {q: _held_parts(held[q]) for q in QUANTIZATIONS})


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


def weight_bytes_per_gpu_dp_tp(cfg: ModelConfig, dp: int, tp: int, quantization: str = "fp8-fp4") -> int:
    """Weight bytes one GPU holds when a replica is `dp` data-parallel attention ranks of `tp` tensor-parallel GPUs
    each, the routed experts split over all dp x tp GPUs: routed / (dp * tp) + tp_split / tp + whole (module
    docstring), in the format held (weights as stored, RMSNorm weights fp32: `layout.held_nbytes`), without the
    MTP block, which `dsv4 serve` does not load (no speculative decoding). The parts
    divide evenly when `ownership.check_tp(cfg, tp)` passes and dp x tp divides the routed experts."""
    _check(quantization)
    if dp < 1 or tp < 1:
        raise ValueError(f"dp and tp must be >= 1, got dp={dp}, tp={tp}")
    parts = _summary(cfg).held[quantization]
    return parts.routed // (dp * tp) + parts.tp_split // tp + parts.whole


def weight_bytes_per_gpu(cfg: ModelConfig, tp: int = 1, quantization: str = "fp8-fp4") -> int:
    """Weight bytes one of `tp` tensor-parallel ranks holds (one TP group: dp = 1). `tests/test_weights_held.py`
    checks it equals the parameters + buffers of a loaded rank, byte for byte."""
    return weight_bytes_per_gpu_dp_tp(cfg, 1, tp, quantization)


def weight_bytes_per_gpu_ep(cfg: ModelConfig, dp: int, quantization: str = "fp8-fp4") -> int:
    """Weight bytes one of `dp` expert-parallel ranks holds (E/dp routed experts + every other tensor whole: tp = 1)."""
    return weight_bytes_per_gpu_dp_tp(cfg, dp, 1, quantization)


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


def decode_weight_bytes_dp_tp(cfg: ModelConfig, quantization: str, dp: int, tp: int, rank_batch: int) -> int:
    """Weight bytes one GPU reads in a decode step where each of `dp` data-parallel ranks (TP groups of `tp` GPUs)
    decodes `rank_batch` sequences:

        (dense + routed / dp * (1 - (1 - k/E)^(dp * rank_batch))) / tp

    dense = the weights every step reads whole (attention, shared expert, router, lm_head), routed = all routed
    experts; the MoE layer sees the dp x rank_batch gathered tokens, each GPU's E/(dp*tp) experts are touched at
    the expected fraction 1 - (1 - k/E)^tokens (k experts per token). The dense part is charged / tp as in TP:
    the replicated tensors (K=V head, compressors, indexer) are small next to the split projections."""
    dense, routed = _dense_and_routed_bytes(cfg, quantization)
    return int((dense + routed / dp * experts_touched(cfg, dp * rank_batch)) / tp)


def decode_weight_bytes(cfg: ModelConfig, quantization: str, batch: int) -> int:
    """Weight bytes one decode step of `batch` sequences reads on one GPU: all dense weights plus the expected
    fraction of routed experts touched, 1 - (1 - k/E)^batch (k experts per token, E experts)."""
    return decode_weight_bytes_dp_tp(cfg, quantization, 1, 1, batch)


def decode_weight_bytes_ep(cfg: ModelConfig, quantization: str, dp: int, rank_batch: int) -> int:
    """Weight bytes one of `dp` expert-parallel ranks (tp = 1) reads in a decode step where every rank decodes
    `rank_batch` sequences: its whole dense weights plus its E/dp experts touched by all dp x rank_batch tokens."""
    return decode_weight_bytes_dp_tp(cfg, quantization, dp, 1, rank_batch)
