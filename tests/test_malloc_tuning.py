"""runtime/malloc_tuning.py: with the glibc settings, a step whose temporaries grow a little each time reuses
freed heap memory instead of faulting fresh pages in (what a long-context prefill does)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

STEPS = r"""
import resource, sys, torch
from dsv4.runtime import malloc_tuning as m
if sys.argv[1] == "tuned":
    assert m.keep_freed_memory() is True and m.keep_freed_memory() is True  # applied, idempotent
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n, steady = 2**20, []
for i in range(40):
    f0 = faults()
    n += 2**15                        # the step's tables grow with the context: 4 MiB -> 9 MiB
    a = torch.ones(n); b = torch.ones(n) + a; c = torch.cat([a, b]); d = c * 2
    del a, b, c, d
    if i >= 20:
        steady.append(faults() - f0)
print(sum(steady) / len(steady))
"""


def faults_per_step(mode: str) -> float:
    r = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return float(r.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_growing_step_temporaries_reuse_freed_memory() -> None:
    default, tuned = faults_per_step("default"), faults_per_step("tuned")
    # default glibc trims the freed heap top and re-faults ~32 MiB of pages per step (~8,200 faults);
    # tuned, only the growth itself (~1.5 MiB per step, ~400 faults) is new
    assert default > 4000, default
    assert tuned < default / 10, (tuned, default)


def test_keep_freed_memory_reports_false_without_mallopt(monkeypatch) -> None:
    from dsv4.runtime import malloc_tuning as m

    class NoLibc:
        def __init__(self, _name):
            raise OSError("no libc here")

    monkeypatch.setattr(m, "_applied", None)
    monkeypatch.setattr(ctypes, "CDLL", NoLibc)
    assert m.keep_freed_memory() is False
    monkeypatch.setattr(m, "_applied", None)  # the next caller finds the real state again
