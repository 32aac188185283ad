"""Shared fixtures: a fresh home per test on a real SoftHSM2 token and a real DuckDB file."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import keyledger as kl


class FakeClock:
    """An injectable clock: ``clock()`` returns the current simulated UTC time."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now += timedelta(**kwargs)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def ledger(home: Path, clock: FakeClock):
    led = kl.open(home, principal="alice", clock=clock)
    try:
        yield led
    finally:
        led.close()


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter (its own PKCS#11 login and journal)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=check)
