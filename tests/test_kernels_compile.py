"""Ahead-of-time compilation of the Triton kernels for a Hopper GPU (sm_90) on a machine without one.

The interpreter tests prove the numbers; this proves the same source compiles to a cubin (tile sizes,
dtypes, masks, `tl.histogram`, bit casts), using Triton's bundled ptxas. No driver or device is used.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def _compile(module: str, kernel: str, types: dict[str, str], consts: dict, **options):
    from dsv4.kernels import triton_loader
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(triton_loader.load(module, False), kernel)
    sig = {a: types.get(a, "i32") for a in fn.arg_names}
    sig.update({c: "constexpr" for c in consts})
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                              options=options or None)
    assert compiled.asm.get("cubin")
    return compiled


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path is not None  # the sm_90 assembler bundled with triton
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas is not available")  # ~10 s in all

FLASH_FP8 = dict(NOPE=448, ROPE_OFF=448, SCALE_OFF=576, NTILES=7)
NO_LAYOUT = dict(NOPE=0, ROPE_OFF=0, SCALE_OFF=0, NTILES=0)


@pytest.mark.parametrize(("fmt", "coff", "block_p", "layout"), [
    (1, 2, 256, FLASH_FP8),   # CSA main compressor -> FP8 KV rows (d = 512)
    (1, 1, 256, FLASH_FP8),   # HCA main compressor
    (3, 2, 64, dict(NO_LAYOUT, NTILES=4)),  # indexer compressor -> FP4 index rows (d = 128)
    (0, 2, 64, NO_LAYOUT),    # plain bf16 pool
])
def test_compressor_pool_compiles_for_sm90(fmt, coff, block_p, layout):
    types = dict(state_ptr="*fp32", rows_ptr="*i64", dest_ptr="*i64", w_ptr="*fp32", cos_ptr="*fp32",
                 sin_ptr="*fp32", out_ptr="*bf16" if fmt == 0 else "*u8", eps="fp32")
    _compile("triton_compressor", "compressor_pool_kernel", types,
             dict(COFF=coff, BLOCK_R=4, BLOCK_P=block_p, FMT=fmt, **layout))


def test_append_and_store_compile_for_sm90():
    _compile("triton_compressor", "compressor_append_kernel",
             dict(kv_ptr="*bf16", score_ptr="*bf16", slot_ptr="*i64", state_ptr="*fp32"), dict(BLOCK=1024))
    _compile("triton_compressor", "store_rows_kernel", dict(x_ptr="*fp32", dest_ptr="*i64", out_ptr="*u8"),
             dict(BLOCK_P=64, FMT=2, **NO_LAYOUT))


def test_topk_compiles_for_sm90():
    _compile("triton_topk", "topk_kernel", dict(s_ptr="*fp32", c_ptr="*i64", out_ptr="*i64"), dict(BLOCK_C=1024))


@pytest.mark.parametrize("key_fmt", [1, 2])
def test_quantised_indexer_scores_compile_for_sm90(key_fmt):
    _compile("triton_attention", "indexer_scores_kernel",
             dict(q_ptr="*bf16", w_ptr="*fp32", keys_ptr="*u8", cand_ptr="*i64", out_ptr="*fp32"),
             dict(BLOCK_HI=64, BLOCK_C=64, BLOCK_DI=128, DOT_F32=False, KEY_FMT=key_fmt))


def test_sparse_attention_fp8_compiles_for_sm90():
    kv = "*u8"
    _compile("triton_attention", "sparse_attention_kernel",
             dict(q_ptr="*bf16", swa_ptr=kv, comp_ptr=kv, swa_idx_ptr="*i64", comp_idx_ptr="*i64", sink_ptr="*fp32",
                  out_ptr="*fp32", lse_ptr="*fp32", scale="fp32"),
             dict(BLOCK_H=16, BLOCK_N=32, BLOCK_D=512, SPLIT=True, SWA_FP8=True, COMP_FP8=True, DOT_F32=False,
                  **{k: v for k, v in FLASH_FP8.items() if k != "NTILES"}))


HOPPER_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on sm_90 (227 KiB)


@pytest.mark.parametrize("act", ["*bf16", "*fp32"])
@pytest.mark.parametrize("block_m", [16, 128])
def test_quantised_weight_gemms_compile_for_sm90(act, block_m):
    """FP8 block-scaled GEMM (fp8e4nv converts) and the MXFP4 grouped expert GEMM at the launchers' GPU tiles and
    options, within Hopper's shared memory."""
    from dsv4.kernels.quant_gemm import gpu_options

    tiles = dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, DOT_F32=act == "*fp32")
    for kernel, types, consts in [
        ("fp8_block_gemm_kernel", dict(x_ptr=act, w_ptr="*u8", s_ptr="*u8", y_ptr=act), dict(tiles, GROUP_M=8)),
        ("mxfp4_grouped_gemm_kernel", dict(x_ptr=act, c_ptr="*u8", s_ptr="*u8", y_ptr=act, tile_expert_ptr="*i32",
                                           tile_start_ptr="*i32", tile_end_ptr="*i32"), tiles)]:
        compiled = _compile("triton_quant_gemm", kernel, types, consts, **gpu_options(block_m, 128))
        assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, (kernel, compiled.metadata.shared)
