"""`--compile on`: the torch.compile'd decode step gives the eager tokens and logprobs (<= 1e-5, fp32) through
the paged cache — prompts crossing the CSA (4) and HCA (128) compression boundaries, decode batches of several
sizes (dynamic on CPU, and padded to every bucket size as on CUDA), a prefix hit and a preemption — and `off` /
`auto` / a failing compiler behave as documented."""

from __future__ import annotations

import pytest
import torch
from dsv4.runtime.engine.engine import EngineObserver
from dsv4.runtime.engine.request import Request, SamplingParams
from dsv4.runtime.model import compiled, model
from dsv4.runtime.server.build import build_engine
from dsv4.runtime.server.config import ServeConfig

pytestmark = pytest.mark.slow

BASE = [(37 * i + 5) % 1000 + 2 for i in range(300)]
PROMPTS = [BASE[:5], BASE[:150], BASE[:300], [9] * 64, BASE[:200] + [4, 4], [(13 * i) % 997 + 2 for i in range(140)]]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run(mode: str, buckets: tuple[int, ...] | None = None, device: str = "cpu", graphs: list[int] | None = None,
        kv_dtype: str = "auto") -> tuple[list[tuple[list[int], list[float]]], int, list[int]]:
    """Every prompt concurrently (greedy, 8 tokens, logprobs), then a prefix hit, in a cache small enough to
    preempt. Returns ((tokens, chosen-token logprobs) per request, preemptions, compiled decode steps run);
    `graphs` gets the number of graphs compiled while decode steps ran (after the engine's warm-up)."""
    built = build_engine(ServeConfig(compile=mode, num_blocks=12, device=device, max_num_seqs=6,
                                     max_num_batched_tokens=256, kv_dtype=kv_dtype), say=lambda *_: None)
    eng = built.engine.engine
    if buckets is not None:  # the CUDA path's static shapes: decode batches padded with empty sequences
        compiled.use_compiled("cpu", buckets=buckets)
    assert compiled.decode_step_compiled() == (mode == "on" or buckets is not None)
    sizes: list[int] = []
    layers = eng.runner.model.layers

    def counting(fn):
        def counted(first, h, *a):  # first: every layer (`DecodeStep.stack`) or one (`DecodeStep.block`)
            if first is layers or first is layers[0]:
                sizes.append(h.shape[0])
            before = compiled_graphs()
            out = fn(first, h, *a)
            if graphs is not None:
                graphs.append(compiled_graphs() - before)
            return out

        return counted

    for kind in ("stack", "block"):
        if getattr(model.DecodeStep, kind) is not None:
            setattr(model.DecodeStep, kind, counting(getattr(model.DecodeStep, kind)))
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
    outs: dict[str, tuple[list[int], list[float]]] = {}
    preempted = [0]

    class CountPreemptions(EngineObserver):
        def on_step(self, info, cache_stats) -> None:
            preempted[0] += info.num_preempted

    eng.observer = CountPreemptions()

    def drain() -> None:
        while eng.has_work:
            for o in eng.step()[0]:
                for d in o.deltas:
                    toks, lps = outs.setdefault(o.request_id, ([], []))
                    toks += d.token_ids
                    lps += [lp.logprob for lp in d.logprobs]

    for i, p in enumerate(PROMPTS):
        eng.add(Request(f"r{i}", list(p), params))
    drain()
    eng.add(Request("hit", BASE[:150] + [7, 7, 7], params))  # its first two blocks are cached
    drain()
    assert eng.cache.stats().prefix_hit_tokens >= 128
    for i in range(5):  # short prompts admitted together: a decode batch of 5 (padded to 8 with buckets)
        eng.add(Request(f"s{i}", BASE[10 * i:10 * i + 6], params))
    drain()
    compiled.use_eager()
    return [outs[k] for k in sorted(outs)], preempted[0], sizes


def assert_same(eager, comp, tol: float = 1e-5) -> None:
    worst = 0.0
    for (te, le), (tc, lc) in zip(eager, comp, strict=True):
        assert te == tc and len(te) == 8
        worst = max(worst, max(abs(a - b) for a, b in zip(le, lc, strict=True)))
    assert worst <= tol, worst


def test_compiled_decode_step_gives_the_eager_tokens_and_logprobs():
    """Also: on CPU with plain pools the decode graphs have no graph break — the cache step and the grouped
    experts (batches of 5 and 6 here) run inside them — and inductor's cache can store them."""
    from torch._dynamo.utils import counters

    eager, pre_e, _ = run("off")
    counters["graph_break"].clear()
    for name in ("inductor", "aot_autograd"):
        counters[name].clear()
    comp, pre_c, sizes = run("on")
    assert compiled.graph_breaks() == 0, dict(counters["graph_break"])
    # every decode graph can be stored in inductor's cache (a `torch.cond` in the graph is not: compiled at
    # every start)
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0 and counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert pre_e == pre_c and pre_e > 0  # the small cache preempted (and recomputed) someone, in both runs
    assert len(set(sizes)) >= 3 and 1 in sizes and max(sizes) >= 5, sizes  # several sizes, grouped experts too
    assert_same(eager, comp)


def test_no_decode_step_compiles_after_the_warm_up_with_every_guard_checked(monkeypatch):
    """The trimmed guards (`compiled.trim_guards`) are safe only if the warm-up on empty decode batches compiled
    every variant real decode steps need: with every guard checked, no decode step compiles anything new."""
    monkeypatch.setenv(compiled.GUARDS_ENV, "full")
    eager, _, _ = run("off")
    graphs: list[int] = []
    comp, _, sizes = run("on", graphs=graphs)
    assert not compiled.trim_guards()  # "full": the warm-up left every guard in place
    assert len(set(sizes)) >= 3, sizes
    assert len(graphs) >= len(sizes) > 0 and sum(graphs) == 0, graphs  # graphs: one entry per call
    assert_same(eager, comp)


def test_fp8_kv_decode_compiles_nothing_after_the_warm_up(monkeypatch):
    """FP8 KV rows reach the graph decoded, only the referenced ones: a row count that changes every step and
    is 1 in the warm-up's empty batches (`compiled._island_select` keeps it >= 2)."""
    monkeypatch.setenv(compiled.GUARDS_ENV, "full")
    eager, _, _ = run("off", kv_dtype="fp8")
    graphs: list[int] = []
    comp, _, sizes = run("on", graphs=graphs, kv_dtype="fp8")
    assert len(graphs) >= len(sizes) > 0 and sum(graphs) == 0, graphs
    # same tokens; logprobs within 0.1, not 1e-5: a key that differs from eager's in its last fp32 bit (the
    # graph's summation order) can round to the neighbouring FP8 value when it is stored, 12.5 % away (measured
    # 1.7e-3 on an AVX2 CPU; 4.2e-2 on an AVX-512 one, whose 16-lane reductions sum in another order)
    assert_same(eager, comp, tol=0.1)


def test_guards_are_trimmed_after_the_warm_up_only(monkeypatch):
    monkeypatch.setenv(compiled.GUARDS_ENV, "sometimes")
    with pytest.raises(ValueError, match="DSV4_COMPILE_GUARDS must be trimmed or full"):
        compiled.setup("on", None, None, "cpu")
    monkeypatch.delenv(compiled.GUARDS_ENV)
    compiled.use_compiled("cpu")
    assert model.DecodeStep.guards is not compiled._differentiating_guards  # compiling checks every guard
    assert compiled.trim_guards() and model.DecodeStep.guards is compiled._differentiating_guards
    compiled.use_eager()
    assert not compiled.decode_step_compiled()


def test_decode_batches_padded_to_buckets_give_the_eager_tokens():
    eager, _, _ = run("off")
    buckets = (2, 8)  # two static graphs per layer kind (each compiles cold in a new checkout)
    comp, _, sizes = run("off", buckets=buckets)
    assert set(sizes) <= set(buckets) and len(set(sizes)) >= 2, sizes  # padded: only bucket sizes reach the graph
    assert_same(eager, comp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it)")
def test_cuda_graph_decode_step_gives_the_eager_tokens():
    eager, _, _ = run("off", device="cuda")
    comp, _, sizes = run("on", device="cuda")  # reduce-overhead: CUDA graphs, batches padded to DECODE_BUCKETS
    assert set(sizes) <= set(compiled.DECODE_BUCKETS) and len(set(sizes)) >= 2, sizes
    assert_same(eager, comp, tol=1e-4)  # TF32 / kernel order on the GPU


def test_published_checkpoint_with_quantised_weights_compiles(tmp_path, caplog):
    """`--weights-dtype checkpoint` on DeepSeek's published layout (FP8 linears and FP4 experts kept as stored):
    the decode step compiles — no fallback to eager (it used to fail on the FP4 experts' missing `w1`) — and
    gives the eager greedy tokens."""
    import shutil

    from dsv4.runtime.checkpoint.published import write_published_checkpoint
    from dsv4.runtime.checkpoint.random_init import random_tensors
    from dsv4.runtime.server.build import ensure_tiny_model
    from dsv4.runtime.server.config import default_model_dir

    from tests.model_utils import tiny_configs

    cfg = tiny_configs()["mix"]
    write_published_checkpoint(cfg, random_tensors(cfg, seed=6), tmp_path)
    ensure_tiny_model(default_model_dir())  # its tokenizer
    shutil.copy(default_model_dir() / "tokenizer.json", tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = {}
    for mode in ("off", "on"):
        eng = build_engine(ServeConfig(model=str(tmp_path), compile=mode, weights_dtype="checkpoint", num_blocks=32,
                                       max_num_seqs=1), say=lambda *_: None).engine.engine  # warm-up: batch 1
        try:
            assert compiled.decode_step_compiled() == (mode == "on"), caplog.text
            assert eng.runner.model.layers[0].ffn.experts.fp4
            for i in range(3):
                eng.add(Request(f"r{i}", [5 + i, 9, 11, 13, 17, 19, 23][: 4 + i], params))
            while eng.has_work:
                for o in eng.step()[0]:
                    for d in o.deltas:
                        tokens.setdefault(mode, {}).setdefault(o.request_id, []).extend(d.token_ids)
        finally:
            compiled.use_eager()
    assert tokens["on"] == tokens["off"] and all(len(t) == 8 for t in tokens["on"].values())


def test_off_is_eager_and_a_failing_compiler_falls_back_with_one_warning(monkeypatch, caplog):
    runner = build_engine(ServeConfig(num_blocks=12, device="cpu"), say=lambda *_: None).engine.engine.runner
    args = (runner.model, runner.pools, "cpu")
    assert compiled.setup("off", *args) == "off" and not compiled.is_compiled()

    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(compiled, "warm_up", broken)
    with caplog.at_level("WARNING", logger="dsv4.compile"):
        state = compiled.setup("on", *args)
    assert state == "off (compilation failed: RuntimeError)" and not compiled.is_compiled()
    assert not compiled.decode_step_compiled()
    assert [r.message for r in caplog.records] == [
        "torch.compile failed (RuntimeError: no C++ compiler found); serving eagerly"]
    monkeypatch.setattr(compiled, "warm_up", lambda *a, **k: 0.9)  # compiled measured slower: auto keeps eager
    assert compiled.setup("auto", *args).startswith("off (auto: compiled ran 0.90x")
    assert not compiled.is_compiled() and not compiled.decode_step_compiled()
    with pytest.raises(ValueError, match="compile must be auto, on or off"):
        compiled.setup("fast", *args)


def test_gathered_and_padded_experts_equal_the_grouped_loop():
    """`Experts.forward_gathered` (the compiled step's small-batch path) and `layers.padded_experts` (its op for
    larger batches) against the eager per-expert loop, with repeated experts in a batch and experts without rows;
    a real model's experts (bf16 4096 x 2048) never gather."""
    from dsv4.runtime.model.layers import Experts, padded_experts

    torch.manual_seed(0)
    ex = Experts(8, 64, 32, 7.0, torch.float32)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(4, 64)
    idx = torch.tensor([[0, 3], [3, 5], [7, 0], [3, 3]])
    w = torch.rand(4, 2)
    assert ex.gathers(8) and not ex.gathers(9)
    torch.testing.assert_close(ex.forward_gathered(x, idx, w), ex.forward_grouped(x, idx, w), rtol=1e-6, atol=1e-6)
    x, idx, w = torch.randn(16, 64), torch.randint(0, 6, (16, 2)), torch.rand(16, 2)  # experts 6, 7: no rows
    torch.testing.assert_close(padded_experts(x, idx, w, ex.w1, ex.w2, ex.w3, ex.limit), ex.forward_grouped(x, idx, w),
                               rtol=1e-6, atol=1e-6)
    big = Experts(256, 4096, 2048, 7.0, torch.bfloat16).to("meta")
    assert not big.gathers(1)


def test_layer_pools_are_each_layers_tensors_with_a_trash_row():
    """`KVPools.layer_pools` (the CPU graphs' pool inputs) per layer kind: the layer's tensors with one row more,
    the trash row the graph's writes without a row go to, outside every block's rows."""
    from dsv4.runtime.config import CSA, HCA, SLIDING
    from dsv4.runtime.model.kv_pools import KVPools, cache_spec

    from tests.model_utils import tiny_configs

    cfg = next(c for c in tiny_configs().values() if {CSA, HCA, SLIDING} <= set(c.layer_types))
    pools = KVPools.for_model(cfg, cache_spec(cfg), 4)
    for i, kind in enumerate(cfg.layer_types):
        comp = model.COMPRESSED_POOL.get(kind)
        lp = pools.layer_pools(i, comp)
        assert lp.plain and pools.layer_pools(i, comp) is lp
        assert (lp.comp is None) == (kind == SLIDING) and (lp.idx is None) == (kind != CSA)
        names = ["swa"] + ([f"{comp}_state", comp] if comp else []) + (["idx"] if kind == CSA else [])
        for name, t in zip(names, lp.tensors(), strict=True):
            rows = pools.tensor(name, i)
            assert t.shape == (rows.shape[0] + 1, rows.shape[1]) and t.data_ptr() == rows.data_ptr()
            t[-1] = 7
            assert not bool((rows == 7).any())
    fp8 = KVPools.for_model(cfg, cache_spec(cfg, kv_dtype="fp8"), 4)
    assert not fp8.layer_pools(cfg.layer_types.index(CSA), "csa").plain  # FP8 rows: the eager island


def test_inductor_artefacts_go_to_the_project_cache_unless_the_user_chose_a_folder():
    torch_default = "/tmp/torchinductor_someone"
    ours = str(compiled.cache_dir())
    assert compiled.inductor_cache_dir(None, torch_default) == ours
    assert compiled.inductor_cache_dir(torch_default, torch_default) == ours  # torch wrote its default on import
    assert compiled.inductor_cache_dir("/data/ind", torch_default) == "/data/ind"
