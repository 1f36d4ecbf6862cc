"""The loader reads tensors stored as the model keeps them on `DSV4_LOAD_THREADS` threads (positional reads) and
dequantises the rest on the calling thread: the loaded model is the same tensor for tensor whatever the thread
count, kept-quantised (`--weights-dtype checkpoint`) or dequantised, whole or one TP rank's part; the jobs stay
within their in-flight byte budget; a failure on a reading thread is the usual `CheckpointError`; a bad setting is
refused by name."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from dsv4.runtime.checkpoint import loader
from dsv4.runtime.checkpoint.errors import CheckpointError
from dsv4.runtime.checkpoint.loader import READ_THREADS_ENV, TPShard, load_checkpoint
from dsv4.runtime.checkpoint.published import write_published_checkpoint
from dsv4.runtime.checkpoint.random_init import random_tensors

from tests.model_utils import tiny_configs


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    cfg = dataclasses.replace(tiny_configs()["mix"], n_routed_experts=8)
    path = tmp_path_factory.mktemp("threads") / "published"
    write_published_checkpoint(cfg, random_tensors(cfg, seed=11), path, max_shard_bytes=120_000)
    return path


def _load(path, threads: str, monkeypatch, **kw):
    monkeypatch.setenv(READ_THREADS_ENV, threads)
    model, _ = load_checkpoint(path, dtype="float32", progress=False, **kw)
    return model


@pytest.mark.parametrize("weights_dtype", ["checkpoint", "bf16"])
@pytest.mark.parametrize("shard", [None, (1, 2)], ids=["whole", "tp2-rank1"])
def test_threaded_load_equals_one_thread(published, monkeypatch, weights_dtype, shard):
    kw = {"weights_dtype": weights_dtype, "shard": TPShard(*shard) if shard else None}
    one = _load(published, "1", monkeypatch, **kw)
    many = _load(published, "4", monkeypatch, **kw)
    a, b = one.state_dict(), many.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert one.load_stats == many.load_stats


def test_jobs_run_within_their_byte_budget_and_every_job_is_counted():
    sizes = [5, 30, 10, 10, 40, 1, 1, 1, 60, 3]  # 60 > budget: runs alone
    pooled = [i % 3 != 1 for i in range(len(sizes))]
    lock, live, peak, seen, alone = threading.Lock(), [0], [0], [], []
    on_pool = set()
    first_two = threading.Barrier(2, timeout=30)  # jobs 0 and 2 (5 + 10 bytes) must be allowed to run at once

    def work(job):
        i = job[0]
        if pooled[i]:
            with lock:
                live[0] += sizes[i]
                if sizes[i] > 50:
                    alone.append(live[0])
                else:
                    peak[0] = max(peak[0], live[0])
                on_pool.add(threading.current_thread().name)
            if i in (0, 2):
                first_two.wait()  # deterministic overlap: no timing assumption
            else:
                time.sleep(0.005)
            with lock:
                live[0] -= sizes[i]
        else:
            assert threading.current_thread() is threading.main_thread()  # conversions on the calling thread

    loader._run_jobs(work, [(i,) for i in range(len(sizes))], sizes, pooled, seen.append, threads=3, budget=50)
    assert sorted(seen) == sorted(sizes)
    assert all(n.startswith("dsv4-load") for n in on_pool)
    assert 15 <= peak[0] <= 50  # reads overlapped, never more than the budget (the oversized job ran alone)
    assert not first_two.broken
    assert alone == [60]


def test_a_failure_on_a_reading_thread_stops_the_load():
    started = []

    def work(job):
        started.append(job[0])
        if job[0] == 2:
            raise CheckpointError("x.safetensors: truncated")
        time.sleep(0.02)

    n = 200
    with pytest.raises(CheckpointError, match="truncated"):
        loader._run_jobs(work, [(i,) for i in range(n)], [1] * n, [True] * n, lambda _: None, threads=2, budget=4)
    assert len(started) < n  # what had not started was not run


def test_truncated_checkpoint_is_a_clear_error_with_threads(published, tmp_path, monkeypatch):
    import shutil

    d = tmp_path / "trunc"
    shutil.copytree(published, d)
    last = sorted(d.glob("*.safetensors"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 64])
    with pytest.raises(CheckpointError, match=rf"{last.name}.*truncated"):
        _load(d, "4", monkeypatch, weights_dtype="checkpoint")


@pytest.mark.parametrize("bad", ["0", "-2", "four", "65", ""])
def test_bad_thread_setting_is_refused_by_name(published, monkeypatch, bad):
    with pytest.raises(CheckpointError, match=rf"{READ_THREADS_ENV} must be a whole number from 1 to 64, got"):
        _load(published, bad, monkeypatch)
