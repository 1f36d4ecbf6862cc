"""The only kernel entry points the model calls. Triton on CUDA tensors (or under the Triton
interpreter), the torch reference otherwise.

Dispatch rule (`choose_backend`, evaluated at every call; the environment is read once at start-up into
`settings.current()`, and `settings.refresh()` re-reads it):

1. `backend=` argument, else env `DSV4_KERNEL_BACKEND`, else "auto".
2. "torch": the references in `reference.py`, except that indexer scores and sparse attention go through
   `prefix_gemm.py` (the same math with one GEMM per run of a sequence's prefill rows) and top-k through
   `topk_torch.py` (the same selection in fewer passes).
3. "triton": the Triton kernel; compiled for CUDA tensors, interpreted for CPU tensors (slow: tests only).
4. "auto": triton not importable -> torch; Triton interpreter on (env `TRITON_INTERPRET` truthy or
   `triton.knobs.runtime.interpret`, the knob read now) -> interpreted Triton; CUDA tensors -> compiled Triton;
   otherwise (CPU tensors) -> torch.

Kernel modules are built lazily on first use, per mode (`triton_loader.load`), so a test can run
the interpreter for its own calls (`backend="triton"`) while every other CPU caller in the same
process keeps the fast torch reference.
"""

from __future__ import annotations

from typing import Literal

import torch
from dsv4.kernels import reference, settings, triton_loader
from dsv4.kernels.settings import BACKEND_CHOICES, BACKEND_ENV

Backend = Literal["torch", "triton", "interpret"]


def choose_backend(*tensors: torch.Tensor | None, backend: str | None = None) -> Backend:
    """"torch" | "triton" (compiled, CUDA) | "interpret" (Triton interpreter) for these tensors."""
    want = backend.strip().lower() if backend else settings.current().backend
    if want not in BACKEND_CHOICES:
        raise ValueError(f"kernel backend must be one of {BACKEND_CHOICES} (argument or ${BACKEND_ENV}), got {want!r}")
    if want == "torch":
        return "torch"
    cuda = any(t is not None and t.is_cuda for t in tensors)
    if want == "auto" and not cuda and not triton_loader.interpreter_on():
        return "torch"  # the CPU path never imports triton
    if not triton_loader.triton_available():
        if want == "triton":
            raise RuntimeError("kernel backend 'triton' requested but triton is not importable")
        return "torch"
    if triton_loader.interpreter_on():
        return "interpret"
    if cuda:
        return "triton"
    return "interpret" if want == "triton" else "torch"


def _check_attention(q, swa_kv, swa_idx, comp_kv, comp_idx, sink) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    T, H, _ = q.shape
    if swa_kv.dim() != 2 or swa_idx.dim() != 2 or swa_idx.shape[0] != T:
        raise ValueError(f"swa_kv must be [Ns, D] and swa_idx [T={T}, W]; got {tuple(swa_kv.shape)}, "
                         f"{tuple(swa_idx.shape)}")
    if (comp_kv is None) != (comp_idx is None):
        raise ValueError("comp_kv and comp_idx must both be given or both be None")
    if comp_idx is not None and (comp_kv.dim() != 2 or comp_idx.dim() != 2 or comp_idx.shape[0] != T):
        raise ValueError(f"comp_kv must be [Nc, D] and comp_idx [T={T}, K]; got {tuple(comp_kv.shape)}, "
                         f"{tuple(comp_idx.shape)}")
    if sink.shape != (H,):
        raise ValueError(f"sink must be [H={H}], got shape {tuple(sink.shape)}")


def sparse_attention(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, scale: float, *, rope_dim: int | None = None,
                     num_splits: int | None = None, backend: str | None = None) -> torch.Tensor:
    """See `reference.sparse_attention_ref` for shapes and semantics. Returns fp32 [T, H, D].

    Extensions: KV pools may be uint8 rows of the FP8 layout (`fp8_kv.py`; then `rope_dim` is
    required, head_dim = q.shape[-1]); `num_splits` forces the split-K count of the Triton kernel.
    """
    _check_attention(q, swa_kv, swa_idx, comp_kv, comp_idx, sink)
    which = choose_backend(q, swa_kv, backend=backend)
    if which == "torch":
        from dsv4.kernels.prefix_gemm import sparse_attention_shared

        return sparse_attention_shared(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, scale, rope_dim=rope_dim)
    from dsv4.kernels import triton_ops

    return triton_ops.sparse_attention_triton(q, swa_kv, swa_idx, comp_kv, comp_idx, sink, scale, rope_dim=rope_dim,
                                              interpret=which == "interpret", num_splits=num_splits)


def indexer_scores(q, weights, keys, cand_idx, *, index_format: str | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """See `reference.indexer_scores_ref`: [T, C] fp32, -inf where the candidate is -1.

    `index_format` None: float keys [N, Di]; "fp8" / "fp4": uint8 rows of the cache's quantised index
    layout (`index_quant.py`, [N, Di + 4] / [N, Di/2 + Di/32]), decoded on load."""
    if q.dim() != 3 or weights.shape != q.shape[:2] or keys.dim() != 2:
        raise ValueError(f"q must be [T, Hi, Di], weights [T, Hi], keys [N, row]; got {tuple(q.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(keys.shape)}")
    di = q.shape[2]
    if index_format is None:
        if keys.shape[1] != di or not keys.is_floating_point():
            raise ValueError(f"keys must be float [N, Di={di}] (or pass index_format), got {keys.dtype} "
                             f"{tuple(keys.shape)}")
    else:
        from dsv4.kernels.index_quant import index_row_bytes

        rb = index_row_bytes(di, index_format)
        if keys.dtype != torch.uint8 or keys.shape[1] != rb:
            raise ValueError(f"keys for index_format {index_format!r} must be uint8 [N, {rb}] (Di={di}), got "
                             f"{keys.dtype} {tuple(keys.shape)}")
    if cand_idx.dim() != 2 or cand_idx.shape[0] != q.shape[0]:
        raise ValueError(f"cand_idx must be [T={q.shape[0]}, C], got {tuple(cand_idx.shape)}")
    which = choose_backend(q, keys, backend=backend)
    if which == "torch":  # one GEMM per run of a sequence's prefill rows, the reference's gather otherwise
        from dsv4.kernels.prefix_gemm import indexer_scores_shared

        return indexer_scores_shared(q, weights, keys, cand_idx, index_format=index_format)
    from dsv4.kernels import triton_ops

    return triton_ops.indexer_scores_triton(q, weights, keys, cand_idx, interpret=which == "interpret",
                                            index_format=index_format)


def indexer_topk(q, weights, keys, cand_idx, k: int, *, index_format: str | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """See `reference.indexer_topk_ref`: physical row ids [T, k], -1 where fewer are visible.

    Fast path (every backend): C <= k -> the candidates themselves, no scoring. Otherwise scores
    from `indexer_scores` and the deterministic selection of `select_topk` (ties: lower column wins).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if cand_idx.dim() != 2:
        raise ValueError(f"cand_idx must be [T, C], got {tuple(cand_idx.shape)}")
    if cand_idx.shape[1] <= k:
        return reference.topk_fast_path(cand_idx, k)
    scores = indexer_scores(q, weights, keys, cand_idx, index_format=index_format, backend=backend)
    return select_topk(scores, cand_idx, k, backend=backend)


def select_topk(scores, cand_idx, k: int, *, backend: str | None = None) -> torch.Tensor:
    """The k best finite scores' candidates [T, k] (physical rows), -1 padded; ties go to the lower
    column; selected rows in column order. See `reference.topk_from_scores`. Triton: radix select."""
    if scores.dim() != 2 or scores.shape != cand_idx.shape:
        raise ValueError(f"scores and cand_idx must both be [T, C]; got {tuple(scores.shape)}, "
                         f"{tuple(cand_idx.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    which = choose_backend(scores, backend=backend)
    if which == "torch":  # the reference's result; ties at the k-th value take the reference itself
        from dsv4.kernels.topk_torch import topk_from_scores_fast

        return topk_from_scores_fast(scores, cand_idx, k)
    from dsv4.kernels import triton_ops

    return triton_ops.topk_triton(scores, cand_idx, k, interpret=which == "interpret")


def compressor_step(kv, score, state, state_slot, emit_rows, entry, dest, out_pool, norm_weight, inv_freq, *,
                    ratio: int, coff: int, eps: float, col_offset: int = 0, out_format: str = "plain",
                    rope_dim: int | None = None, compute_dtype: torch.dtype | None = None,
                    backend: str | None = None) -> None:
    """One compressor step, in place (see `reference.compressor_step_ref`): append [kv | score] of every
    token to its tail-state row `state_slot[t]`, then for every completed block e pool the state rows
    `emit_rows[e]`, RMSNorm, RoPE at `entry[e]·ratio`, quantise (`out_format`) and store into
    `out_pool[dest[e]]`. Rows / slots / dests of -1 are skipped.

    kv, score [T, coff·dim]; state float [Ns, >= col_offset + 2·coff·dim]; state_slot [T];
    emit_rows [E, coff·ratio]; entry, dest [E]; norm_weight [dim]; inv_freq [rope_dim/2];
    out_pool [N, dim] float ("plain") or uint8 rows ("fp8_kv": `fp8_kv` layout, needs `rope_dim`;
    "fp8_index" / "fp4_index": `index_quant` layouts). The torch path computes in `compute_dtype`
    (default kv.dtype) exactly like the model; the Triton path computes in fp32.
    """
    from dsv4.kernels import compressor_ops

    compressor_ops.check_compressor_args(kv, score, state, state_slot, emit_rows, entry, dest, out_pool, norm_weight,
                                         inv_freq, ratio=ratio, coff=coff, col_offset=col_offset,
                                         out_format=out_format, rope_dim=rope_dim)
    which = choose_backend(kv, state, backend=backend)
    if which == "torch":
        reference.compressor_step_ref(kv, score, state, state_slot, emit_rows, entry, dest, out_pool, norm_weight,
                                      inv_freq, ratio=ratio, coff=coff, eps=eps, col_offset=col_offset,
                                      out_format=out_format, rope_dim=rope_dim,
                                      compute_dtype=compute_dtype or kv.dtype)
        return
    compressor_ops.compressor_step_triton(kv, score, state, state_slot, emit_rows, entry, dest, out_pool, norm_weight,
                                          inv_freq, ratio=ratio, coff=coff, eps=eps, col_offset=col_offset,
                                          out_format=out_format, rope_dim=rope_dim, interpret=which == "interpret")


def store_rows(values, dest, out_pool, *, out_format: str = "plain", rope_dim: int | None = None,
               backend: str | None = None) -> None:
    """out_pool[dest[n]] = quantise(values[n]) (dest -1 skipped), the compressor's store on its own:
    values [N, dim] float; formats as in `compressor_step`. Byte-identical across backends."""
    from dsv4.kernels import compressor_ops

    if values.dim() != 2 or dest.shape != (values.shape[0],):
        raise ValueError(f"values must be [N, dim] and dest [N]; got {tuple(values.shape)}, {tuple(dest.shape)}")
    compressor_ops.check_out_pool(out_pool, values.shape[1], out_format, rope_dim)
    which = choose_backend(values, out_pool, backend=backend)
    if which == "torch":
        reference.store_entries_ref(out_pool, dest, values, out_format, rope_dim)
        return
    compressor_ops.store_rows_triton(values, dest, out_pool, out_format=out_format, rope_dim=rope_dim,
                                     interpret=which == "interpret")


def fp8_block_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *,
                   backend: str | None = None) -> torch.Tensor:
    """y = x · Wᵀ, W = e4m3 `qweight` [N, K] times one UE8M0 `scale` byte per 128 x 128 block
    ([⌈N/128⌉, ⌈K/128⌉]): [..., N] in x's dtype (fp32 accumulation). See `quant_gemm.py`.
    The Triton kernel needs compute capability >= 8.9 when compiled; "auto" takes torch on older GPUs."""
    from dsv4.kernels import quant_gemm

    quant_gemm.check_fp8_args(x, qweight, scale)
    which = choose_backend(x, qweight, backend=backend)
    auto = (backend or settings.current().backend).strip().lower() == "auto"
    if which == "triton" and auto and not quant_gemm.fp8_native_supported(x.device):
        which = "torch"
    if which == "torch":
        return quant_gemm.fp8_block_gemm_ref(x, qweight, scale)
    return quant_gemm.fp8_block_gemm_triton(x, qweight, scale, interpret=which == "interpret")


def mxfp4_grouped_gemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, counts, *,
                       backend: str | None = None) -> torch.Tensor:
    """The routed-expert GEMM over rows sorted by expert: x [R, K] holds counts[0] rows for expert 0, then
    counts[1] for expert 1, …; y[rows of e] = x[rows of e] · W_eᵀ with W_e from packed e2m1 `codes` [E, N, K/2]
    (low nibble = even column) and UE8M0 `scales` [E, N, ⌈K/32⌉]. Returns [R, N] in x's dtype (fp32
    accumulation). `counts`: E ints (a list, or a 1-D tensor read once). See `quant_gemm.py`."""
    from dsv4.kernels import quant_gemm

    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    quant_gemm.check_mxfp4_args(x, codes, scales, counts)
    which = choose_backend(x, codes, backend=backend)
    if which == "torch":
        return quant_gemm.mxfp4_grouped_gemm_ref(x, codes, scales, counts)
    return quant_gemm.mxfp4_grouped_gemm_triton(x, codes, scales, counts, interpret=which == "interpret")
