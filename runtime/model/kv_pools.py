"""`KVPools`: the physical cache tensors of every pool and layer, built from a `CacheSpec`.

`pools.tensor(pool, layer)` is `[num_blocks * rows_per_block, row_elems]` in the pool's storage dtype.
A physical row id is `block_id * rows_per_block + offset`. Rows of the "fp8" KV layout are uint8 and are
encoded / decoded by `write` / `gather_view` (see `fp8_codec.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from dsv4.runtime.model import fp8_codec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8, "float16": torch.float16}


class KVPools:
    def __init__(self, spec: Any, num_blocks: dict[str, int] | int, device: torch.device | str = "cpu",
                 head_dim: int | None = None, rope_dim: int | None = None, index_dim: int | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.head_dim = head_dim
        self.rope_dim = rope_dim
        self.index_dim = index_dim
        self.num_blocks: dict[str, int] = {}
        self._t: dict[tuple[str, int], torch.Tensor] = {}
        for name, ps in spec.pools.items():
            if isinstance(num_blocks, int):
                nb = num_blocks
            else:
                nb = num_blocks.get(name, num_blocks.get("csa") if name == "idx" else None)
                if nb is None:
                    raise ValueError(f"num_blocks has no entry for pool {name!r}")
            self.num_blocks[name] = int(nb)
            dt = _DTYPES[ps.dtype]
            for layer in ps.layers:
                self._t[(name, layer)] = torch.zeros(int(nb) * ps.rows_per_block, ps.row_elems, dtype=dt,
                                                     device=self.device)

    @classmethod
    def for_model(cls, cfg: Any, spec: Any, num_blocks: dict[str, int] | int,
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

    def pool_spec(self, pool: str) -> Any:
        return self.spec.pools[pool]

    def is_fp8(self, pool: str) -> bool:
        return self.spec.pools[pool].dtype == "uint8"

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._t.values())

    # ---- row access -----------------------------------------------------------------------------
    def write(self, pool: str, layer: int, rows: torch.Tensor, values: torch.Tensor,
              cols: slice | None = None) -> None:
        """pool[rows, cols] = values (rows < 0 are skipped); fp8 rows are encoded here."""
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


def cache_spec(cfg: Any, kv_dtype: str = "fp32", block_size: int | None = None,
               swa_block_size: int | None = None, hca_state: str = "raw") -> Any:
    """`CacheSpec.from_model` (runtime/cache/spec.py). Until that module exists, an equivalent local spec built
    from the contract text (same pools, rows and row formats) so the model can be exercised on its own."""
    try:
        from dsv4.runtime.cache.spec import CacheSpec  # type: ignore[import-not-found]
    except ImportError:
        return _contract_spec(cfg, kv_dtype, block_size, swa_block_size)
    return CacheSpec.from_model(cfg, kv_dtype=kv_dtype, block_size=block_size, swa_block_size=swa_block_size,
                                hca_state=hca_state)


def _contract_spec(cfg: Any, kv_dtype: str, block_size: int | None, swa_block_size: int | None) -> Any:
    from dataclasses import dataclass

    from dsv4.runtime.config import CSA, HCA

    @dataclass(frozen=True)
    class _Pool:
        name: str
        layers: tuple[int, ...]
        tokens_per_block: int
        rows_per_block: int
        dtype: str
        row_elems: int

    @dataclass(frozen=True)
    class _Spec:
        block_size: int
        swa_block_size: int
        window: int
        csa_ratio: int
        hca_ratio: int
        kv_dtype: str
        pools: dict

    bs = block_size or (256 if cfg.hca_ratio <= 256 and 256 % cfg.hca_ratio == 0 else cfg.hca_ratio)
    sbs = swa_block_size or min(64, bs)
    kvd = {"fp32": ("float32", cfg.head_dim), "bf16": ("bfloat16", cfg.head_dim),
           "fp8": ("uint8", fp8_codec.row_bytes(cfg.head_dim, cfg.qk_rope_head_dim))}[kv_dtype]
    idx_dt = "float32" if kv_dtype == "fp32" else "bfloat16"
    csa, hca = tuple(cfg.layers_of(CSA)), tuple(cfg.layers_of(HCA))
    pools = {"swa": _Pool("swa", tuple(range(cfg.num_hidden_layers)), sbs, sbs, *kvd)}
    if csa:
        rpb = bs // cfg.csa_ratio
        pools["csa"] = _Pool("csa", csa, bs, rpb, *kvd)
        pools["idx"] = _Pool("idx", csa, bs, rpb, idx_dt, cfg.index_head_dim)
        pools["csa_state"] = _Pool("csa_state", csa, sbs, sbs, "float32", 4 * cfg.head_dim + 4 * cfg.index_head_dim)
    if hca:
        pools["hca"] = _Pool("hca", hca, bs, bs // cfg.hca_ratio, *kvd)
        pools["hca_state"] = _Pool("hca_state", hca, sbs, sbs, "float32", 2 * cfg.head_dim)
    return _Spec(bs, sbs, cfg.sliding_window, cfg.csa_ratio, cfg.hca_ratio, kv_dtype, pools)
