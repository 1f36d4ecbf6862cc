"""`dsv4 bench structured --smoke`: the sampler's per-step cost with and without grammar-constrained rows."""

from __future__ import annotations

import json

import pytest
from dsv4.bench import structured

from dsv4.cli import main


def test_structured_smoke_cli(tmp_path, capsys):
    assert main(["bench", "structured", "--smoke", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "structured_smoke.json").read_text())
    assert out["library"] == "xgrammar" and [r["batch"] for r in out["results"]] == [1, 8]
    for r in out["results"]:
        assert r["steps"] == 5 and r["unconstrained_s"] > 0 and r["constrained_s"] > 0
        assert r["constrained_cost_s"] == pytest.approx(r["constrained_s"] - r["unconstrained_s"])
    md = (tmp_path / "structured_smoke.md").read_text()
    assert "| 1 |" in md and "| 8 |" in md
    assert (tmp_path / "structured_smoke.png").stat().st_size > 1000
    assert "cost of constrained rows" in capsys.readouterr().out


def test_constrained_rows_sample_only_what_the_grammar_allows():
    """The bench's constrained rows really are constrained: every row's tokens keep its JSON valid so far."""
    import torch
    from dsv4.runtime.engine.request import SamplingParams
    from dsv4.runtime.engine.sampling import RowSpec, make_generator, sample
    from dsv4.runtime.server.structured import GrammarCompiler

    tok = structured._tokenizer()
    spec = GrammarCompiler(tok, tok.vocab_size).compile({"type": "json_object"}, thinking=False)
    rows = [RowSpec(SamplingParams(temperature=1.0), make_generator(i), {}, [], None, spec.start()) for i in range(4)]
    texts: list[list[int]] = [[] for _ in rows]
    for _ in range(12):
        tokens, _ = sample(torch.randn(4, tok.vocab_size), rows)
        for ids, t in zip(texts, tokens, strict=True):
            ids.append(t)
    assert all(tok.decode(ids).lstrip()[:1] in "{[" for ids in texts)


@pytest.mark.parametrize(("kw", "msg"), [({"batches": (0,)}, "--batches entries must be in [1, 4096]"),
                                         ({"steps": 0}, "--steps must be >= 1, got 0")])
def test_bad_arguments_name_the_flag(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        structured.run_structured(**({"batches": (1,), "steps": 1, "smoke": True} | kw))
