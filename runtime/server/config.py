"""`ServeConfig`: every setting of `dsv4 serve`, from built-in defaults < profile < config file < CLI flags.

The config file (YAML or JSON; the operator mounts one from a ConfigMap) uses the same keys as the long
CLI flags, with `-` or `_` (`batching-delay-ms` or `batching_delay_ms`). Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_POLICIES = ("full", "checkpoint", "recompute")
KV_DTYPES = ("auto", "fp32", "bf16", "fp8")
HCA_STATES = ("raw", "online")  # = dsv4.runtime.cache.spec.HCA_STATES (tests/test_server_config.py)
MAX_TP = 64

# Named workload profiles (the operator's PROFILE_NAMES): defaults they change.
PROFILES: dict[str, dict[str, Any]] = {
    "short-chat": {"batching_delay_ms": 0.0, "max_num_batched_tokens": 2048, "max_num_seqs": 64,
                   "cache_policy": "full"},
    "coding-agent": {"batching_delay_ms": 5.0, "max_num_batched_tokens": 4096, "max_num_seqs": 32,
                     "cache_policy": "recompute"},
    "long-context-agent": {"batching_delay_ms": 20.0, "max_num_batched_tokens": 8192, "max_num_seqs": 16,
                           "cache_policy": "checkpoint"},
    "batch": {"batching_delay_ms": 50.0, "max_num_batched_tokens": 8192, "max_num_seqs": 128,
              "cache_policy": "recompute"},
}


class ServeConfigError(ValueError):
    """A bad setting; the message names the key and the allowed values."""


def default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsv4" / "models" / "tiny"


@dataclass
class ServeConfig:
    model: str | None = None  # checkpoint folder; None = the built-in tiny model
    served_model_name: str | None = None  # name in /v1/models (default: the folder name)
    host: str = "127.0.0.1"
    port: int = 8000
    profile: str | None = None
    tp: int = 1  # tensor-parallel ranks (one process and one device each); see docs/parallel.md
    tp_timeout_s: float = 60.0  # every TP collective fails after this long (a dead or hung rank ends the server)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batching_delay_ms: float = 0.0
    max_num_batched_tokens: int = 2048
    chunked_prefill_size: int | None = None
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: min(model's max positions, what the cache can hold)
    max_queue: int = 256
    cache_policy: str = "full"
    checkpoint_every: int = 4
    enable_prefix_caching: bool = True
    kv_dtype: str = "auto"
    hca_state: str = "raw"  # HCA compressor tail: raw rows, or one online-softmax slot per open group
    cache_budget_gib: float | None = None
    num_blocks: int | None = None  # blocks per pool (overrides the budget)
    expected_context: int | None = None  # context length the pool split is sized for (budget mode)
    pool_split: dict[str, float] | None = None
    api_key_file: str | None = None
    grace_period_s: float = 30.0
    default_max_tokens: int | None = None  # chat default when max_tokens is absent (None: up to max_model_len)
    max_body_bytes: int = 16 * 2**20  # largest /v1 request body (HTTP 413 above it)
    chat_template: str | None = None  # jinja chat template file overriding the checkpoint's chat format
    host_memory_fraction: float = 0.5  # CPU: the cache may use at most this share of available host RAM
    log_level: str = "info"
    config: str | None = None  # the file these values were read from

    # ---- building ----------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "config"]

    @classmethod
    def build(cls, file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None,
              ) -> ServeConfig:
        """defaults < profile < file < CLI (CLI values of None mean "not given")."""
        file_values = normalise_keys(file_values or {}, source="config file")
        cli_values = {k: v for k, v in normalise_keys(cli_values or {}, source="command line").items()
                      if v is not None}
        profile = cli_values.get("profile", file_values.get("profile"))
        merged: dict[str, Any] = {}
        if profile is not None:
            if profile not in PROFILES:
                raise ServeConfigError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
            merged.update(PROFILES[profile])
        merged.update(file_values)
        merged.update(cli_values)
        cfg = cls(**merged)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ServeConfigError(msg)

        need(1 <= self.port <= 65535, f"port must be in [1, 65535], got {self.port}")
        need(isinstance(self.tp, int) and 1 <= self.tp <= MAX_TP,
             f"tp (tensor parallel size) must be an integer in [1, {MAX_TP}], got {self.tp!r}")
        need(self.tp_timeout_s > 0, f"tp_timeout_s must be > 0, got {self.tp_timeout_s}")
        need(self.tp == 1 or not self.device.startswith("cuda:"),
             f"device {self.device!r} pins one GPU; with tp {self.tp} use device cuda (rank k runs on cuda:k)")
        need(self.batching_delay_ms >= 0, f"batching_delay_ms must be >= 0, got {self.batching_delay_ms}")
        need(self.batching_delay_ms <= 10_000, f"batching_delay_ms must be <= 10000, got {self.batching_delay_ms}")
        need(self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        need(self.chunked_prefill_size is None or self.chunked_prefill_size >= 1,
             f"chunked_prefill_size must be >= 1, got {self.chunked_prefill_size}")
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        need(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        need(self.max_model_len is None or self.max_model_len >= 2,
             f"max_model_len must be >= 2, got {self.max_model_len}")
        need(self.cache_policy in CACHE_POLICIES,
             f"cache_policy must be one of {list(CACHE_POLICIES)}, got {self.cache_policy!r}")
        need(self.kv_dtype in KV_DTYPES, f"kv_dtype must be one of {list(KV_DTYPES)}, got {self.kv_dtype!r}")
        need(self.hca_state in HCA_STATES,
             f"hca_state must be one of {list(HCA_STATES)}, got {self.hca_state!r}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.cache_budget_gib is None or self.cache_budget_gib > 0,
             f"cache_budget_gib must be > 0, got {self.cache_budget_gib}")
        need(self.num_blocks is None or self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}")
        need(not (self.num_blocks is not None and self.cache_budget_gib is not None),
             "give cache_budget_gib or num_blocks, not both")
        need(self.grace_period_s >= 0, f"grace_period_s must be >= 0, got {self.grace_period_s}")
        need(self.default_max_tokens is None or self.default_max_tokens >= 1,
             f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        need(self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        need(0 < self.host_memory_fraction <= 0.95,
             f"host_memory_fraction must be in (0, 0.95], got {self.host_memory_fraction}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def model_dir(self) -> Path:
        return Path(self.model) if self.model else default_model_dir()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalise_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`batching-delay-ms` -> `batching_delay_ms`; unknown keys raise ServeConfigError naming them."""
    known = set(ServeConfig.keys())
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise ServeConfigError(f"{source}: unknown setting {k!r}; known settings: {', '.join(sorted(known))}")
        out[key] = v
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (keys not yet checked)."""
    p = Path(path)
    if not p.exists():
        raise ServeConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ServeConfigError(f"config file {p}: cannot parse ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ServeConfigError(f"config file {p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def read_api_key(cfg: ServeConfig) -> str | None:
    """The bearer key: the file named by api_key_file (stripped), else env DSV4_API_KEY, else None (no auth)."""
    if cfg.api_key_file:
        p = Path(cfg.api_key_file)
        if not p.exists():
            raise ServeConfigError(f"api_key_file {p} does not exist")
        key = p.read_text().strip()
        if not key:
            raise ServeConfigError(f"api_key_file {p} is empty")
        return key
    return os.environ.get("DSV4_API_KEY") or None

