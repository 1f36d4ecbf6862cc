"""The fp8 / fp4 KV paths follow what DeepSeek's reference inference code (`inference/model.py` + `kernel.py` of the
V4 release; V3.2-Exp for fp8 indexer keys) simulates at inference and transformers does not (docs/model.md,
"Numerics of the published model"). Each reference recipe is transcribed here by hand, independently of our codecs:

- `act_quant(x, block, "ue8m0", inplace=True)`: amax floor 1e-4, s = 2^ceil(log2(amax / 448)), x̂ = e4m3(x / s) · s;
- `fp4_act_quant(x, 32, inplace=True)`: amax floor 6·2^-126, s = 2^ceil(log2(amax / 6)), x̂ = e2m1(x / s) · s with
  round-to-nearest-even on the e2m1 grid;
- `rotate_activation(x)`: x · H_d / sqrt(d), H the Sylvester-Hadamard matrix.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dsv4.kernels import dispatch
from dsv4.kernels.fp8_kv import dequantize_kv_rows, quantize_kv_rows, scales_of
from dsv4.kernels.index_quant import (
    dequantize_index_rows,
    fake_quantize_index,
    hadamard_matrix,
    hadamard_rotate,
    quantize_index_rows,
)
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.checkpoint.random_init import write_random_checkpoint
from dsv4.runtime.model import KVPools, load_model

from tests.model_utils import PagedRunner, one_thread, tiny_configs


# ---- the reference recipes, by hand --------------------------------------------------------------------------
def act_quant_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """DeepSeek's act_quant(x, block, scale_fmt="ue8m0", inplace=True) on the last dim (a multiple of block)."""
    g = x.double().unflatten(-1, (-1, block))
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    q = (g / s).clamp(-448.0, 448.0).float().to(torch.float8_e4m3fn).double()
    return (q * s).flatten(-2).float()


def fp4_act_quant_ref(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's fp4_act_quant(x, 32, inplace=True): e2m1 has step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6], and
    an even multiple of the step is an even code, so round-half-to-even of |v| / step is the cast's rounding."""
    g = x.double().unflatten(-1, (-1, 32))
    amax = g.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0**-126)
    s = torch.exp2(torch.ceil(torch.log2(amax / 6.0)))
    v = (g / s).clamp(-6.0, 6.0)
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).double()
    r = torch.round(a / step) * step  # torch.round: half to even
    return (torch.copysign(r, v) * s).flatten(-2).float()


def sylvester(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / d**0.5


def _cases(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    """Random rows over a wide dynamic range, plus the rows where the recipes' details show: exact e2m1 midpoints
    (group max 6 -> scale 1), an all-zero row, a row far below the fp8 amax floor."""
    x = torch.randn(n, d, generator=g) * torch.exp2(torch.randint(-10, 10, (n, 1), generator=g).float())
    x[0] = 0.0
    x[1] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -1.75, -3.5, -0.25] * (d // 12 + 1))[:d]
    x[2] = torch.randn(d, generator=g) * 3e-7
    return x


# ---- codecs --------------------------------------------------------------------------------------------------
def test_fp4_index_codec_is_deepseeks_fp4_act_quant():
    x = _cases(torch.Generator().manual_seed(0), 16, 128)
    rows = quantize_index_rows(x, "fp4")
    assert torch.equal(dequantize_index_rows(rows, 128, "fp4"), fp4_act_quant_ref(x))
    # ties go to the even code: 0.75 -> 1, 1.75 -> 2, 3.5 -> 4 (the lowest-code rule gave 0.5, 1.5, 3)
    dec = dequantize_index_rows(rows, 128, "fp4")[1, :12]
    assert dec.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -2.0, -4.0, -0.0]
    # the all-zero row's scales sit at the floor exponent -126 (byte 1)
    assert bool((rows[0, 64:] == 1).all())
    assert torch.equal(fake_quantize_index(x.view(4, 4, 128), "fp4"), fp4_act_quant_ref(x).view(4, 4, 128))


def test_fp8_index_codec_is_v32_act_quant_one_block_per_row():
    x = _cases(torch.Generator().manual_seed(1), 16, 128)
    rows = quantize_index_rows(x, "fp8")
    assert torch.equal(dequantize_index_rows(rows, 128, "fp8"), act_quant_ref(x, 128))
    scale = rows[:, 128:].contiguous().view(torch.float32).squeeze(-1)
    mant, _ = torch.frexp(scale)
    assert bool((mant == 0.5).all())  # UE8M0: powers of two (amax / 448 gave arbitrary fp32 scales)


def test_fp8_kv_codec_is_act_quant_64_on_the_nope_dims():
    x = _cases(torch.Generator().manual_seed(2), 16, 512)
    x[3, 64:128] *= 1e-6  # one tile below the amax floor 1e-4
    rows = quantize_kv_rows(x, 64)
    want = torch.cat([act_quant_ref(x[:, :448], 64), x[:, 448:].to(torch.bfloat16).float()], dim=-1)
    assert torch.equal(dequantize_kv_rows(rows, 512, 64), want)
    s = scales_of(rows, 512, 64)
    assert s[0, 0].item() == 2.0**-22 and s[3, 1].item() == 2.0**-22  # ceil(log2(1e-4 / 448)) = -22


# ---- the rotation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 32, 128])
def test_hadamard_is_orthonormal_sylvester(d):
    h = hadamard_matrix(d, dtype=torch.float64)
    assert torch.equal(h, sylvester(d))
    torch.testing.assert_close(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(5, 3, d, generator=torch.Generator().manual_seed(d))
    torch.testing.assert_close(hadamard_rotate(x), (x.double() @ h).float(), atol=1e-5, rtol=1e-5)
    assert hadamard_rotate(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rotate(torch.zeros(2, 48))


def test_rotation_preserves_indexer_scores_without_quantisation():
    """(H q)·(H k) = q·k: unquantised scores change by rounding only (fp32: ~1e-6 relative)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(6, 4, 64, generator=g), torch.randn(20, 64, generator=g)
    w = torch.rand(6, 4, generator=g)
    cand = torch.arange(20).expand(6, 20).contiguous()
    plain = dispatch.indexer_scores(q, w, k, cand, backend="torch")
    rotated = dispatch.indexer_scores(hadamard_rotate(q), w, hadamard_rotate(k), cand, backend="torch")
    torch.testing.assert_close(rotated, plain, atol=1e-5, rtol=1e-5)


def _scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (torch.einsum("thd,nd->thn", q.double(), k.double()).relu() * w.double()[..., None]).sum(1)


def fp4_score_errors(seed: int, outlier_gain: float, top: int = 16) -> dict[str, tuple[float, float]]:
    """fp4 indexer scores against exact ones, (without, with) the rotation: relative L2 error ("rel_l2") and the
    share of the exact top-`top` entries kept ("recall"), on Gaussian q [32 tokens, 8 heads, 128] and keys [256, 128]
    whose 4 outlier channels are `outlier_gain` times larger."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.ones(128)
    gain[torch.randperm(128, generator=g)[:4]] = outlier_gain
    q, k = torch.randn(32, 8, 128, generator=g) * gain, torch.randn(256, 128, generator=g) * gain
    w = torch.rand(32, 8, generator=g)
    exact = _scores(q, k, w)
    best = exact.topk(top, dim=-1).indices
    rel, recall = [], []
    for rot in (lambda t: t, hadamard_rotate):
        approx = _scores(fake_quantize_index(rot(q), "fp4"), fake_quantize_index(rot(k), "fp4"), w)
        rel.append(((approx - exact).norm() / exact.norm()).item())
        mine = approx.topk(top, dim=-1).indices
        recall.append((mine[:, :, None] == best[:, None, :]).any(-1).float().mean().item())
    return {"rel_l2": (rel[0], rel[1]), "recall": (recall[0], recall[1])}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_brings_fp4_scores_closer_on_outlier_channels(seed):
    """With outlier channels an fp4 group's power-of-two scale follows its outlier, so the other 31 channels of the
    group round to 0 or a few steps; the rotation spreads every channel over all 128 coordinates before the scales
    are chosen. Measured (`pytest -s` prints it): the rotated scores are closer and keep more of the exact top-k."""
    m = fp4_score_errors(seed, 20.0)
    print(f"seed {seed}, outlier gain 20: fp4 scores rel L2 {m['rel_l2'][0]:.4f} -> {m['rel_l2'][1]:.4f} rotated, "
          f"top-16 recall {m['recall'][0]:.3f} -> {m['recall'][1]:.3f}")
    assert m["rel_l2"][1] < m["rel_l2"][0]
    assert m["recall"][1] > m["recall"][0]


# ---- the model -----------------------------------------------------------------------------------------------
def _runner(model, cfg, kv_dtype: str, index_dtype: str | None) -> PagedRunner:
    """PagedRunner with an explicit index_dtype (same block tables for every format: seed 0)."""
    r = PagedRunner(model, cfg, "fp32", max_tokens=64)
    r.spec = CacheSpec.from_model(cfg, kv_dtype=kv_dtype, index_dtype=index_dtype)
    r.pools = KVPools.for_model(cfg, r.spec, dict(r.pools.num_blocks))
    return r


@pytest.mark.parametrize("index_dtype", ["fp4", "fp8"])
def test_model_indexer_rotates_then_quantises_q_and_k(tmp_path, monkeypatch, index_dtype):
    """On a model whose layer 0 is CSA (its input does not depend on the KV format), the quantised run stores
    Q(H k) for the keys the fp32 run stores unrotated, and scores with Q(H q) for the fp32 run's q."""
    cfg = dataclasses.replace(tiny_configs()["csa"], index_head_dim=32)
    write_random_checkpoint(cfg, tmp_path, seed=7)
    model, cfg, _ = load_model(tmp_path, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    seen: list[torch.Tensor] = []
    real = dispatch.indexer_scores

    def spy(q, *args, **kwargs):
        seen.append(q.detach().clone())
        return real(q, *args, **kwargs)

    monkeypatch.setattr(dispatch, "indexer_scores", spy)
    runs = {}
    with one_thread(), torch.no_grad():
        for kv_dtype, idx in (("fp32", None), ("fp8", index_dtype)):
            seen.clear()
            r = _runner(model, cfg, kv_dtype, idx)
            r.step([(0, ids, 0)])
            runs[kv_dtype] = (r, seen[0])  # layer 0's queries
    (plain, q_plain), (quant, q_quant) = runs["fp32"], runs["fp8"]
    keys = plain.pools.tensor("idx", 0)
    written = keys.abs().sum(-1) > 0
    assert int(written.sum()) == 24 // cfg.csa_ratio
    want = quantize_index_rows(hadamard_rotate(keys[written]), index_dtype)
    assert torch.equal(quant.pools.tensor("idx", 0)[written], want)
    assert torch.equal(q_quant, fake_quantize_index(hadamard_rotate(q_plain), index_dtype))
