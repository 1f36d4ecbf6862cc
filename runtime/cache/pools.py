"""The pool kinds of the hybrid cache: the one registry that the allocator, the model's tensors (`KVPools`),
the runner's block tables, the TP wire format and the server's reports read.

Two granularities (see `spec.py` for the rows of each pool):

- token-granular pools (`swa`, `csa_state`, `hca_state`) hold the live window of a running request in blocks
  of `tokens_per_block` positions; rows that leave the window are freed, checkpoints keep some of them;
- compressed pools (`csa`, `idx`, `hca`) hold one block per logical block (`block_size` positions): immutable
  once written and shared by prefix hits.

`idx` (the indexer keys) has no block ids of its own: it is addressed by csa's block ids and therefore has
csa's block count (`id_space`, `blocks_of`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Granularity(enum.Enum):
    TOKEN = "token"
    COMPRESSED = "compressed"


@dataclass(frozen=True)
class PoolKind:
    name: str
    granularity: Granularity
    shares_ids_of: str | None = None  # the pool whose block ids (and block count) this one borrows


POOL_KINDS: dict[str, PoolKind] = {k.name: k for k in (
    PoolKind("swa", Granularity.TOKEN),
    PoolKind("csa", Granularity.COMPRESSED),
    PoolKind("idx", Granularity.COMPRESSED, shares_ids_of="csa"),
    PoolKind("hca", Granularity.COMPRESSED),
    PoolKind("csa_state", Granularity.TOKEN),
    PoolKind("hca_state", Granularity.TOKEN),
)}

POOLS = tuple(POOL_KINDS)
TOKEN_POOLS = tuple(n for n, k in POOL_KINDS.items() if k.granularity is Granularity.TOKEN)
COMPRESSED_POOLS = tuple(n for n, k in POOL_KINDS.items() if k.granularity is Granularity.COMPRESSED)
# pools with their own block-id space, i.e. with a block table; this order is also the TP wire format's
TABLE_POOLS = tuple(n for n, k in POOL_KINDS.items() if k.shares_ids_of is None)


def id_space(pool: str) -> str:
    """The pool whose block ids address `pool` (itself, or csa for idx)."""
    return POOL_KINDS[pool].shares_ids_of or pool


def blocks_of(num_blocks: dict[str, int], pool: str, default: int | None = None) -> int | None:
    """Block count of `pool` in a per-pool count map; a pool that borrows another's ids borrows its count."""
    return num_blocks.get(pool, num_blocks.get(id_space(pool), default))
