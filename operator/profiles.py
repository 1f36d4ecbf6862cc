"""Workload profiles: the named presets and the custom form resolve to one `Workload`."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dsv4.operator.api import ProfileSpec


@dataclass(frozen=True)
class Workload:
    name: str
    context_p50: int
    context_p95: int
    context_max: int
    output_tokens: int
    prefix_reuse_ratio: float
    ttft_target_ms: int
    itl_target_ms: int
    concurrency: int


NAMED: dict[str, Workload] = {
    # chat: short prompts, shared system prompt, tight latency, many users
    "short-chat": Workload("short-chat", 2048, 8192, 32768, 512, 0.3, 1000, 30, 64),
    # coding agents: repository context, long multi-turn sessions that re-send the same prefix
    "coding-agent": Workload("coding-agent", 32768, 98304, 131072, 1024, 0.8, 3000, 40, 32),
    # long-context agents: very long histories, near-total prefix reuse between turns, few sessions
    "long-context-agent": Workload("long-context-agent", 131072, 524288, 1048576, 2048, 0.9, 10000, 60, 8),
    # offline batch: throughput over latency
    "batch": Workload("batch", 4096, 16384, 65536, 1024, 0.1, 60000, 200, 256),
}


def resolve(profile: ProfileSpec) -> Workload:
    """The workload a profile stands for (`profile.concurrency` overrides a preset's default)."""
    if profile.name == "custom":
        c = profile.custom
        assert c is not None  # guaranteed by ProfileSpec's validator
        w = Workload("custom", c.context_p50, c.context_p95, c.context_max, c.output_tokens,
                     c.prefix_reuse_ratio, c.ttft_target_ms, c.itl_target_ms, c.concurrency)
    else:
        w = NAMED[profile.name]
    if profile.concurrency is not None:
        w = replace(w, concurrency=profile.concurrency)
    return w
