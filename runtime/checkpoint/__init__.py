"""Checkpoints: tensor names, loader (safetensors, HF and DeepSeek layouts, FP8/FP4), writer, random init."""

from dsv4.runtime.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
