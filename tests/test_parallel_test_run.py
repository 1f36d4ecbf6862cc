"""`make test` runs pytest-xdist with the work units of the root conftest.py: every e2e test in one unit (one
worker owns the shared local cluster), every other module its own unit, the e2e unit handed out first."""

from __future__ import annotations

import re
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_tests_share_one_unit_and_other_modules_are_their_own():
    assert {conftest.work_unit_of(n) for n in ("e2e/tests/test_e2e_cluster.py::test_a",
                                                "e2e/tests/test_e2e_scenario.py::test_b[x-1]")} == {"e2e"}
    assert conftest.work_unit_of("tests/test_cache_spec.py::test_c[p-1]") == "tests/test_cache_spec.py"
    assert conftest.work_unit_of("tests/test_cache_spec.py::T::test_d") == "tests/test_cache_spec.py"


def test_make_test_uses_the_scheduler_that_knows_the_units():
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "no test target in the Makefile"
    pytest_line = next(line for line in recipe.group(1).splitlines() if "pytest" in line)
    # conftest.pytest_xdist_make_scheduler applies to --dist loadscope only; reordering would move e2e
    assert "--dist loadscope" in pytest_line and "--no-loadscope-reorder" in pytest_line, pytest_line


def test_collection_puts_the_e2e_tests_first():
    class Item:
        def __init__(self, nodeid: str) -> None:
            self.nodeid = nodeid

    items = [Item("tests/test_a.py::t1"), Item("e2e/tests/test_x.py::t2"), Item("tests/test_b.py::t3"),
             Item("e2e/tests/test_y.py::t4")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["e2e/tests/test_x.py::t2", "e2e/tests/test_y.py::t4",
                                         "tests/test_a.py::t1", "tests/test_b.py::t3"]
