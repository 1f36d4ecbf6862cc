"""KV storage dtypes: bf16 and the published FP8 row layout (584 B for 512/64), measured against fp32 KV."""

from __future__ import annotations

import pytest
import torch
from dsv4.runtime.checkpoint.random_init import write_random_checkpoint
from dsv4.runtime.model import fp8_codec, load_model

from tests.model_utils import PagedRunner, tiny_configs


def test_fp8_row_codec():
    assert fp8_codec.row_bytes(512, 64) == 584
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * 3
    rows = fp8_codec.encode(x, 64)
    assert rows.shape == (64, 584) and rows.dtype == torch.uint8
    y = fp8_codec.decode(rows, 64, 512)
    assert torch.equal(y[:, 448:], x[:, 448:].to(torch.bfloat16).float())  # rope dims stay bf16
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < 0.04, rel
    for fmt, width, bound in (("fp8", 132, 0.04), ("fp4", 68, 0.15)):
        r = fp8_codec.encode_index(x[:, :128], fmt)
        assert r.shape == (64, width)
        z = fp8_codec.decode_index(r, fmt, 128)
        assert ((z - x[:, :128]).norm() / x[:, :128].norm()).item() < bound


@pytest.mark.parametrize("kv_dtype,rel_bound", [("bf16", 0.01), ("fp8", 0.5)])
def test_quantised_kv_decode_close_to_fp32(tmp_path, kv_dtype, rel_bound):
    cfg = tiny_configs()["mix"]
    write_random_checkpoint(cfg, tmp_path, seed=5)
    model, cfg, _ = load_model(tmp_path, progress=False)
    n = 3 * cfg.hca_ratio + 5
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = PagedRunner(model, cfg, "fp32", max_tokens=n).step([(0, ids, 0)])
    r = PagedRunner(model, cfg, kv_dtype, max_tokens=n, seed=3)
    out = torch.cat([r.step([(0, ids[p:p + 3], p)]) for p in range(0, n, 3)])
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < rel_bound, rel
