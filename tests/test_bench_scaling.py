"""`dsv4 bench scaling --smoke`: our engine and transformers' reference on one random checkpoint, in one run."""

from __future__ import annotations

import json

import pytest
from dsv4.bench import scaling
from dsv4.bench.scaling_profile import PARTS

from dsv4.cli import main


def test_scaling_smoke_cli(tmp_path, capsys):
    assert main(["bench", "scaling", "--smoke", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "scaling_smoke.json").read_text())
    assert out["contexts"] == [256, 512] and out["batches"] == [1, 2]
    # both implementations computed the same model
    assert out["parity"]["same_argmax"] and out["parity"]["max_abs_logit_diff"] < 1e-3
    rows = {(r["impl"], r["context"]): r for r in out["rows"]}
    assert set(rows) == {(i, c) for i in ("ours", "reference") for c in (256, 512)}
    for (impl, ctx), r in rows.items():
        assert r["note"] == "", (impl, ctx)
        assert r["prefill_s_per_token"] == pytest.approx(r["prefill_s"] / ctx)
        for b in ("1", "2"):
            assert r["decode_tok_s"][b] > 0
            assert r["decode_tok_s"][b] == pytest.approx(int(b) / r["decode_step_s"][b], rel=1e-6)
    for impl in ("ours", "reference"):
        assert rows[(impl, 512)]["prefill_s"] > rows[(impl, 256)]["prefill_s"]  # a longer prompt costs more
    # the targets are ratios of the rows above, recomputed here
    t = out["targets"]
    ratio = rows[("ours", 256)]["decode_tok_s"]["1"] / rows[("reference", 256)]["decode_tok_s"]["1"]
    assert t["decode at 256 vs reference, batch 1 (>= 10x)"]["ratio"] == pytest.approx(ratio)
    ratio = rows[("ours", 512)]["decode_tok_s"]["2"] / rows[("ours", 256)]["decode_tok_s"]["2"]
    assert t["our decode at 512 / at 256, batch 2 (>= 0.5)"]["ratio"] == pytest.approx(ratio)
    md = (tmp_path / "scaling_smoke.md").read_text()
    assert "| ours | 256 |" in md and "| reference | 512 |" in md and "same argmax: True" in md
    assert (tmp_path / "scaling_smoke.png").stat().st_size > 1000
    assert "Targets:" in capsys.readouterr().out


@pytest.mark.parametrize(("kw", "msg"), [
    ({"contexts": (300,)}, "--contexts entries must be multiples of --chunk 128, got 300"),
    ({"batches": (0,)}, "--batches entries must be in [1, 256], got 0"),
    ({"threads": 0}, "--threads must be >= 1, got 0"),
])
def test_bad_arguments_name_the_flag(kw, msg):
    args = {"contexts": (256,), "batches": (1,), "smoke": True, "chunk": 128} | kw
    with pytest.raises(ValueError) as e:
        scaling.run_scaling(**args)
    assert msg in str(e.value)


def test_scaling_profile_smoke_cli(tmp_path, capsys):
    assert main(["bench", "scaling-profile", "--smoke", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "scaling_profile_smoke.json").read_text())
    assert (out["context"], out["chunk"], out["steps"], out["hidden"]) == (256, 128, 2, 64)
    for part in ("prefill", "decode"):
        sh = out[part]["shares"]
        assert all(0 <= v <= 1.0001 for v in sh.values()), sh
        # nested: the attention layer contains the sparse attention, the model forward contains both
        attn = sh[PARTS[0][0]]
        assert 0 < attn <= sh["attention layer (all of it)"] <= sh["model forward"]
    assert out["prefill"]["ms_per_token"] == pytest.approx(1e3 * out["prefill"]["seconds"] / 256)
    assert out["decode"]["aten_ops_per_step"] > 100  # six layers of small operators
    assert "aten::" in out["decode"]["most_called_ops"][0][0]
    assert "| model forward |" in (tmp_path / "scaling_profile_smoke.md").read_text()
    assert "Decode at batch 1" in capsys.readouterr().out


def test_scaling_profile_rejects_a_context_off_the_chunk_grid():
    from dsv4.bench.scaling_profile import run_profile

    with pytest.raises(ValueError, match="--context must be a positive multiple of --chunk 128, got 200"):
        run_profile(200, 128, 2, smoke=True)
