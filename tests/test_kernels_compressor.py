"""Compressor step: the torch reference equals the model's compressor; the Triton kernels (interpreted)
equal the reference on ragged batches, partial groups, group boundaries and scattered physical rows;
the Triton store writes the same bytes as the torch codecs (and as the model's own codec)."""

from __future__ import annotations

import pytest
import torch
from dsv4.kernels import dispatch, reference
from dsv4.kernels.fp8_kv import dequantize_kv_rows, fp8_row_bytes
from dsv4.kernels.index_quant import dequantize_index_rows, index_row_bytes, quantize_index_rows

pytest.importorskip("triton")


def _inv_freq(rope: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rope, 2, dtype=torch.float) / rope))


def _pool_for(fmt: str, n: int, d: int, rope: int, dtype=torch.float32) -> torch.Tensor:
    if fmt == "plain":
        return torch.zeros(n, d, dtype=dtype)
    if fmt == "fp8_kv":
        return torch.zeros(n, fp8_row_bytes(d, rope), dtype=torch.uint8)
    return torch.zeros(n, index_row_bytes(d, fmt[:3]), dtype=torch.uint8)


def _decode(fmt: str, rows: torch.Tensor, d: int, rope: int) -> torch.Tensor:
    if fmt == "plain":
        return rows.float()
    if fmt == "fp8_kv":
        return dequantize_kv_rows(rows, d, rope)
    return dequantize_index_rows(rows, d, fmt[:3])


def _step(g: torch.Generator, ratio: int, coff: int, d: int, starts: list[int], counts: list[int], col_offset: int = 0,
          extra_cols: int = 0):
    """A ragged step: sequence s runs positions starts[s] .. starts[s]+counts[s]-1. Every (s, position) has its
    own scattered state row (earlier positions pre-filled with random "older" state); emissions follow the
    model's rule ((p+1) % ratio == 0, entry j = p // ratio, rows of positions j·ratio − (coff−1)·ratio ...)."""
    T = sum(counts)
    top = max(a + n for a, n in zip(starts, counts, strict=True))
    n_state = len(starts) * top + 5
    perm = torch.randperm(n_state, generator=g)
    row_of = {(s, p): int(perm[s * top + p]) for s in range(len(starts)) for p in range(top)}
    state = torch.randn(n_state, col_offset + 2 * coff * d + extra_cols, generator=g)
    kv = torch.randn(T, coff * d, generator=g)
    score = torch.randn(T, coff * d, generator=g) * 2
    slots, rows, entry = [], [], []
    for s, (a, n) in enumerate(zip(starts, counts, strict=True)):
        for p in range(a, a + n):
            slots.append(row_of[(s, p)])
            if (p + 1) % ratio == 0:
                j = p // ratio
                first = j * ratio - (coff - 1) * ratio
                rows.append([row_of[(s, q)] if q >= 0 else -1 for q in range(first, first + coff * ratio)])
                entry.append(j)
    E = len(entry)
    emit_rows = torch.tensor(rows, dtype=torch.long).reshape(E, coff * ratio)
    dest = torch.randperm(3 * E + 2, generator=g)[:E]
    return kv, score, state, torch.tensor(slots), emit_rows, torch.tensor(entry, dtype=torch.long), dest, 3 * E + 2


CASES = [
    # ratio, coff, d, rope, starts, counts, fmt
    (4, 2, 32, 8, [0, 5, 13], [9, 3, 3], "plain"),      # CSA: first block (rows before 0 = -1), ragged, partial
    (4, 2, 32, 8, [2, 7], [6, 5], "fp8_kv"),            # CSA, fp8 KV rows
    (2, 2, 32, 8, [0, 3], [4, 4], "fp8_index"),         # CSA indexer compressor, fp8 index keys
    (4, 2, 32, 8, [1, 6], [7, 2], "fp4_index"),         # CSA indexer compressor, fp4 index keys
    (8, 1, 16, 8, [0, 9, 20], [16, 7, 4], "plain"),     # HCA: two blocks in one chunk, partial groups
    (8, 1, 80, 16, [3], [13], "fp8_kv"),                # HCA, two fp8 scale tiles, padded channel vector
]


@pytest.mark.parametrize(("ratio", "coff", "d", "rope", "starts", "counts", "fmt"), CASES)
def test_compressor_step_triton_matches_reference(ratio, coff, d, rope, starts, counts, fmt):
    g = torch.Generator().manual_seed(ratio * 100 + d + len(starts))
    off = 5
    kv, score, state, slots, emit_rows, entry, dest, n_out = _step(g, ratio, coff, d, starts, counts, off, 3)
    assert entry.numel() > 0
    slots[1] = -1  # a token without a state slot is skipped
    dest[-1] = -1  # an entry without a destination row is not stored
    w = torch.rand(d, generator=g) + 0.5
    inv = _inv_freq(rope)
    outs = {}
    for be in ("torch", "triton"):
        st, out = state.clone(), _pool_for(fmt, n_out, d, rope)
        dispatch.compressor_step(kv, score, st, slots, emit_rows, entry, dest, out, w, inv, ratio=ratio, coff=coff,
                                 eps=1e-6, col_offset=off, out_format=fmt, rope_dim=rope, backend=be)
        outs[be] = (st, out)
    # append: an exact copy into the state columns, nothing else touched
    assert torch.equal(outs["triton"][0], outs["torch"][0])
    assert not torch.equal(outs["torch"][0], state)
    ref_out, tri_out = outs["torch"][1], outs["triton"][1]
    untouched = torch.ones(n_out, dtype=torch.bool)
    untouched[dest[dest >= 0]] = False
    assert bool((tri_out[untouched] == 0).all()) and bool((ref_out[untouched] == 0).all())
    if fmt == "plain":
        torch.testing.assert_close(tri_out, ref_out, atol=2e-5, rtol=2e-5)
        return
    # quantised: the Triton bytes are exactly the torch codec applied to the Triton kernel's own fp32 entries
    plain = _pool_for("plain", n_out, d, rope)
    dispatch.compressor_step(kv, score, state.clone(), slots, emit_rows, entry, dest, plain, w, inv, ratio=ratio,
                             coff=coff, eps=1e-6, col_offset=off, rope_dim=rope, backend="triton")
    requant = _pool_for(fmt, n_out, d, rope)
    reference.store_entries_ref(requant, dest, plain[dest.clamp(min=0)], fmt, rope)
    assert torch.equal(tri_out, requant)
    # and decodes close to the reference (a one-step difference in rounding at most)
    a, b = _decode(fmt, tri_out, d, rope), _decode(fmt, ref_out, d, rope)
    scale = a.abs().amax(dim=-1, keepdim=True)
    tol = 0.5 if fmt == "fp4_index" else 0.07
    assert bool(((a - b).abs() <= tol * a.abs().clamp(min=1e-3 * scale) + 1e-6).all())


def test_compressor_step_no_emission_and_empty():
    """Partial group only (no block completes): the state is appended, the pool is untouched; T = 0 is a no-op."""
    g = torch.Generator().manual_seed(3)
    kv, score, state, slots, emit_rows, entry, dest, _ = _step(g, 4, 2, 16, [0], [3])
    assert entry.numel() == 0
    out = torch.zeros(4, 16)
    for be in ("torch", "triton"):
        st = state.clone()
        dispatch.compressor_step(kv, score, st, slots, emit_rows, entry, dest, out, torch.ones(16), _inv_freq(4),
                                 ratio=4, coff=2, eps=1e-6, backend=be)
        assert torch.equal(st[slots, :64], torch.cat([kv, score], -1)) and bool((out == 0).all())
        dispatch.compressor_step(kv[:0], score[:0], st, slots[:0], emit_rows, entry, dest, out, torch.ones(16),
                                 _inv_freq(4), ratio=4, coff=2, eps=1e-6, backend=be)


def _tiny_model_cfg():
    from dsv4.runtime.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=32, num_attention_heads=2, head_dim=32, qk_rope_head_dim=8,
                       q_lora_rank=16, o_groups=2, o_lora_rank=8, moe_intermediate_size=16, index_n_heads=4,
                       index_head_dim=32, hc_mult=2, torch_dtype="float32", num_hidden_layers=3,
                       layer_types=[SLIDING, CSA, HCA], mlp_layer_types=[HASH_MOE, MOE, MOE],
                       compress_rates={CSA: 4, HCA: 8}, sliding_window=8, index_topk=2, n_routed_experts=4,
                       num_experts_per_tok=2)


@pytest.mark.parametrize(("coff", "dtype"), [(2, torch.float32), (1, torch.float32), (2, torch.bfloat16)])
def test_reference_equals_model_compressor(coff, dtype):
    """`compressor_pool_ref` is bit-identical to the model's `Compressor.project` + `Compressor.pool` (the model's
    casts included), on a tiny config, for CSA (overlapping) and HCA, fp32 and bf16."""
    from dsv4.runtime.model.attention import Compressor
    from dsv4.runtime.model.rope import inv_freq_for

    cfg = _tiny_model_cfg()
    ratio = 4 if coff == 2 else 8
    d = cfg.head_dim
    g = torch.Generator().manual_seed(coff)
    comp = Compressor(cfg.hidden_size, d, ratio, coff, cfg.rms_norm_eps, dtype)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    inv = inv_freq_for(cfg, compressed=True)
    T = 3 * ratio
    x = torch.randn(T, cfg.hidden_size, generator=g).to(dtype)
    pos = torch.arange(T)
    kv, score = comp.project(x, pos)
    state = torch.zeros(T + 4, 2 * coff * d)
    slots = torch.randperm(T + 4, generator=g)[:T]
    reference.compressor_append_ref(state, slots, kv, score)
    j = torch.arange(3)
    first = j * ratio - (coff - 1) * ratio
    gpos = first[:, None] + torch.arange(coff * ratio)[None, :]
    emit_rows = torch.where(gpos >= 0, slots[gpos.clamp(min=0)], torch.full_like(gpos, -1))
    with torch.no_grad():
        want = comp.pool(state[emit_rows.clamp(min=0)].float(), emit_rows >= 0, inv, j, dtype)
        got = reference.compressor_pool_ref(state, emit_rows, j, comp.norm.weight, inv, ratio=ratio, coff=coff,
                                            eps=cfg.rms_norm_eps, compute_dtype=dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)


def _codec_cases(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    """Rows that exercise rounding: ties, e4m3 subnormals, zeros, -0.0, wide dynamic range."""
    x = torch.randn(n, d, generator=g) * torch.exp2(torch.randint(-12, 12, (n, 1), generator=g).float())
    x[0] = 0.0
    x[1, : d // 2] = -0.0
    x[2] = torch.tensor([(k % 16) * 0.25 - 2.0 for k in range(d)])  # exact e2m1 / e4m3 midpoints
    x[3] = x[3] * 1e-6
    x[3, 0] = 448.0
    return x


@pytest.mark.parametrize(("fmt", "d", "rope"), [("fp8_kv", 80, 16), ("fp8_kv", 32, 8), ("fp8_index", 32, 0),
                                                ("fp4_index", 64, 0), ("plain", 24, 0)])
def test_store_rows_bytes_equal_torch_codec(fmt, d, rope):
    g = torch.Generator().manual_seed(d)
    x = _codec_cases(g, 9, d)
    dest = torch.randperm(12, generator=g)[:9]
    dest[4] = -1
    pools = []
    for be in ("torch", "triton"):
        out = _pool_for(fmt, 12, d, rope, torch.float16)
        dispatch.store_rows(x, dest, out, out_format=fmt, rope_dim=rope if fmt == "fp8_kv" else None, backend=be)
        pools.append(out)
    assert torch.equal(pools[0], pools[1])


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_index_codec_equals_model_codec(fmt):
    from dsv4.runtime.model import fp8_codec

    x = _codec_cases(torch.Generator().manual_seed(1), 8, 64)
    assert torch.equal(quantize_index_rows(x, fmt), fp8_codec.encode_index(x, fmt))
    q = quantize_index_rows(x, fmt)
    assert torch.equal(dequantize_index_rows(q, 64, fmt), fp8_codec.decode_index(q, fmt, 64))


def test_compressor_bad_arguments():
    kv = torch.zeros(2, 32)
    state, slots = torch.zeros(8, 64), torch.zeros(2, dtype=torch.long)
    rows, e = torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    w, inv = torch.ones(16), _inv_freq(4)
    ok = dict(ratio=4, coff=2, eps=1e-6)
    with pytest.raises(ValueError, match="coff"):
        dispatch.compressor_step(kv, kv, state, slots, rows, e, e, torch.zeros(4, 16), w, inv, **{**ok, "coff": 3})
    with pytest.raises(ValueError, match="state must be"):
        dispatch.compressor_step(kv, kv, state[:, :40], slots, rows, e, e, torch.zeros(4, 16), w, inv, **ok)
    with pytest.raises(ValueError, match="emit_rows"):
        dispatch.compressor_step(kv, kv, state, slots, rows[:, :4], e, e, torch.zeros(4, 16), w, inv, **ok)
    with pytest.raises(ValueError, match=r"out_pool .*'fp8_kv'.*uint8 \[N, 24\]"):
        dispatch.compressor_step(kv, kv, state, slots, rows, e, e, torch.zeros(4, 16), w, inv, out_format="fp8_kv",
                                 rope_dim=4, **ok)
    with pytest.raises(ValueError, match="multiple of 32"):
        dispatch.store_rows(torch.zeros(2, 16), e.repeat(2), torch.zeros(4, 9, dtype=torch.uint8),
                            out_format="fp4_index")
    with pytest.raises(ValueError, match="out_format"):
        dispatch.store_rows(torch.zeros(2, 16), e.repeat(2), torch.zeros(4, 16), out_format="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("ratio", "coff", "d", "fmt"), [(4, 2, 512, "fp8_kv"), (128, 1, 512, "fp8_kv"),
                                                         (4, 2, 128, "fp4_index"), (4, 2, 128, "fp8_index")])
def test_compressor_compiled_on_cuda(ratio, coff, d, fmt):
    """DeepSeek-V4-Flash shapes, compiled: the GPU bytes decode close to the CPU reference."""
    g = torch.Generator().manual_seed(0)
    kv, score, state, slots, emit_rows, entry, dest, n_out = _step(g, ratio, coff, d, [0, 3 * ratio - 2],
                                                                    [2 * ratio, ratio + 3])
    w, inv = torch.rand(d, generator=g) + 0.5, _inv_freq(64, 160000.0)
    ref_state, ref_out = state.clone(), _pool_for(fmt, n_out, d, 64)
    dispatch.compressor_step(kv, score, ref_state, slots, emit_rows, entry, dest, ref_out, w, inv, ratio=ratio,
                             coff=coff, eps=1e-6, out_format=fmt, rope_dim=64, backend="torch")
    cu = [t.cuda() for t in (kv.bfloat16(), score.bfloat16(), state, slots, emit_rows, entry, dest,
                             _pool_for(fmt, n_out, d, 64), w, inv)]
    dispatch.compressor_step(*cu, ratio=ratio, coff=coff, eps=1e-6, out_format=fmt, rope_dim=64)
    torch.testing.assert_close(cu[2].cpu()[slots], ref_state[slots], atol=1e-2, rtol=1e-2)  # bf16 inputs
    a, b = _decode(fmt, cu[7].cpu(), d, 64), _decode(fmt, ref_out, d, 64)
    tol = 0.5 if fmt == "fp4_index" else 0.1
    assert bool(((a - b).abs() <= tol * a.abs() + 0.05).all())
