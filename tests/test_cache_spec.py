"""CacheSpec: pools, rows and bytes reproduce the design note's tables (§6, §7)."""

from __future__ import annotations

import pytest
from dsv4.runtime.cache.spec import CacheConfigError, CacheSpec, fp8_row_bytes, index_row_bytes
from dsv4.runtime.config import CSA, HCA, flash, pro, tiny


def test_fp8_row_and_index_formats():
    assert fp8_row_bytes(512, 64) == 584
    assert index_row_bytes(128, "fp8") == 132
    assert index_row_bytes(128, "fp4") == 68
    assert index_row_bytes(128, "bf16") == 256


@pytest.mark.parametrize("cfg_fn,idx,slope", [
    (flash, "fp4", 3514.25), (flash, "fp8", 3850.25), (pro, "fp4", 5031.4375), (pro, "fp8", 5511.4375),
])
def test_slope_matches_design_table(cfg_fn, idx, slope):
    s = CacheSpec.from_model(cfg_fn(), "fp8", index_dtype=idx)
    assert s.slope_bytes_per_token() == pytest.approx(slope)
    assert round(s.slope_bytes_per_token()) == round(slope)


@pytest.mark.parametrize("cfg_fn,slope", [(flash, 6880), (pro, 9848)])
def test_bf16_slope(cfg_fn, slope):
    assert CacheSpec.from_model(cfg_fn(), "bf16").slope_bytes_per_token() == slope


def test_flash_pro_fixed_figures():
    f = CacheSpec.from_model(flash(), "fp8", index_dtype="fp4")
    p = CacheSpec.from_model(pro(), "fp8", index_dtype="fp4")
    # window: 128 x 584 B = 74,752 B per layer (the design note adds the MTP layer: 44 / 62 windows)
    assert f.window_bytes() == 43 * 74752 and p.window_bytes() == 61 * 74752
    # state: CSA 8 slots x (8,192 + 2,048) B = 80 KiB; HCA 128 slots x 4,096 B = 512 KiB
    assert f.state_bytes() == 21 * 80 * 1024 + 20 * 512 * 1024  # 11,920 KiB
    assert p.state_bytes() == 30 * 80 * 1024 + 31 * 512 * 1024  # 18,272 KiB
    # whole model at 1M tokens ~3.45 GiB (Flash) and ~4.94 GiB (Pro), windows without MTP
    assert f.bytes_for_context(2**20) / 2**30 == pytest.approx(3.446, abs=0.01)
    assert p.bytes_for_context(2**20) / 2**30 == pytest.approx(4.935, abs=0.01)


def test_flash_pools_and_blocks():
    s = CacheSpec.from_model(flash(), "fp8", index_dtype="fp4")
    assert (s.block_size, s.swa_block_size) == (256, 64)
    assert s.pools["csa"].rows_per_block == 64 and s.pools["hca"].rows_per_block == 2
    assert s.pools["csa"].layers == tuple(flash().layers_of(CSA)) and len(s.pools["csa"].layers) == 21
    assert len(s.pools["hca_state"].layers) == 20 and len(s.pools["swa"].layers) == 43
    assert s.pools["csa_state"].bytes_per_row == 4 * (4 * 512 + 4 * 128)
    assert s.pools["hca_state"].bytes_per_row == 2 * 512 * 4
    assert s.pools["swa"].bytes_per_block == 64 * 584 * 43
    assert s.block_bytes("csa") == 64 * (584 + 68) * 21
    assert s.pools["idx"].dtype == "uint8" and s.pools["idx"].row_elems == 68


def test_tiny_defaults_and_dtypes():
    cfg = tiny()
    s = CacheSpec.from_model(cfg)
    assert (s.block_size, s.swa_block_size) == (64, 16)
    assert s.pools["swa"].dtype == "bfloat16" and s.pools["swa"].row_elems == cfg.head_dim
    assert s.pools["idx"].row_elems == cfg.index_head_dim
    assert s.pools["hca"].rows_per_block == 64 // 16 and s.pools["csa"].rows_per_block == 16
    assert set(s.pools) == {"swa", "csa", "idx", "hca", "csa_state", "hca_state"}
    s32 = CacheSpec.from_model(cfg, "fp32")
    assert s32.pools["csa"].dtype == "float32" and s32.pools["csa"].bytes_per_row == 4 * cfg.head_dim


def test_pools_without_layers_are_absent():
    cfg = tiny()
    cfg.layer_types = ["sliding_attention"] * 3 + [HCA] * 3
    s = CacheSpec.from_model(cfg)
    assert "csa" not in s.pools and "idx" not in s.pools and "csa_state" not in s.pools
    assert s.block_pools == ("swa", "hca", "hca_state")


def test_live_ranges():
    s = CacheSpec.from_model(tiny())  # window 16, csa 4, hca 16
    assert s.live_range("swa", 40) == (24, 40)
    assert s.live_range("swa", 5) == (0, 5)
    assert s.live_range("csa_state", 42) == (36, 42)
    assert s.live_range("hca_state", 42) == (32, 42)
    assert s.live_range("hca_state", 64) == (64, 64)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(kv_dtype="int4"), "kv_dtype"),
    (dict(kv_dtype="bf16", index_dtype="fp4"), "index_dtype"),
    (dict(kv_dtype="fp8", index_dtype="bf16"), "index_dtype"),
    (dict(block_size=72), "block_size"),
    (dict(block_size=64, swa_block_size=24), "swa_block_size"),
])
def test_bad_layouts_name_the_field(kwargs, needle):
    with pytest.raises(CacheConfigError, match=needle):
        CacheSpec.from_model(tiny(), **kwargs)


def test_online_hca_state_pool_and_bytes():
    """`hca_state="online"`: one 3·d fp32 row per open HCA group instead of hca_ratio raw 2·d rows."""
    raw = CacheSpec.from_model(flash(), "fp8", index_dtype="fp4")
    on = CacheSpec.from_model(flash(), "fp8", index_dtype="fp4", hca_state="online")
    p = on.pools["hca_state"]
    assert (p.tokens_per_block, p.rows_per_block, p.row_elems, p.dtype) == (128, 1, 3 * 512, "float32")
    n_hca = len(flash().layers_of(HCA))
    assert raw.state_bytes() - on.state_bytes() == n_hca * (128 * 2 * 512 * 4 - 3 * 512 * 4)
    assert on.slope_bytes_per_token() == raw.slope_bytes_per_token()  # compressed history is unchanged
    assert on.pools["csa_state"] == raw.pools["csa_state"]
    with pytest.raises(CacheConfigError, match="hca_state must be one of"):
        CacheSpec.from_model(flash(), hca_state="ring")


def test_manager_runs_the_online_hca_state_pool():
    """The allocator needs no special case: a block covers one HCA group, the open group stays live."""
    from dsv4.runtime.cache.manager import CacheManager

    spec = CacheSpec.from_model(tiny(), "bf16", hca_state="online")
    m = CacheManager(spec, {p: 64 for p in spec.block_pools}, policy="checkpoint", checkpoint_every=1)
    toks = list(range(3, 3 + 150))
    assert m.start("a", toks).cached_tokens == 0
    assert m.allocate("a", 37)
    m.commit("a", toks, 37)
    assert [b >= 0 for b in m.block_tables("a")["hca_state"]] == [False, False, True]  # group 2 of 16 is open
    assert m.allocate("a", 150)
    m.commit("a", toks, 150)
    m.free("a")
    m.check_invariants()
    hit = m.start("b", toks)  # continues at a block boundary: no HCA state needed there
    assert hit.cached_tokens == 128 and hit.recompute_from == 128
    assert m.allocate("b", 150)
    m.check_invariants()
