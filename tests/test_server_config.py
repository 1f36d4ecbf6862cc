"""`dsv4 serve` settings (defaults < config file < flags; the flags and the operator's CONFIG_KEYS generated from
them), the API key sources, and docs/metrics.md staying equal to the metrics catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dsv4.runtime.server.config import ServeConfig, ServeConfigError, load_file, read_api_key
from dsv4.runtime.server.metrics import ADDED_FAMILIES, RENAMED_FROM_COLON, metrics_doc
from dsv4.runtime.server.serve_cli import cli_flags

from dsv4 import metrics_catalog as catalog
from dsv4.settings_enums import CACHE_POLICIES, HCA_STATES, PROFILE_NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_file_cli(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("batching-delay-ms: 7\nmax_num_seqs: 3\nprofile: batch\npool_split: {csa: 0.5}\n")
    cfg = ServeConfig.build(load_file(f), {"max_num_seqs": 9, "port": None})
    assert cfg.batching_delay_ms == 7  # file beats defaults
    assert cfg.max_num_seqs == 9  # CLI beats file
    assert cfg.port == 8000 and cfg.pool_split == {"csa": 0.5}
    j = tmp_path / "serve.json"
    j.write_text(json.dumps({"cache_policy": "recompute"}))
    assert ServeConfig.build(load_file(j), {}).cache_policy == "recompute"


def test_profile_is_a_label_not_a_settings_table():
    """"Profile" is the operator's workload: naming one changes no setting (the planner writes the numbers)."""
    defaults = ServeConfig.build({}, {}).to_dict()
    for name in PROFILE_NAMES:
        assert {k: v for k, v in ServeConfig.build({"profile": name}, {}).to_dict().items() if k != "profile"} == {
            k: v for k, v in defaults.items() if k != "profile"}


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
    ({"port": "http"}, "port"),
    ({"tp": 2.5}, "tp"),
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
    # the changelog's renamed families are the catalog's dsv4_ runtime families (issue 21)
    renamed = {f"dsv4_{old}" for old in RENAMED_FROM_COLON}
    added = {n for names in ADDED_FAMILIES.values() for n in names}
    assert not renamed & added
    assert renamed | added == {m.name for m in catalog.RUNTIME_METRICS if m.name.startswith("dsv4_")}
    assert "## Changelog" in doc and all(f"`dsv4:{old}` → `dsv4_{old}`" in doc for old in RENAMED_FROM_COLON)


def test_cache_choices_are_the_shared_enums():
    """The cache's policy registry and HCA states are the settings' choices (one list each, in dsv4.settings_enums)."""
    from dsv4.runtime.cache.policies import POLICIES
    from dsv4.runtime.cache.spec import HCA_STATES as SPEC_STATES

    assert HCA_STATES == SPEC_STATES
    assert POLICIES == CACHE_POLICIES


def test_cli_flags_are_generated_from_serve_config():
    """Every setting but the file-only pool_split is a flag whose help is the field's description (with the field's
    default, never a second copy of it), and parsing a flag sets that very key."""
    from dsv4.cli import build_parser

    flags = {f.dest: f for f in cli_flags()}
    assert set(flags) == set(ServeConfig.model_fields) - {"pool_split"}
    for key, f in flags.items():
        info = ServeConfig.model_fields[key]
        help_text = f.kwargs["help"].replace("%%", "%")  # argparse's escaping
        assert str(info.description) in help_text
        if info.default is not None and info.annotation is not bool:
            assert help_text.endswith(")") and "(default " in help_text, key
    assert flags["port"].kwargs["help"].endswith("(default 8000)") and flags["port"].kwargs["type"] is int
    assert flags["cache_policy"].kwargs["choices"] == CACHE_POLICIES
    assert flags["profile"].kwargs["choices"] == PROFILE_NAMES
    parser = build_parser("serve")
    args = parser.parse_args(["serve", "--max-num-seqs", "5", "--no-prefix-caching", "--hca-state", "online"])
    cli = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "config")}
    cfg = ServeConfig.build({}, cli)
    assert (cfg.max_num_seqs, cfg.enable_prefix_caching, cfg.hca_state) == (5, False, "online")
    assert set(cli) <= set(ServeConfig.keys()) | {"config"}


def test_operator_config_keys_are_the_serve_settings():
    from dsv4.operator.manifests import CONFIG_KEYS

    assert CONFIG_KEYS == {k: ServeConfig.model_fields[k].description for k in ServeConfig.keys()}
    assert "config" not in CONFIG_KEYS and all(CONFIG_KEYS.values())


def test_serving_doc_lists_every_setting():
    table = (ROOT / "docs" / "serving.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    for key in ServeConfig.keys():
        assert f"`{key}`" in table, f"docs/serving.md's settings table misses {key}"


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
