"""The `dsv4` command line: one subcommand per real capability.

Each subcommand lives beside the code it drives, in a module exposing `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their subcommand is chosen, so `dsv4 --help`
stays fast; those modules must keep heavy imports (torch, kopf) inside their functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dsv4.version import VERSION

# name -> (module, one-line help). Add a line only when the subcommand really works.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("dsv4.runtime.model_cli", "Create and inspect DeepSeek-V4 checkpoints (init-random, info)."),
    "bench": ("dsv4.bench.cli", "Benchmarks: dsv4 bench capacity (KV capacity per SWA policy), ..."),
    "serve": ("dsv4.runtime.server.serve_cli", "Serve a model over an OpenAI-compatible HTTP API with metrics."),
    "observability": ("dsv4.operator.observability.generate", "Generate the Grafana dashboards and alert rules."),
    "cluster": ("dsv4.e2e.cli", "Run a local Kubernetes control plane with kwok GPU nodes (up, down, status, build)."),
    "operator": ("dsv4.operator.cli", "Run the DSV4Endpoint operator (kopf) with -A or -n NAMESPACE."),
    "plan": ("dsv4.operator.plan_cli", "Plan a DSV4Endpoint (-f FILE): TP, batching, cache, replicas, reasons."),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4",
        description="dsv4: serve DeepSeek-V4-class models and operate them on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"dsv4 {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if argv_command == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
