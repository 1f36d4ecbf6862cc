"""`ServeConfig`: every setting of `dsv4 serve`, from built-in defaults < config file < CLI flags.

This model is the one place a serve setting is declared: its field description is the `dsv4 serve --help` text
(`serve_cli.py` generates the flags from the fields) and the operator's documentation of its ConfigMap keys
(`operator/manifests.py` CONFIG_KEYS). The config file (YAML or JSON; the operator mounts one from a ConfigMap)
uses the same keys as the long CLI flags, with `-` or `_` (`batching-delay-ms` or `batching_delay_ms`). Unknown
keys are errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsv4.paths import cache_root
from dsv4.settings_enums import CachePolicy, HcaState, ProfileName, WeightsDtype

KvDtypeSetting = Literal["auto", "fp32", "bf16", "fp8"]
MAX_TP = 64
# Field metadata read by serve_cli: the flag's name when it is not `--<key-with-dashes>`, and whether the
# setting is settable only from the config file.
CLI_FLAG = "cli_flag"
FILE_ONLY = "file_only"


class ServeConfigError(ValueError):
    """A bad setting; the message names the key and the allowed values."""


def default_model_dir() -> Path:
    return cache_root() / "models" / "tiny"


class ServeConfig(BaseModel):
    """Settings of one `dsv4 serve` replica. A description states the default itself only when the default is
    None (it says what None means); the CLI help appends other defaults from the field."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="checkpoint folder (config.json, tokenizer, safetensors; default: "
                                                "the built-in tiny model, created on first use)")
    served_model_name: str | None = Field(None, description="model id in /v1/models and responses (default: the "
                                                            "folder name)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, description="listen port")
    profile: ProfileName | None = Field(
        None, description="workload profile the replica was planned for (a label: the scheduler and cache "
                          "settings are the other keys, which the operator's planner writes)")
    tp: int = Field(1, description="tensor parallel size: ranks (processes, devices) of this replica; with dp > 1 "
                                   "the TP group inside each data-parallel rank (dp x tp processes)")
    tp_timeout_s: float = Field(60.0, description="timeout of every TP collective; a dead or hung rank ends the "
                                                  "server within it")
    dp: int = Field(1, description="data-parallel attention ranks of this replica (processes, devices): each owns "
                                   "its requests and a full per-device KV cache; needs ep")
    ep: bool = Field(False, description="expert parallelism over the dp (x tp) ranks: each holds 1/(dp x tp) of the "
                                        "routed experts and tokens are exchanged for the MoE layers")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (with tp or dp > 1: cuda, rank k on "
                                            "cuda:k)")
    batching_delay_ms: float = Field(0.0, description="how long the scheduler may hold new prefill work to batch it")
    max_num_batched_tokens: int = Field(2048, description="token budget of one scheduler step")
    chunked_prefill_size: int | None = Field(None, description="largest prefill chunk of one request per step "
                                                               "(default: the step budget)")
    max_num_seqs: int = Field(64, description="most sequences running at once")
    max_model_len: int | None = Field(None, description="longest prompt + output; longer requests get HTTP 400 "
                                                        "(default: what the model and cache allow)")
    max_queue: int = Field(256, description="waiting requests before HTTP 429")
    cache_policy: CachePolicy = Field("full", description="sliding-window cache policy for prefix reuse")
    checkpoint_every: int = Field(4, description="checkpoint policy: keep window state every N blocks")
    enable_prefix_caching: bool = Field(True, description="prefix reuse through the cache manager",
                                        json_schema_extra={CLI_FLAG: "--no-prefix-caching"})
    kv_dtype: KvDtypeSetting = Field("auto", description="KV row storage; auto = fp32 on CPU for fp32 weights, "
                                                         "else bf16")
    weights_dtype: WeightsDtype = Field("bf16", description="weights in memory: bf16 dequantises FP8/FP4 "
                                                            "checkpoints at load; checkpoint keeps them as stored "
                                                            "(FP8 + block scales, packed FP4 experts), dequantised "
                                                            "per layer on the fly")
    compile: Literal["auto", "on", "off"] = Field(
        "off", description="torch.compile the decode step (inductor C++ on CPU, Triton + CUDA graphs on GPU; "
                           "with --tp/--dp the mHC functions only): on, off, or auto (compile, keep it only if the "
                           "warm-up measured a gain); tens of seconds per start, cached under ~/.cache/dsv4/inductor")
    hca_state: HcaState = Field("raw", description="HCA compressor tail state: raw (up to ratio-1 rows per layer) "
                                                   "or online (one online-softmax slot per open group: ~100x fewer "
                                                   "state bytes)")
    cache_budget_gib: float | None = Field(None, description="bytes for all cache pools, GiB (default: 64 MiB on "
                                                             "CPU, 85 % of free GPU memory)")
    num_blocks: int | None = Field(None, description="blocks per pool (instead of a budget)")
    expected_context: int | None = Field(None, description="context length the pool split is sized for "
                                                           "(default: min(model, 8192))")
    pool_split: dict[str, float] | None = Field(
        None, description="fraction of the cache budget per block pool (swa, csa, hca, csa_state, hca_state; "
                          "default: in proportion to what one expected-context sequence needs)",
        json_schema_extra={FILE_ONLY: True})
    api_key_file: str | None = Field(None, description="file holding the bearer API key (default: env "
                                                       "DSV4_API_KEY; neither = no auth)")
    grace_period_s: float = Field(30.0, description="drain time on SIGTERM before in-flight requests are cut")
    default_max_tokens: int | None = Field(None, description="chat max_tokens when a request gives none (default: "
                                                             "up to max_model_len)")
    max_body_bytes: int = Field(16 * 2**20, description="largest /v1 request body in bytes; larger gets HTTP 413")
    chat_template: str | None = Field(
        None, description="jinja chat template file (or text) replacing the checkpoint's chat format (default: "
                          "DeepSeek-V4's encoding for V4 models, else the checkpoint's bundled template)")
    host_memory_fraction: float = Field(0.5, description="CPU only: cap of the cache budget as a share of "
                                                         "available host RAM")
    log_level: str = Field("info", description="debug, info, warning or error")
    config: str | None = Field(None, description="YAML or JSON file with the same keys (flags win)",
                               json_schema_extra={CLI_FLAG: "--config"})

    # ---- building ----------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """The settings (config-file keys); `config`, the file itself, is not one."""
        return [name for name in cls.model_fields if name != "config"]

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        """key -> what it means (the field descriptions), for every setting."""
        return {name: str(cls.model_fields[name].description) for name in cls.keys()}

    @classmethod
    def build(cls, file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None,
              ) -> ServeConfig:
        """defaults < file < CLI (CLI values of None mean "not given")."""
        merged = normalise_keys(file_values or {}, source="config file")
        merged.update({k: v for k, v in normalise_keys(cli_values or {}, source="command line").items()
                       if v is not None})
        return cls.checked(**merged)

    @classmethod
    def checked(cls, **values: Any) -> ServeConfig:
        """The config of these values, types and ranges checked; ServeConfigError names the first bad key."""
        try:
            cfg = cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "settings"
            raise ServeConfigError(f"{key}: {err['msg']}, got {err.get('input')!r}") from None
        cfg.validate_ranges()
        return cfg

    def validate_ranges(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ServeConfigError(msg)

        need(1 <= self.port <= 65535, f"port must be in [1, 65535], got {self.port}")
        need(1 <= self.tp <= MAX_TP, f"tp (tensor parallel size) must be an integer in [1, {MAX_TP}], got {self.tp!r}")
        need(1 <= self.dp <= MAX_TP, f"dp (data-parallel attention ranks) must be an integer in [1, {MAX_TP}], "
                                     f"got {self.dp!r}")
        need(self.tp_timeout_s > 0, f"tp_timeout_s must be > 0, got {self.tp_timeout_s}")
        need(self.tp * self.dp <= MAX_TP, f"dp {self.dp} x tp {self.tp} = {self.tp * self.dp} ranks: at most {MAX_TP}")
        need(self.dp == 1 or self.ep, f"dp {self.dp} needs ep (expert parallelism): without it every rank would hold "
                                      f"every expert; run {self.dp} replicas instead")
        need(not self.ep or self.dp > 1, "ep splits the experts over the dp ranks: set dp > 1 (with tp the experts "
                                         "are already split over the tp ranks)")
        for name, n in (("tp", self.tp), ("dp", self.dp)):
            need(n == 1 or not self.device.startswith("cuda:"),
                 f"device {self.device!r} pins one GPU; with {name} {n} use device cuda (rank k runs on cuda:k)")
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
        return self.model_dump()


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

