"""`dsv4 serve` settings (defaults < profile < config file < flags), the API key sources, and docs/metrics.md
staying equal to the metrics catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dsv4.runtime import metrics_catalog as catalog
from dsv4.runtime.server.config import PROFILES, ServeConfig, ServeConfigError, load_file, read_api_key
from dsv4.runtime.server.metrics import metrics_doc

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_profile_file_cli(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("batching-delay-ms: 7\nmax_num_seqs: 3\nprofile: batch\npool_split: {csa: 0.5}\n")
    cfg = ServeConfig.build(load_file(f), {"max_num_seqs": 9, "port": None})
    assert cfg.batching_delay_ms == 7  # file beats profile
    assert cfg.max_num_seqs == 9  # CLI beats file
    assert cfg.cache_policy == PROFILES["batch"]["cache_policy"]  # profile beats defaults
    assert cfg.port == 8000 and cfg.pool_split == {"csa": 0.5}
    j = tmp_path / "serve.json"
    j.write_text(json.dumps({"cache_policy": "recompute"}))
    assert ServeConfig.build(load_file(j), {}).cache_policy == "recompute"


@pytest.mark.parametrize("values, needle", [
    ({"batching_delay_ms": -1}, "batching_delay_ms"),
    ({"cache_policy": "lru"}, "cache_policy"),
    ({"profile": "fast"}, "profile"),
    ({"tp": 0}, "tp"),
    ({"tp": 2, "device": "cuda:1"}, "pins one GPU"),
    ({"tp_timeout_s": 0}, "tp_timeout_s"),
    ({"kv_dtype": "int4"}, "kv_dtype"),
    ({"hca_state": "lossy"}, "hca_state"),
    ({"num_blocks": 10, "cache_budget_gib": 1.0}, "not both"),
    ({"max_queue": 0}, "max_queue"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_settings_name_the_key(values, needle):
    with pytest.raises(ServeConfigError, match=needle):
        ServeConfig.build(values, {})


def test_api_key_from_file_or_env(tmp_path, monkeypatch):
    monkeypatch.delenv("DSV4_API_KEY", raising=False)
    assert read_api_key(ServeConfig()) is None
    monkeypatch.setenv("DSV4_API_KEY", "env-key")
    assert read_api_key(ServeConfig()) == "env-key"
    k = tmp_path / "key"
    k.write_text("file-key\n")
    assert read_api_key(ServeConfig(api_key_file=str(k))) == "file-key"
    with pytest.raises(ServeConfigError, match="does not exist"):
        read_api_key(ServeConfig(api_key_file=str(tmp_path / "missing")))


def test_cli_rejects_bad_config_file_fast(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_num_seqs: 4\nwrong_key: 1\n")
    r = subprocess.run([sys.executable, "-m", "dsv4.cli", "serve", "--config", str(f)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "wrong_key" in r.stderr
    h = subprocess.run([sys.executable, "-m", "dsv4.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert h.returncode == 0 and "--batching-delay-ms" in h.stdout and "--cache-policy" in h.stdout


def test_metrics_doc_matches_catalog():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    assert doc == metrics_doc(), "regenerate: python -m dsv4.runtime.server.metrics > docs/metrics.md"
    for m in catalog.RUNTIME_METRICS:
        assert f"`{m.name}`" in doc


def test_hca_state_choices_are_the_cache_specs():
    from dsv4.runtime.cache.spec import HCA_STATES as SPEC_STATES
    from dsv4.runtime.server.config import HCA_STATES

    assert HCA_STATES == SPEC_STATES


def test_chat_template_flag_overrides_the_chat_format(tmp_path):
    from dsv4.runtime.server.build import build_engine

    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                   "{% if add_generation_prompt %}[assistant]{% endif %}")
    built = build_engine(ServeConfig(chat_template=str(tpl), device="cpu"), say=lambda *_: None)
    try:
        tok = built.tokenizer
        assert tok.decode(tok.encode_chat([{"role": "user", "content": "hi"}])) == "[user]hi[assistant]"
    finally:
        built.engine.shutdown()
    with pytest.raises(ServeConfigError, match="chat_template"):
        build_engine(ServeConfig(chat_template=str(tmp_path / "missing.jinja"), device="cpu"), say=lambda *_: None)
