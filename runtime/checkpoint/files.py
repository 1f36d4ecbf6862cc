"""Safetensors files of a checkpoint folder: which tensor lives in which file, from headers only.

Headers are parsed here (8-byte little-endian length + JSON) so a truncated or corrupt shard is reported
with its file name before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from dsv4.runtime.checkpoint.errors import CheckpointError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8,
                "F4": 0.5, "F8_E4M3FN": 1}


@dataclass(frozen=True)
class TensorMeta:
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = -1  # absolute byte offset of the data in `file` (-1 = unknown)
    nbytes: int = 0


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Tensor name -> meta for one safetensors file; CheckpointError naming the file when it is damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes, "
                                      f"file has {size})")
            raw = f.read(n)
        header = json.loads(raw)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    data = size - 8 - n
    out = {}
    for name, m in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = m["data_offsets"]
            shape = tuple(int(s) for s in m["shape"])
            dtype = str(m["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if end > data:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                                  f"which holds only {data} bytes (incomplete download?)")
        width = _DTYPE_BYTES.get(dtype)
        if width is not None and math.ceil(math.prod(shape) * width) != end - start:
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: shape {list(shape)} of {dtype} "
                                  f"needs {math.ceil(math.prod(shape) * width)} bytes, header gives {end - start}")
        out[name] = TensorMeta(str(path), dtype, shape, 8 + n + int(start), int(end) - int(start))
    return out


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json when present, else *.safetensors."""
    p = Path(folder)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint folder")
    idx = p / "model.safetensors.index.json"
    if idx.exists():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{idx}: corrupt index (expected a JSON object with 'weight_map')") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (p / n).exists()]
        if missing:
            raise CheckpointError(f"{idx}: lists shard(s) that are not in the folder: {', '.join(missing[:5])}")
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p}: no *.safetensors files and no model.safetensors.index.json")
    return files


def list_tensors(folder: str | Path) -> dict[str, TensorMeta]:
    out: dict[str, TensorMeta] = {}
    for f in checkpoint_files(folder):
        for name, meta in read_header(f).items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} appears in both {out[name].file} and {f}")
            out[name] = meta
    return out


def torch_dtype(st_dtype: str):
    """The torch dtype of a safetensors dtype string, or None when it has no direct equivalent (e.g. packed F4)."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FN": torch.float8_e4m3fn,
            "F8_E5M2": torch.float8_e5m2}.get(st_dtype)


def storage(meta: TensorMeta) -> tuple[object, tuple[int, ...]]:
    """(torch dtype, shape) the bytes of `meta` are read into: its own dtype, or raw bytes for the formats torch
    computes nothing with: `F8_E8M0` scales as uint8 exponent bytes, `F4` (two e2m1 codes per byte, header shape =
    logical shape) as uint8 [.., last/2]. None when the dtype cannot be read."""
    import torch

    if meta.dtype == "F8_E8M0":
        return torch.uint8, tuple(meta.shape)
    if meta.dtype == "F4" and meta.shape and meta.shape[-1] % 2 == 0:
        return torch.uint8, (*meta.shape[:-1], meta.shape[-1] // 2)
    dt = torch_dtype(meta.dtype)
    return (dt, tuple(meta.shape)) if dt is not None else (None, tuple(meta.shape))


def read_rows(fd: int, meta: TensorMeta, r0: int, r1: int, out=None):
    """Rows [r0, r1) of dim 0 of a row-major tensor (elements of a 1-D one), in `storage`'s dtype: positional reads
    (`os.preadv`, no shared file offset: several threads may read one file) of just those bytes, into `out` when
    given (contiguous, that dtype and size: no extra copy)."""
    import torch

    dt, shape = storage(meta)
    if dt is None or meta.offset < 0:
        raise CheckpointError(f"{meta.file}: tensor dtype {meta.dtype} cannot be read")
    if not 0 <= r0 <= r1 <= shape[0]:
        raise CheckpointError(f"{meta.file}: rows [{r0}, {r1}) outside a tensor of shape {list(meta.shape)}")
    row = meta.nbytes // shape[0] if shape[0] else 0
    if out is None:
        out = torch.empty((r1 - r0, *shape[1:]), dtype=dt)
    if out.numel() == 0:
        return out
    view, want, got = memoryview(out.reshape(-1).view(torch.uint8).numpy()), (r1 - r0) * row, 0
    while got < want and (n := os.preadv(fd, [view[got:]], meta.offset + r0 * row + got)):  # short reads: go on
        got += n
    if got != want:
        raise CheckpointError(f"{meta.file}: truncated: read {got} of {want} bytes of a tensor")
    return out
