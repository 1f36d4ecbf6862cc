"""`KVPools`: the physical cache tensors of every pool and layer, built from a `CacheSpec`.

`pools.tensor(pool, layer)` is `[num_blocks * rows_per_block, row_elems]` in the pool's storage dtype.
A physical row id is `block_id * rows_per_block + offset`. Each tensor is a view of one with a trash row after
the last block's rows, which only the compiled decode step writes (`LayerPools`). Rows of the "fp8" KV layout
are uint8 and are encoded / decoded by `write` / `gather_view` (see `fp8_codec.py`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from dsv4.runtime.cache.pools import blocks_of
from dsv4.runtime.cache.spec import CacheSpec, PoolSpec
from dsv4.runtime.config import ModelConfig
from dsv4.runtime.model import fp8_codec


class LayerPools(NamedTuple):
    """One layer's cache tensors, for the compiled decode step: graph inputs instead of a lookup by layer index
    (which would specialise the graph to the layer). `comp` is the layer's csa or hca pool, `state` its compressor
    state; `plain`: every one holds plain rows (no FP8 encoding) and the HCA state is raw, so the graph can gather
    from them and write them directly. Each tensor ends with its pool's trash row (`KVPools`): the graph's writes
    for tokens without a row (slot -1, a token that completes no group) land there, so every write has a static
    shape."""

    swa: torch.Tensor
    state: torch.Tensor | None
    comp: torch.Tensor | None
    idx: torch.Tensor | None
    plain: bool

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.swa, self.state, self.comp, self.idx) if t is not None]


def _layer_pool_names(compressed: str | None) -> list[str]:
    """A layer's pools in `LayerPools` order; `compressed`: "csa", "hca" or None."""
    names = ["swa"] + ([f"{compressed}_state", compressed] if compressed else [])
    return names + (["idx"] if compressed == "csa" else [])


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8, "float16": torch.float16}


class KVPools:
    def __init__(self, spec: CacheSpec, num_blocks: dict[str, int] | int, device: torch.device | str = "cpu",
                 head_dim: int | None = None, rope_dim: int | None = None, index_dim: int | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.head_dim = head_dim
        self.rope_dim = rope_dim
        self.index_dim = index_dim
        self.num_blocks: dict[str, int] = {}
        self._t: dict[tuple[str, int], torch.Tensor] = {}
        self._with_trash: dict[tuple[str, int], torch.Tensor] = {}
        self._layer_pools: dict[int, LayerPools] = {}
        for name, ps in spec.pools.items():
            if isinstance(num_blocks, int):
                nb = num_blocks
            else:
                nb = blocks_of(num_blocks, name)
                if nb is None:
                    raise ValueError(f"num_blocks has no entry for pool {name!r}")
            self.num_blocks[name] = int(nb)
            dt = _DTYPES[ps.dtype]
            for layer in ps.layers:
                # one row more than the blocks hold: the trash row, never part of a block (`LayerPools`)
                t = torch.zeros(int(nb) * ps.rows_per_block + 1, ps.row_elems, dtype=dt, device=self.device)
                self._with_trash[(name, layer)], self._t[(name, layer)] = t, t[:-1]

    @classmethod
    def for_model(cls, cfg: ModelConfig, spec: CacheSpec, num_blocks: dict[str, int] | int,
                  device: torch.device | str = "cpu") -> KVPools:
        return cls(spec, num_blocks, device, head_dim=cfg.head_dim, rope_dim=cfg.qk_rope_head_dim,
                   index_dim=cfg.index_head_dim)

    def has(self, pool: str, layer: int) -> bool:
        return (pool, layer) in self._t

    def tensor(self, pool: str, layer: int) -> torch.Tensor:
        try:
            return self._t[(pool, layer)]
        except KeyError:
            raise KeyError(f"no cache tensor for pool {pool!r} layer {layer}") from None

    def layer_pools(self, layer: int, compressed: str | None) -> LayerPools:
        """`LayerPools` of `layer`; `compressed`: "csa", "hca" or None (a sliding-window layer)."""
        if (lp := self._layer_pools.get(layer)) is None:
            names = _layer_pool_names(compressed)
            plain = not any(self.is_fp8(n) for n in names) and (
                compressed != "hca" or getattr(self.spec, "hca_state", "raw") == "raw")
            for n in names:
                self.tensor(n, layer)  # a KeyError naming the pool
            t = [self._with_trash[(n, layer)] for n in names] + [None] * (4 - len(names))
            lp = self._layer_pools[layer] = LayerPools(t[0], t[1], t[2], t[3], plain)
        return lp

    def pool_spec(self, pool: str) -> PoolSpec:
        return self.spec.pools[pool]

    def is_fp8(self, pool: str) -> bool:
        return self.spec.pools[pool].dtype == "uint8"

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._t.values())

    # ---- row access -----------------------------------------------------------------------------
    def write(self, pool: str, layer: int, rows: torch.Tensor, values: torch.Tensor,
              cols: slice | None = None) -> None:
        """pool[rows, cols] = values (rows < 0 are skipped); fp8 rows are encoded here (quantised "idx" keys are
        expected Hadamard-rotated already, as `attention.py` writes them)."""
        keep = rows >= 0
        if not bool(keep.all()):
            rows, values = rows[keep], values[keep]
        if rows.numel() == 0:
            return
        t = self.tensor(pool, layer)
        if self.is_fp8(pool) and pool == "idx":
            t[rows] = fp8_codec.encode_index(values, self.spec.index_dtype)
        elif self.is_fp8(pool):
            t[rows] = fp8_codec.encode(values.float(), self.rope_dim)
        elif cols is None:
            t[rows] = values.to(t.dtype)
        else:
            t[rows, cols] = values.to(t.dtype)

    def gather_view(self, pool: str, layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows tensor, indices into it) for the kernels. Plain dtypes: the pool itself and `idx`.
        fp8: only the referenced rows, decoded to fp32, with `idx` remapped onto them."""
        t = self.tensor(pool, layer)
        if not self.is_fp8(pool):
            return t, idx
        valid = idx >= 0
        used = torch.unique(idx[valid])
        if pool == "idx":
            dec = fp8_codec.decode_index(t[used], self.spec.index_dtype, self.index_dim)
        else:
            dec = fp8_codec.decode(t[used], self.rope_dim, self.head_dim)
        if used.numel() == 0:  # nothing visible: one dummy row keeps the kernels' gathers in range
            return torch.zeros(1, dec.shape[-1], dtype=dec.dtype, device=dec.device), torch.full_like(idx, -1)
        remap = torch.searchsorted(used, idx.clamp(min=0))
        return dec, torch.where(valid, remap, torch.full_like(idx, -1))


def cache_spec(cfg: ModelConfig, kv_dtype: str = "fp32", block_size: int | None = None,
               swa_block_size: int | None = None, hca_state: str = "raw") -> CacheSpec:
    """`CacheSpec.from_model` (runtime/cache/spec.py) with the model's defaults."""
    return CacheSpec.from_model(cfg, kv_dtype=kv_dtype, block_size=block_size, swa_block_size=swa_block_size,
                                hca_state=hca_state)
