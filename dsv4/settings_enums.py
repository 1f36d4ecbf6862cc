"""Named choices shared by the operator (CRD, planner) and the runtime (`dsv4 serve` settings, cache).

Each is a `Literal` type (what pydantic models and type hints use, so CRD schemas and config files stay plain
strings) plus the tuple of its values in the order the CRD lists them (for membership checks and messages).
"""

from __future__ import annotations

from typing import Literal, get_args

# Sliding-window cache policy for prefix reuse: keep every block, keep window state every N blocks, or keep only
# the live window and recompute it on a hit. Ordered from the most reuse kept to the least (the planner's
# preference order).
CachePolicy = Literal["full", "checkpoint", "recompute"]
CACHE_POLICIES: tuple[str, ...] = get_args(CachePolicy)

# HCA compressor tail state: raw rows, or one online-softmax slot per open group.
HcaState = Literal["raw", "online"]
HCA_STATES: tuple[str, ...] = get_args(HcaState)

# Named workload profiles (operator/profiles.py describes each workload); the CRD also accepts "custom"
# (the workload given in full).
ProfileName = Literal["long-context-agent", "coding-agent", "short-chat", "batch"]
PROFILE_NAMES: tuple[str, ...] = get_args(ProfileName)

# In-memory format of the weights: dequantise FP8/FP4 into the model dtype at load, or keep them as the checkpoint
# stores them (FP8 linears + block scales, packed FP4 experts + E8M0 scales; dequantised on the fly per layer).
WeightsDtype = Literal["bf16", "checkpoint"]
WEIGHTS_DTYPES: tuple[str, ...] = get_args(WeightsDtype)
