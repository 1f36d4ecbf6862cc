"""Cache layout: which pools exist, how many rows a block holds and how many bytes a row takes.

One *logical block* = `block_size` native token positions (the prefix-hash unit). Each pool stores
its own rows for it:

| pool        | layers        | tokens per block | rows per block          | row                              |
|-------------|---------------|------------------|-------------------------|----------------------------------|
| `swa`       | every layer   | swa_block_size   | swa_block_size          | raw KV (head_dim / FP8 layout)   |
| `csa`       | CSA layers    | block_size       | block_size / csa_ratio  | compressed entry (like swa)      |
| `idx`       | CSA layers    | block_size       | block_size / csa_ratio  | indexer key (shares csa's ids)   |
| `hca`       | HCA layers    | block_size       | block_size / hca_ratio  | compressed entry (like swa)      |
| `csa_state` | CSA layers    | swa_block_size   | swa_block_size          | fp32 kv 2d, score 2d, ikv 2di, isc 2di |
| `hca_state` | HCA layers    | swa_block_size   | swa_block_size          | fp32 [kv d | score d]             |
| `hca_state` online (`hca_state="online"`) | HCA layers | hca_ratio | 1        | fp32 [max d | sum d | wsum d]    |

`hca_state="online"` keeps one slot per open HCA group (an online-softmax state, `model/hca_online.py`)
instead of one raw row per tail token: a block covers one group of hca_ratio positions and holds one
3·d fp32 row, so a running request's HCA tail costs 3·d·4 B per HCA layer (6 KiB for d = 512) instead of
hca_ratio·2·d·4 B (512 KiB).

FP8 row (kv_dtype "fp8"): `round_up(nope + 2*rope + ceil(nope/64), 8)` bytes = 584 for 512/64
(e4m3 nope values, one UE8M0 scale byte per 64 of them, bf16 rope dims).
Indexer keys with FP8 KV: "fp8" = index_head_dim + 4 bytes (e4m3 + fp32 scale, 132 B) or "fp4" =
index_head_dim/2 + index_head_dim/32 bytes (MXFP4 + UE8M0 scales, 68 B).

Whole-model slope (bytes per native token, compressed pools only):
    slope = |CSA| * (b_e + b_i) / csa_ratio + |HCA| * b_e / hca_ratio
e.g. Flash FP8 + FP4 idx: 21 * (584 + 68) / 4 + 20 * 584 / 128 = 3514.25 B/token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsv4.runtime.cache.pools import COMPRESSED_POOLS, TABLE_POOLS, TOKEN_POOLS, id_space
from dsv4.runtime.config import CSA, HCA, ModelConfig

from dsv4.settings_enums import HCA_STATES

KV_DTYPES = ("fp32", "bf16", "fp8")
INDEX_DTYPES = ("fp32", "bf16", "fp8", "fp4")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "uint8": 1}
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp8": "uint8"}


class CacheConfigError(ValueError):
    """A cache layout that cannot work; the message names the field and the limit."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers: blocks of b positions needed for a positions."""
    return -(-a // b)


def fp8_row_bytes(head_dim: int, rope_dim: int) -> int:
    """Bytes of one FP8-layout KV row: e4m3 nope dims + UE8M0 scale per 64 + bf16 rope dims, 8-aligned."""
    nope = head_dim - rope_dim
    raw = nope + 2 * rope_dim + math.ceil(nope / 64)
    return -(-raw // 8) * 8


def index_row_bytes(index_head_dim: int, index_dtype: str) -> int:
    """Bytes of one indexer key row for the given storage format."""
    if index_dtype == "fp32":
        return 4 * index_head_dim
    if index_dtype == "bf16":
        return 2 * index_head_dim
    if index_dtype == "fp8":
        return index_head_dim + 4
    if index_dtype == "fp4":
        return index_head_dim // 2 + index_head_dim // 32
    raise CacheConfigError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")


def default_block_sizes(csa_ratio: int, hca_ratio: int) -> tuple[int, int]:
    """(block_size, swa_block_size): 256/64 for HCA ratio 128 (Flash/Pro); otherwise the smallest
    multiple of lcm(csa_ratio, hca_ratio) that is >= 64, with 16-token swa blocks (tiny: 64/16)."""
    if hca_ratio == 128:
        return 256, 64
    unit = math.lcm(csa_ratio, hca_ratio)
    return unit * max(1, math.ceil(64 / unit)), 16


@dataclass(frozen=True)
class PoolSpec:
    name: str
    layers: tuple[int, ...]  # model layer indices that own one tensor in this pool
    tokens_per_block: int  # native token positions covered by one physical block
    rows_per_block: int  # rows per block (= tokens_per_block / ratio)
    dtype: str  # torch dtype name of the storage: "float32" | "bfloat16" | "uint8"
    row_elems: int  # elements of `dtype` per row

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one row in one layer."""
        return self.row_elems * _DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one physical block over all layers of the pool."""
        return self.bytes_per_row * self.rows_per_block * len(self.layers)


@dataclass(frozen=True)
class CacheSpec:
    block_size: int  # native tokens per logical block = prefix-hash unit
    swa_block_size: int  # tokens per block of swa (and of csa_state / hca_state unless state_block_size is given)
    window: int
    csa_ratio: int
    hca_ratio: int
    kv_dtype: str  # "fp32" | "bf16" | "fp8"
    pools: dict[str, PoolSpec] = field(default_factory=dict)  # only pools with at least one layer
    index_dtype: str = "bf16"
    num_layers: int = 0
    hca_state: str = "raw"

    # ---- construction ------------------------------------------------------------------------
    @staticmethod
    def from_model(cfg: ModelConfig, kv_dtype: str = "bf16", block_size: int | None = None,
                   swa_block_size: int | None = None, index_dtype: str | None = None,
                   state_block_size: int | None = None, hca_state: str = "raw") -> CacheSpec:
        """The layout for `cfg`. `state_block_size` (default: swa_block_size, the contract) sets the
        tokens per block of csa_state / hca_state alone: a checkpoint needs only the last csa_ratio
        state rows, so 4-token state blocks cut a checkpoint's fp32 state 16x against 64-token blocks."""
        if kv_dtype not in KV_DTYPES:
            raise CacheConfigError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        if hca_state not in HCA_STATES:
            raise CacheConfigError(f"hca_state must be one of {HCA_STATES}, got {hca_state!r}")
        if index_dtype is None:
            index_dtype = kv_dtype
        if kv_dtype == "fp8":
            if index_dtype not in ("fp8", "fp4"):
                raise CacheConfigError(f"index_dtype with kv_dtype 'fp8' must be 'fp8' or 'fp4', got {index_dtype!r}")
        elif index_dtype != kv_dtype:
            raise CacheConfigError(f"index_dtype must equal kv_dtype ({kv_dtype!r}) unless kv_dtype is 'fp8', "
                                   f"got {index_dtype!r}")
        csa, hca = cfg.csa_ratio, cfg.hca_ratio
        dbs, dswa = default_block_sizes(csa, hca)
        bs = dbs if block_size is None else int(block_size)
        sbs = dswa if swa_block_size is None else int(swa_block_size)
        if bs < 1 or bs % csa or bs % hca:
            raise CacheConfigError(f"block_size must be a positive multiple of csa_ratio ({csa}) and "
                                   f"hca_ratio ({hca}), got {bs}")
        if sbs < 1 or bs % sbs:
            raise CacheConfigError(f"swa_block_size must be a positive divisor of block_size ({bs}), got {sbs}")
        stb = sbs if state_block_size is None else int(state_block_size)
        if stb < 1 or bs % stb:
            raise CacheConfigError(f"state_block_size must be a positive divisor of block_size ({bs}), got {stb}")

        if kv_dtype == "fp8":
            kv_dt, kv_elems = "uint8", fp8_row_bytes(cfg.head_dim, cfg.qk_rope_head_dim)
            idx_dt, idx_elems = "uint8", index_row_bytes(cfg.index_head_dim, index_dtype)
        else:
            kv_dt, kv_elems = _TORCH_DTYPE[kv_dtype], cfg.head_dim
            idx_dt, idx_elems = _TORCH_DTYPE[kv_dtype], cfg.index_head_dim
        all_layers = tuple(range(cfg.num_hidden_layers))
        csa_layers, hca_layers = tuple(cfg.layers_of(CSA)), tuple(cfg.layers_of(HCA))
        d, di = cfg.head_dim, cfg.index_head_dim
        cand = [
            PoolSpec("swa", all_layers, sbs, sbs, kv_dt, kv_elems),
            PoolSpec("csa", csa_layers, bs, bs // csa, kv_dt, kv_elems),
            PoolSpec("idx", csa_layers, bs, bs // csa, idx_dt, idx_elems),
            PoolSpec("hca", hca_layers, bs, bs // hca, kv_dt, kv_elems),
            PoolSpec("csa_state", csa_layers, stb, stb, "float32", 4 * d + 4 * di),
            PoolSpec("hca_state", hca_layers, stb, stb, "float32", 2 * d) if hca_state == "raw"
            else PoolSpec("hca_state", hca_layers, hca, 1, "float32", 3 * d),
        ]
        pools = {p.name: p for p in cand if p.layers}
        return CacheSpec(bs, sbs, cfg.sliding_window, csa, hca, kv_dtype, pools, index_dtype, cfg.num_hidden_layers,
                         hca_state)

    # ---- layout helpers ----------------------------------------------------------------------
    @property
    def token_pools(self) -> tuple[str, ...]:
        return tuple(p for p in TOKEN_POOLS if p in self.pools)

    @property
    def compressed_pools(self) -> tuple[str, ...]:
        return tuple(p for p in COMPRESSED_POOLS if p in self.pools)

    @property
    def block_pools(self) -> tuple[str, ...]:
        """Pools with their own block-id space (idx rides on csa's ids)."""
        return tuple(p for p in TABLE_POOLS if p in self.pools)

    def block_bytes(self, pool: str) -> int:
        """Bytes of one block id of `pool`, with the rows of the pools that borrow its ids (csa: + idx)."""
        return sum(ps.bytes_per_block for name, ps in self.pools.items() if id_space(name) == pool)

    def live_range(self, pool: str, n: int) -> tuple[int, int]:
        """Positions [lo, n) of a token-granular pool a running request needs after n computed tokens.

        swa: [n - window, n); csa_state: [r*floor(n/r) - r, n) (previous group for the overlapping
        pooling + the current partial group); hca_state: [r'*floor(n/r'), n).
        """
        if pool == "swa":
            lo = n - self.window
        elif pool == "csa_state":
            lo = self.csa_ratio * (n // self.csa_ratio) - self.csa_ratio
        elif pool == "hca_state":
            lo = self.hca_ratio * (n // self.hca_ratio)
        else:
            raise CacheConfigError(f"live_range is defined for {TOKEN_POOLS}, got {pool!r}")
        return max(0, lo), n

    # ---- accounting (bytes, unrounded) --------------------------------------------------------
    def slope_bytes_per_token(self) -> float:
        """Bytes per native token of compressed history (csa + idx + hca) over the whole model."""
        return sum(self.pools[p].bytes_per_block for p in self.compressed_pools) / self.block_size

    def window_bytes(self) -> int:
        """Raw sliding-window rows of one request: window * row bytes * layers."""
        p = self.pools["swa"]
        return self.window * p.bytes_per_row * len(p.layers)

    def state_bytes(self) -> int:
        """Compressor tail state of one request as ring buffers: 2*csa_ratio slots per CSA layer
        (overlapping pooling) and hca_ratio slots per HCA layer (vLLM's fp32 layout, design note §6), or one
        online-softmax slot per HCA layer with `hca_state="online"`."""
        total = 0
        if "csa_state" in self.pools:
            p = self.pools["csa_state"]
            total += 2 * self.csa_ratio * p.bytes_per_row * len(p.layers)
        if "hca_state" in self.pools:
            p = self.pools["hca_state"]
            total += (self.hca_ratio if self.hca_state == "raw" else 1) * p.bytes_per_row * len(p.layers)
        return total

    def fixed_bytes_per_request(self) -> int:
        """Physical minimum of per-request state independent of context: window + compressor tails."""
        return self.window_bytes() + self.state_bytes()

    def bytes_for_context(self, tokens: int) -> float:
        """Unrounded bytes one running request needs at `tokens` of context (fixed + slope * tokens)."""
        return self.fixed_bytes_per_request() + self.slope_bytes_per_token() * tokens
