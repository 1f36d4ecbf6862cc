"""`dsv4 plan -f endpoint.yaml`: validate a DSV4Endpoint and print what the operator would run, with reasons."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="DSV4Endpoint manifest (YAML or JSON; '-' = stdin)")
    parser.add_argument("-o", "--output", choices=("text", "json", "yaml", "manifests"), default="text",
                        help="text (default), the plan as json/yaml, or the child manifests as YAML")
    parser.add_argument("--namespace", default=None, help="namespace for -o manifests (default: the object's)")


def _load(path: str) -> list[dict[str, Any]]:
    import yaml

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def run(args: argparse.Namespace) -> int:
    import yaml
    from dsv4.operator import api, manifests
    from dsv4.operator.planner import PlanError, plan
    from pydantic import ValidationError

    try:
        docs = _load(args.filename)
    except (OSError, yaml.YAMLError) as e:
        print(f"dsv4 plan: cannot read {args.filename}: {e}", file=sys.stderr)
        return 2
    docs = [d for d in docs if d.get("kind") == api.KIND]
    if not docs:
        print(f"dsv4 plan: {args.filename} holds no {api.KIND}", file=sys.stderr)
        return 2
    rc = 0
    for doc in docs:
        meta = doc.get("metadata") or {}
        name = meta.get("name", "endpoint")
        try:
            spec = api.parse_spec(doc.get("spec") or {})
            p = plan(spec)
        except ValidationError as e:
            print(f"{name}: InvalidSpec: {api.format_validation_error(e)}", file=sys.stderr)
            rc = 1
            continue
        except PlanError as e:
            print(f"{name}: {e.reason}: {e.message}", file=sys.stderr)
            rc = 1
            continue
        if args.output == "json":
            print(json.dumps({"name": name, **p.to_dict()}, indent=2))
        elif args.output == "yaml":
            print(yaml.safe_dump({"name": name, **p.to_dict()}, sort_keys=False), end="---\n")
        elif args.output == "manifests":
            ref = manifests.EndpointRef(name, args.namespace or meta.get("namespace", "default"), "<uid>")
            print(yaml.safe_dump_all(manifests.children(ref, spec, p), sort_keys=False), end="---\n")
        else:
            from dsv4.operator.pod_resources import pod_resources

            print(format_plan(name, p) + "\n" + format_resources(pod_resources(spec, p)))
    return rc


def format_plan(name: str, p) -> str:
    gb = 1e9
    rows = [
        ("layout", p.parallelism.label),
        ("tensorParallelSize", p.tensor_parallel_size),
        ("dataParallelSize", p.data_parallel_size),
        ("batchingDelayMs", p.batching_delay_ms),
        ("maxNumBatchedTokens", p.max_num_batched_tokens),
        ("chunkedPrefillSize", p.chunked_prefill_size),
        ("cachePolicy", p.cache_policy),
        ("hcaState", p.hca_state),
        ("poolSplit", ", ".join(f"{k}={v:.3f}" for k, v in p.pool_split.items())),
        ("maxServableContext", p.max_servable_context),
        ("maxModelLen", p.max_model_len),
        ("sessionsPerReplica", p.sessions_per_replica),
        ("initialReplicas", p.initial_replicas),
    ]
    out = [f"{name}: {p.model} on {p.accelerator}, profile {p.profile}",
           f"  weights {p.weight_bytes / gb:.1f} GB ({p.weight_bytes_per_gpu / gb:.1f} GB/GPU), "
           f"cache {p.cache_bytes_per_gpu / gb:.1f} GB/GPU, "
           f"decode step ~{p.decode_step_ms:.1f} ms, prefill ~{p.prefill_tokens_per_s:,.0f} tokens/s"]
    for key, value in rows:
        why = p.reasons.get(key)
        out.append(f"  {key:<20} {value!s:<24}" + (f" # {why}" if why else ""))
    out += [f"  warning: {w}" for w in p.warnings]
    return "\n".join(out)


def format_resources(r) -> str:
    """The pod's cpu/memory/disk and QoS class, with why (dsv4.operator.pod_resources)."""
    rows = [("requests", ", ".join(f"{k}={v}" for k, v in r.requests.items()), r.reasons.get("memory")),
            ("limits", ", ".join(f"{k}={v}" for k, v in r.limits.items()), r.reasons.get("memoryLimit")),
            ("cpu", r.requests.get("cpu", "-"), r.reasons.get("cpu")),
            ("ephemeral-storage", r.requests.get("ephemeral-storage", "-"), r.reasons.get("ephemeral-storage")),
            ("qosClass", r.qos, r.reasons.get("qos"))]
    if "overrides" in r.reasons:
        rows.append(("overrides", "placement.resources", r.reasons["overrides"]))
    return "\n".join(f"  {k:<20} {v!s:<24} # {why}" for k, v, why in rows)
