"""Work units for pytest-xdist (`make test` runs `-n 2 --dist loadscope --no-loadscope-reorder`).

With `--dist loadscope`, `pytest_xdist_make_scheduler` below makes each test module one unit of work (its
module-scoped fixtures — a served model, a written checkpoint — are built once, on one worker) and all e2e tests
one unit: one worker brings the local cluster up once and runs them all (two workers sharing the cluster would
each run an operator, and the first to finish would bring the cluster down under the other) while the other
worker(s) run the rest. The e2e tests are collected first, so (without reordering) their unit is handed out
first: it is the longest. xdist's own `--dist loadgroup` marks do not work with pytest 9.2 (xdist 3.8 renames
`item._nodeid`, which pytest no longer reads).
"""

from __future__ import annotations

import pytest

E2E_UNIT = "e2e"


def work_unit_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return E2E_UNIT if path.startswith("e2e/") else path


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=lambda item: work_unit_of(item.nodeid) != E2E_UNIT)  # stable: e2e first, the rest in order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrE2EScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit_of(nodeid)

    return ModuleOrE2EScheduling(config, log)
