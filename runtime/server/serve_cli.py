"""`dsv4 serve`: the OpenAI-compatible server (one replica).

    dsv4 serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--batching-delay-ms N] [--max-num-batched-tokens N]
               [--max-num-seqs N] [--cache-policy full|checkpoint|recompute] [--kv-dtype auto|fp32|bf16|fp8]
               [--cache-budget-gib G | --num-blocks N] [--max-queue N] [--api-key-file F] [--config FILE] ...

Settings: built-in defaults < --config FILE (YAML/JSON, same keys) < flags. The flags and their help are generated
from `ServeConfig`'s fields (`cli_flags`). The API key comes from --api-key-file or the DSV4_API_KEY environment
variable. SIGTERM: /ready turns 503 at once, new requests get 503, running ones finish (up to --grace-period-s),
then the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from dsv4.runtime.server.config import CLI_FLAG, FILE_ONLY, ServeConfig


@dataclass(frozen=True)
class CliFlag:
    """One `dsv4 serve` flag: its name and `argparse.add_argument` keywords; `dest` is the ServeConfig key."""

    flag: str
    dest: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _plain_type(annotation: Any) -> Any:
    """`int | None` -> int; `Literal[...] | None` -> the Literal."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def _default_text(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**20 and value % 2**20 == 0:
        return f"{value // 2**20} MiB"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def cli_flags() -> list[CliFlag]:
    """Every ServeConfig field as a flag (fields marked file-only excepted), help = its description plus its
    default when that is not None. Every flag defaults to None ("not given"), so config-file values survive."""
    flags: list[CliFlag] = []
    for name, info in ServeConfig.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(FILE_ONLY):
            continue
        flag = str(extra.get(CLI_FLAG) or "--" + name.replace("_", "-"))
        help_text = str(info.description)
        kind = _plain_type(info.annotation)
        kw: dict[str, Any] = {"dest": name, "default": None}
        if kind is bool:  # an on/off setting: the flag sets the opposite of its default
            kw.update(action="store_const", const=not info.default)
            help_text = f"{'turn off' if info.default else 'turn on'}: {help_text}"
        else:
            if typing.get_origin(kind) is typing.Literal:
                kw["choices"] = typing.get_args(kind)
            elif kind in (int, float):
                kw["type"] = kind
            if info.default is not None:
                help_text += f" (default {_default_text(info.default)})"
        flags.append(CliFlag(flag, name, {**kw, "help": help_text.replace("%", "%%")}))  # argparse formats help
    return flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in cli_flags():
        parser.add_argument(f.flag, **f.kwargs)


def run(args: argparse.Namespace) -> int:
    import logging

    from dsv4.runtime.server.config import ServeConfigError, load_file, read_api_key

    cli = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "config")}
    try:
        file_values = load_file(args.config) if args.config else {}
        cfg = ServeConfig.build(file_values, cli)
        cfg.config = args.config
        api_key = read_api_key(cfg)
    except ServeConfigError as e:
        print(f"dsv4 serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dsv4.runtime.cache.spec import CacheConfigError
    from dsv4.runtime.checkpoint.errors import CheckpointError
    from dsv4.runtime.server.serve import serve

    try:
        return serve(cfg, api_key)
    except ServeConfigError as e:
        print(f"dsv4 serve: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, CacheConfigError) as e:  # unreadable checkpoint, cache budget too small
        print(f"dsv4 serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
