"""A living demo estate: ~150 keys, 8 teams and 18 months of history, seeded through the public API.

    from keyledger.demo_fleet import seed_demo
    result = seed_demo("demo-home")        # ~1 M audit records; `keyledger demo` on the CLI
    print(result)                          # keys by state, records, findings, who to log in as

Nothing is written to the store directly: every key, grant, rotation, compromise, deletion,
approval, backup and the daily traffic of the services is a call to ``keyledger.open(home,
principal=..., clock=sim)``, made at a simulated time (``sim`` is a clock this module moves
forward). The history ends at the real current time, so a dashboard opened right after seeding
shows activity in the last 24 hours.

What the estate contains (see docs/demo.md): keys of every spec across eight teams with owners
and ``team=``/``env=``/``data=`` tags; rotation by ``run_due`` (a weekly job, by period and by
usage limit) and by hand (early rotations); a few keys whose rotation was neglected (overdue at
the end); a key near its usage limit; a key compromised, replaced and re-encrypted, and one
compromised a few days ago and not replaced yet; keys destroyed (one with dual control), pending
deletion, suspended and waiting in pre-activation; a destroy request with one approval of two;
an admin who is also a user of one key; a stale key; a backup and a restore test; weekly
compliance evaluations; denied calls and failed decrypts.

Deterministic: the same ``seed``, ``keys``, ``months`` and ``end`` give the same key names,
specs, states and counts (``end`` defaults to now; the weekly rhythm follows the calendar).

The package: ``plan`` (teams, keys and their parts in the story; pure), ``story`` (the
lifecycle events), ``traffic`` (the daily usage calls), ``workers`` (the processes that make
them), ``sim`` (the clock and the day-by-day loop), ``metrics`` (what was measured and read
back) and ``result`` (``DemoResult`` and ``demo.json``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from ..errors import ConfigError, InvalidInput
from .metrics import read_back
from .plan import (
    AUDITOR,
    DAYS_PER_MONTH,
    DEVELOPERS,
    MAX_KEYS,
    MAX_MONTHS,
    MIN_KEYS,
    MIN_MONTHS,
    PLATFORM_ADMIN,
    SECURITY_LEAD,
    TEAMS,
    Team,
)
from .result import (
    DEMO_FILE,
    EXPECTED,
    DemoResult,
    Sample,
    demo_doc,
    read_demo_file,
    result_from_file,
    summary_lines,
    write_demo_file,
)
from .sim import Simulation
from .story import DEMO_PASSPHRASE


def _check_args(keys: object, months: object, seed: object) -> None:
    for value, name, lo, hi in ((keys, "keys", MIN_KEYS, MAX_KEYS),
                                (months, "months", MIN_MONTHS, MAX_MONTHS)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidInput(f"{name} must be a whole number from {lo} to {hi}, not {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"seed must be a whole number, not {seed!r}")


def seed_demo(home: str | os.PathLike, *, keys: int = 150, months: int = 18, seed: int = 7,
              progress: bool = True, force: bool = False, end: datetime | None = None,
              echo: Callable[[str], object] | None = print, workers: int = 2) -> DemoResult:
    """Seed a demo estate into ``home`` (a new or empty folder) and return what was built.

    ``keys`` (20..2000) across eight teams, ``months`` (2..60) of history ending at ``end``
    (default: now, UTC), ``seed`` for ``random.Random``. A progress bar goes to stderr when it
    is a terminal and ``progress`` is true; ``echo`` prints the summary (``None``: silent).
    ``workers`` processes make the usage calls (0: this process); lifecycle events always run
    here, between their batches of calls.

    A home seeded before (its ``demo.json`` says so) is not seeded again: the result describes
    it, with ``already_seeded=True``. ``force=True`` deletes a demo home (one with
    ``demo.json``; never another folder) and its ``<home>-backups`` folder and seeds anew.
    """
    _check_args(keys, months, seed)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 8:
        raise InvalidInput(f"workers must be a whole number from 0 to 8, not {workers!r}")
    path = Path(home).expanduser().absolute()
    doc = read_demo_file(path) if path.is_dir() else None
    if doc is not None and not force:
        if doc.get("status") == "complete":
            result = result_from_file(path, doc)
            if echo is not None:
                echo("\n".join(summary_lines(result)))
                echo("  (use --force to delete it and seed again)")
            return result
        raise ConfigError(f"{path} holds a demo whose seeding did not finish; run again with "
                          "--force (force=True) to delete it and start over")
    if path.exists() and doc is None and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} exists and is not a demo home (no {DEMO_FILE}); the demo "
                          "seeds a new or empty folder only - choose another --home")
    if end is None:
        end = datetime.now(UTC).replace(microsecond=0)
    elif not isinstance(end, datetime) or end.tzinfo is None:
        raise InvalidInput("end must be a timezone-aware datetime")
    end = end.astimezone(UTC)
    if doc is not None:  # force: a demo home, ours to delete
        shutil.rmtree(path)
        backups = path.parent / f"{path.name}-backups"
        if backups.is_dir():
            shutil.rmtree(backups)
    started = time.perf_counter()
    sim = Simulation(path, keys, months, seed, end, progress, workers)
    path.mkdir(parents=True, exist_ok=True)
    try:
        sim.run()
        result = read_back(sim)
    finally:
        sim.close()
    if sim.backups_dir.is_dir() and not any(sim.backups_dir.iterdir()):
        sim.backups_dir.rmdir()
    result.seconds = time.perf_counter() - started
    write_demo_file(path, demo_doc(result))
    if echo is not None:
        echo("\n".join(summary_lines(result)))
    return result


__all__ = ["AUDITOR", "DAYS_PER_MONTH", "DEMO_FILE", "DEMO_PASSPHRASE", "DEVELOPERS", "EXPECTED",
           "MAX_KEYS", "MAX_MONTHS", "MIN_KEYS", "MIN_MONTHS", "PLATFORM_ADMIN", "SECURITY_LEAD",
           "TEAMS", "DemoResult", "Sample", "Team", "seed_demo", "summary_lines"]
