"""`dsv4 serve`: the OpenAI-compatible server (one replica).

    dsv4 serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--profile short-chat|coding-agent|
               long-context-agent|batch] [--batching-delay-ms N] [--max-num-batched-tokens N] [--max-num-seqs N]
               [--cache-policy full|checkpoint|recompute] [--kv-dtype auto|fp32|bf16|fp8]
               [--cache-budget-gib G | --num-blocks N] [--max-queue N] [--api-key-file F] [--config FILE] ...

Settings: built-in defaults < --profile < --config FILE (YAML/JSON, same keys) < flags. The API key comes from
--api-key-file or the DSV4_API_KEY environment variable. SIGTERM: /ready turns 503 at once, new requests get
503, running ones finish (up to --grace-period-s), then the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import sys

_FLAGS: list[tuple[str, dict]] = [
    ("--model", {"help": "checkpoint folder (default: the built-in tiny model, created on first use)"}),
    ("--served-model-name", {"help": "model id in /v1/models (default: the folder name)"}),
    ("--host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", {"type": int, "help": "port (default 8000)"}),
    ("--profile", {"help": "workload preset: short-chat, coding-agent, long-context-agent, batch"}),
    ("--tp", {"type": int, "help": "tensor parallel size: ranks (processes, devices) of this replica (default 1)"}),
    ("--tp-timeout-s", {"type": float, "help": "timeout of every TP collective; a dead or hung rank ends the "
                                               "server within it (default 60)"}),
    ("--device", {"help": "auto (default), cpu, cuda, cuda:N"}),
    ("--batching-delay-ms", {"type": float, "help": "how long the scheduler may hold new prefill work to batch it"}),
    ("--max-num-batched-tokens", {"type": int, "help": "token budget of one step (default 2048)"}),
    ("--chunked-prefill-size", {"type": int, "help": "largest prefill chunk of one request per step"}),
    ("--max-num-seqs", {"type": int, "help": "most sequences running at once (default 64)"}),
    ("--max-model-len", {"type": int, "help": "longest prompt + output (default: what model and cache allow)"}),
    ("--max-queue", {"type": int, "help": "waiting requests before HTTP 429 (default 256)"}),
    ("--cache-policy", {"help": "sliding-window cache policy: full, checkpoint, recompute"}),
    ("--checkpoint-every", {"type": int, "help": "checkpoint policy: keep window state every N blocks"}),
    ("--kv-dtype", {"help": "auto (default: fp32 on CPU for fp32 weights, else bf16), fp32, bf16, fp8"}),
    ("--hca-state", {"help": "HCA compressor tail state: raw (default; up to ratio-1 rows per layer) or online "
                             "(one online-softmax slot per open group: ~100x fewer state bytes)"}),
    ("--cache-budget-gib", {"type": float, "help": "bytes for all cache pools, GiB"}),
    ("--num-blocks", {"type": int, "help": "blocks per pool (instead of a budget)"}),
    ("--expected-context", {"type": int, "help": "context length the pool split is sized for"}),
    ("--api-key-file", {"help": "file holding the bearer API key (else env DSV4_API_KEY; none = no auth)"}),
    ("--grace-period-s", {"type": float, "help": "drain time on SIGTERM (default 30)"}),
    ("--default-max-tokens", {"type": int, "help": "chat max_tokens when a request gives none"}),
    ("--chat-template", {"help": "jinja chat template file (or text) instead of the checkpoint's chat format "
                                 "(default: DeepSeek-V4's encoding for V4 models, else the bundled template)"}),
    ("--max-body-bytes", {"type": int, "help": "largest /v1 request body in bytes; larger gets 413 (default 16 MiB)"}),
    ("--host-memory-fraction", {"type": float,
                                "help": "CPU only: cap of the cache budget as a share of available RAM (0.5)"}),
    ("--log-level", {"help": "debug, info (default), warning"}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, kw in _FLAGS:
        parser.add_argument(flag, default=None, **kw)
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False,
                        default=None, help="disable prefix caching")
    parser.add_argument("--config", default=None, help="YAML or JSON file with the same keys (flags win)")


def run(args: argparse.Namespace) -> int:
    import logging

    from dsv4.runtime.server.config import ServeConfig, ServeConfigError, load_file, read_api_key

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
