"""`dsv4 cluster up|down|status|build`: the local Kubernetes control plane (docs/local-cluster.md)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="build the binaries if needed and start the cluster (idempotent)")
    up.add_argument("--name", default="default", help="cluster name (state under ~/.cache/dsv4/cluster/NAME)")
    up.add_argument("--nodes", type=int, default=2, help="kwok GPU nodes to create (1..10, default 2)")
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node (default 8)")
    up.add_argument("--no-pod-runner", action="store_true", help="do not back pods with local processes")
    down = sub.add_parser("down", help="stop every recorded process and remove the cluster's state")
    down.add_argument("--name", help="cluster name (default: the only running cluster, else the only recorded one)")
    down.add_argument("--keep-state", action="store_true", help="keep logs, certificates and etcd data")
    st = sub.add_parser("status", help="what runs, where, and whether /readyz answers")
    st.add_argument("--name", help="cluster name (default: the only or most recently started running cluster)")
    st.add_argument("--json", action="store_true")
    b = sub.add_parser("build", help="only build/check the cached binaries")
    b.add_argument("--force", action="store_true")


def down_target(live: list[str], recorded: list[str]) -> str:
    """The cluster `dsv4 cluster down` without --name stops: never a guess between several."""
    for candidates, what in ((live, "running"), (recorded, "recorded")):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ValueError(f"{len(candidates)} clusters are {what} ({', '.join(candidates)}): name one with --name")
    raise ValueError("no cluster is recorded: nothing to stop")


def run(args: argparse.Namespace) -> int:
    from dsv4.e2e import build, cluster

    try:
        if args.action == "build":
            print(build.ensure_built(force=args.force))
            return 0
        if args.action == "up":
            nodes = cluster.default_nodes(args.nodes, args.gpus, name=args.name)
            c = cluster.up(args.name, nodes=nodes, pod_runner=not args.no_pod_runner)
            print(f"cluster {c.name!r} is up: {c.server}")
            print(f"export KUBECONFIG={c.kubeconfig}")
            return 0
        if args.action == "down":
            args.name = args.name or down_target(cluster.live_clusters(), cluster.recorded_clusters())
            stopped = cluster.down(args.name, keep_state=args.keep_state)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
            return 0
        args.name = args.name or cluster.last_cluster() or "default"
        st = cluster.status(args.name)
        if args.json:
            print(json.dumps(st, indent=2))
        elif not st["exists"]:
            print(f"cluster {args.name!r}: not created (dsv4 cluster up --name {args.name})")
        else:
            print(f"cluster {args.name!r}: {'healthy' if st['healthy'] else 'NOT healthy'}  {st['server']}  "
                  f"(readyz {st['readyz']}, kubernetes {st['kubernetes_version']})")
            print(f"  KUBECONFIG={st['kubeconfig']}")
            print(f"  nodes: {', '.join(st['nodes'])}")
            for name, p in st["processes"].items():
                print(f"  {name:<24} pid {p['pid']:<8} {'running' if p['alive'] else 'DEAD':<8} {p['log']}")
        return 0 if st.get("healthy") else 1
    except (build.BuildError, cluster.ClusterError, ValueError) as e:
        print(f"dsv4 cluster {args.action}: {e}", file=sys.stderr)
        return 1
