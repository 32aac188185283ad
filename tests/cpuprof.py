"""Per-test CPU for finding where `make test`'s time goes (docs/operations.md).

Load it with ``make test PYTEST_ADDOPTS="-p cpuprof" PYTHONPATH=tests
KEYLEDGER_TEST_PROFILE=/tmp/prof``: each worker writes ``rows-<worker>.json`` there, one row per
test (node id, CPU seconds of the worker, CPU seconds of the children it reaped meanwhile, wall
seconds); ``python scripts/test_profile.py /tmp/prof`` sums them per module. Off unless loaded.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_rows: list[tuple[str, float, float, float]] = []


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    own, children = _cpu()
    start = time.perf_counter()
    yield
    own2, children2 = _cpu()
    _rows.append((item.nodeid, own2 - own, children2 - children, time.perf_counter() - start))


def pytest_sessionfinish(session: pytest.Session) -> None:
    folder = os.environ.get("KEYLEDGER_TEST_PROFILE")
    if not folder or not _rows:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rows-{worker}.json").write_text(json.dumps(_rows))
