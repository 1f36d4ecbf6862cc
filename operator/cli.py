"""`dsv4 operator`: run the DSV4Endpoint operator (kopf) against the current kubeconfig or in-cluster."""

from __future__ import annotations

import argparse
import logging
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch DSV4Endpoints in every namespace")
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; glob patterns allowed)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", metavar="URL",
                        help="kopf liveness endpoint ('' to disable)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="operator Prometheus metrics port (default 8080, env DSV4_OPERATOR_METRICS_PORT; 0 = off)")
    parser.add_argument("--peering", action="store_true",
                        help="use kopf peering instead of standalone mode (needs the KopfPeering CRDs)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    if not args.all_namespaces and not args.namespace:
        print("dsv4 operator: choose -A/--all-namespaces or -n/--namespace NS")
        return 2
    if args.metrics_port is not None:
        os.environ["DSV4_OPERATOR_METRICS_PORT"] = str(args.metrics_port)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import dsv4.operator.handlers  # noqa: F401  (registers the handlers)
    import kopf  # heavy: only when the operator really runs

    kopf.run(clusterwide=args.all_namespaces, namespaces=args.namespace, standalone=not args.peering,
             liveness_endpoint=args.liveness or None)
    return 0
