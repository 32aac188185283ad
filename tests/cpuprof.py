"""Per-test CPU for finding where `make test`'s time goes (docs/operations.md).

Load it with ``make test PYTEST_ADDOPTS="-p cpuprof" PYTHONPATH=tests
KEYLEDGER_TEST_PROFILE=/tmp/prof``: each worker writes ``rows-<worker>.json`` there, one row per
test (node id, CPU seconds of the worker, CPU seconds of the children it reaped meanwhile, wall
seconds, start as Unix time), and the controlling process samples the machine's idle CPU every
half second into ``idle.json`` ([Unix time, idle cores] pairs);
``python scripts/test_profile.py /tmp/prof`` sums the rows per module, and with ``--idle`` names
the tests that were running while cores sat idle. Off unless loaded.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_rows: list[tuple[str, float, float, float, float]] = []
_idle: list[tuple[float, float]] = []
_stop = threading.Event()


def _idle_jiffies() -> tuple[float, float]:
    """(idle + iowait jiffies of all CPUs, all jiffies) from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def _sample_idle() -> None:
    cores = os.cpu_count() or 1
    idle, total = _idle_jiffies()
    while not _stop.wait(0.5):
        idle2, total2 = _idle_jiffies()
        if total2 > total:
            _idle.append((time.time(), cores * (idle2 - idle) / (total2 - total)))
        idle, total = idle2, total2


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    own, children = _cpu()
    start, since = time.perf_counter(), time.time()
    yield
    own2, children2 = _cpu()
    _rows.append((item.nodeid, own2 - own, children2 - children, time.perf_counter() - start,
                  since))


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("KEYLEDGER_TEST_PROFILE") and "PYTEST_XDIST_WORKER" not in os.environ:
        threading.Thread(target=_sample_idle, daemon=True, name="idle-sampler").start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    folder = os.environ.get("KEYLEDGER_TEST_PROFILE")
    _stop.set()
    if folder and _idle:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "idle.json").write_text(json.dumps(_idle))
    if not folder or not _rows:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rows-{worker}.json").write_text(json.dumps(_rows))
