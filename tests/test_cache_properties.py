"""Property-based tests of the CacheManager over random start/allocate/commit/fork/free/preempt programs.

A harness plays the model: every computed position writes a *content key* (the identity of the token
prefix it depends on) into the block that holds it. Properties checked after every step:
- refcounts equal a recount from the request tables and the cache entries, no block is free and owned,
  no block is in the free list twice (`check_invariants`);
- a write never lands in a block that a cache entry or another request also references;
- a prefix hit hands out compressed blocks and checkpoint blocks with the same content keys that
  recomputing the prefix would write;
- per-pool used bytes equal the distinct blocks of all requests and entries times the block bytes;
- nothing leaks: after every request is freed and the cache cleared, every block is free.
"""

from __future__ import annotations

from dsv4.runtime.cache.manager import CacheManager
from dsv4.runtime.cache.policies import POLICIES
from dsv4.runtime.cache.pools import id_space
from dsv4.runtime.cache.spec import CacheSpec
from dsv4.runtime.config import tiny
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

SPECS = [CacheSpec.from_model(tiny()), CacheSpec.from_model(tiny(), state_block_size=4)]
B = SPECS[0].block_size


def key(tokens: list[int], end: int) -> int:
    return hash(tuple(tokens[:end]))


class Harness:
    def __init__(self, m: CacheManager) -> None:
        self.m = m
        self.content: dict[tuple[str, int], int] = {}
        self.running: dict[str, list[int]] = {}  # req -> tokens
        self.hits: dict[str, tuple[int, int]] = {}

    def owners(self, pool: str, b: int) -> int:
        return self.m.pools[pool].ref[b]

    def check_hit(self, rid: str, tokens: list[int], c: int, r: int) -> None:
        t = self.m.block_tables(rid)
        for p in ("csa", "hca"):
            for i in range(c // B):
                assert self.content[(p, t[p][i])] == key(tokens, (i + 1) * B), (p, i)
        if r > 0 and r % B == 0:  # continuing from a checkpoint: its window must be the right one
            for p in self.m.spec.token_pools:
                tpb = self.m.spec.pools[p].tokens_per_block
                lo, hi = self.m.spec.live_range(p, r)
                for k in range(lo // tpb, -(-hi // tpb)):
                    assert self.content[(p, t[p][k])] == key(tokens, (k + 1) * tpb), (p, k)

    def forward(self, rid: str, tokens: list[int], n0: int, n1: int, until: int) -> None:
        """Write content for positions [n0, n1); compressed rows only at positions >= until."""
        t = self.m.block_tables(rid)
        for p in ("csa", "hca"):
            for i in range(max(n0, until) // B, -(-n1 // B)) if n1 > max(n0, until) else ():
                b = t[p][i]
                assert self.owners(p, b) == 1, f"write into shared {p} block {b}"
                self.content[(p, b)] = key(tokens, min(n1, (i + 1) * B))
        for p in self.m.spec.token_pools:
            tpb = self.m.spec.pools[p].tokens_per_block
            for k in range(n0 // tpb, -(-n1 // tpb)):
                b = t[p][k]
                assert b >= 0 and self.owners(p, b) == 1, f"write into shared/missing {p} block {k}"
                self.content[(p, b)] = key(tokens, min(n1, (k + 1) * tpb))

    def run(self, rid: str, tokens: list[int], chunk: int) -> bool:
        hit = self.m.start(rid, tokens)
        self.check_hit(rid, tokens, hit.cached_tokens, hit.recompute_from)
        self.running[rid] = tokens
        n = hit.recompute_from
        while n < len(tokens):
            n2 = min(len(tokens), n + chunk)
            if not self.m.allocate(rid, n2):
                event("allocation failed -> preempt")
                self.m.free(rid)
                del self.running[rid]
                return False
            self.forward(rid, tokens, n, n2, hit.cached_tokens)
            self.m.commit(rid, tokens, n2)
            n = n2
        return True

    def decode(self, rid: str, tok: int) -> None:
        tokens = self.running[rid] + [tok]
        n = len(tokens) - 1
        if not self.m.allocate(rid, n + 1):
            self.m.free(rid)
            del self.running[rid]
            return
        self.forward(rid, tokens, n, n + 1, 0)
        self.m.commit(rid, tokens, n + 1)
        self.running[rid] = tokens

    def check_bytes(self) -> None:
        m = self.m
        held: dict[str, set[int]] = {p: set() for p in m.spec.block_pools}
        for rid in self.running:
            for p, tab in m.block_tables(rid).items():
                held[p] |= {b for b in tab if b >= 0}
        for e in m.tree.entries.values():
            for p, b in e.comp.items():
                held[p].add(b)
            for p, pairs in (e.ckpt or {}).items():
                held[p] |= set(pairs[1::2])
        st = m.stats()
        for name, ps in st.pools.items():
            p = id_space(name)
            assert ps.blocks_used == len(held[p])
            assert ps.bytes_used == len(held[p]) * m.spec.pools[name].bytes_per_block


# families of prompts sharing prefixes, so hits happen often
FAMILY = [[f * 1000 + i for i in range(600)] for f in range(3)]

op = st.one_of(
    st.tuples(st.just("start"), st.integers(0, 2), st.integers(1, 400), st.integers(0, 40)),
    st.tuples(st.just("decode"), st.integers(0, 7), st.integers(1, 20), st.integers(0, 0)),
    st.tuples(st.just("fork"), st.integers(0, 7), st.integers(1, 90), st.integers(0, 0)),
    st.tuples(st.just("free"), st.integers(0, 7), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(st.just("preempt"), st.integers(0, 7), st.integers(0, 0), st.integers(0, 0)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(POLICIES), ops=st.lists(op, min_size=4, max_size=30),
       nblocks=st.integers(12, 40), comp_blocks=st.integers(6, 24), chunk=st.sampled_from([16, 64, 200]),
       k=st.integers(0, 3), spec_i=st.integers(0, 1))
def test_random_programs_keep_invariants(policy, ops, nblocks, comp_blocks, chunk, k, spec_i):
    m = CacheManager(SPECS[spec_i], {"swa": nblocks, "csa": comp_blocks, "hca": comp_blocks, "csa_state": nblocks,
                            "hca_state": nblocks}, policy, checkpoint_every=k)
    h = Harness(m)
    seq = 0
    for kind, a, b, c in ops:
        live = sorted(h.running)
        if kind == "start":
            seq += 1
            h.run(f"r{seq}", FAMILY[a][:b] + [90_000 + seq] * c, chunk)
        elif kind == "fork" and live:
            src = h.running[live[a % len(live)]]
            seq += 1
            h.run(f"r{seq}", src + [80_000 + i for i in range(b)], chunk)
        elif kind == "decode" and live:
            rid = live[a % len(live)]
            for i in range(b):
                if rid not in h.running:
                    break
                h.decode(rid, 70_000 + i)
        elif kind == "free" and live:
            rid = live[a % len(live)]
            m.free(rid)
            del h.running[rid]
        elif kind == "preempt" and live:
            rid = live[a % len(live)]
            tokens = h.running.pop(rid)
            m.free(rid)
            h.run(rid, tokens, chunk)  # requeued: runs again (usually a prefix hit)
        m.check_invariants()
        h.check_bytes()
    for rid in list(h.running):
        m.free(rid)
    st_ = m.stats()
    event(f"hit tokens > 0: {st_.prefix_hit_tokens > 0}")
    event(f"recompute after hit: {st_.prefix_recompute_tokens > 0}")
    event(f"evictions: {sum(ps.evictions for ps in st_.pools.values()) > 0}")
    m.check_invariants()
    m.clear_cached()
    m.check_invariants()
    assert all(ps.blocks_used == 0 for ps in m.stats().pools.values()), "blocks leaked"
