"""CPU of one audit ingest round (``HomeRuntime.ingest``), the work the background ingest thread
does every ``ingest_interval_ms`` and every read does first.

Cases, each with the store not held and held (``Database.hold``): ``idle`` (journals grew, but
another process already ingested it all: this process's stat check says "pending" and the round
finds nothing new), ``1 rec`` and ``1000 rec`` (that many new records). CPU is the whole
process's (``getrusage``: DuckDB's threads too), the median over ``--repeats`` rounds, on a
ledger preloaded with ``--ledger`` records (so work that grows with the ledger shows).

Usage: ``PYTHONPATH=<tree>/src .venv/bin/python bench/ingest_round.py [--compare OLD_SRC]``;
``--compare`` runs the script on ``OLD_SRC`` and on this tree alternately (twice each) and
prints the before/after table with ratios; ``--profile CASE`` prints a cProfile (CPU timer) of
that case instead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("idle", "1 rec", "1000 rec")


def _cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1e3


def _prepare(led, rt, case: str) -> None:
    """Make the journals hold what ``case`` ingests."""
    n = {"idle": 1, "1 rec": 1, "1000 rec": 1000}[case]
    for _ in range(n):
        led.encrypt("k", b"x" * 32)
    rt.journal.seal()
    if case == "idle":  # ingested as if by another process: this one's stat check is stale
        known = dict(rt._known_offsets)
        rt.ingest()
        rt._known_offsets.clear()
        rt._known_offsets.update({j: 0 for j in known})


def measure(ledger: int, repeats: int, profile: str | None) -> dict[str, float]:
    import keyledger as kl

    root = Path(tempfile.mkdtemp(prefix="keyledger-ingest-round-", dir="/tmp"))
    out: dict[str, float] = {}
    try:
        with kl.open(root / "home", principal="alice") as led:
            rt = led._rt
            rt.stop_background_ingest()
            led.create_key("k", spec="AES_256")
            for _ in range(ledger // 1000):
                for _ in range(1000):
                    led.encrypt("k", b"x" * 32)
                rt.ingest()
            for held in (False, True):
                with rt.db.hold() if held else contextlib.nullcontext():
                    for case in CASES:
                        name = f"{case}, {'held' if held else 'not held'}"
                        samples = []
                        for _ in range(repeats):
                            _prepare(led, rt, case)
                            if profile == name:
                                prof = cProfile.Profile(time.process_time)
                                prof.runcall(rt.ingest)
                                pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
                            c0 = _cpu_ms()
                            rt.ingest()
                            samples.append(_cpu_ms() - c0)
                        out[name] = statistics.median(samples)
            assert led.verify_audit().ok
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def compare(old: str, args: argparse.Namespace) -> None:
    trees = {"before": old, "after": str(Path(__file__).resolve().parents[1] / "src")}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for _ in range(2):
        for label, tree in trees.items():
            cmd = [sys.executable, __file__, "--json", "--ledger", str(args.ledger),
                   "--repeats", str(args.repeats)]
            env = {**os.environ, "PYTHONPATH": tree}
            runs[label].append(json.loads(subprocess.run(cmd, env=env, check=True,
                                                         capture_output=True, text=True).stdout))
    print(f"CPU ms per ingest round (median of {args.repeats}, ledger of {args.ledger} records; "
          "before/after interleaved, best of 2 runs)")
    print(f"{'case':28s} {'before':>8s} {'after':>8s} {'after/before':>13s}")
    for name in runs["before"][0]:
        b = min(r[name] for r in runs["before"])
        a = min(r[name] for r in runs["after"])
        print(f"{name:28s} {b:8.1f} {a:8.1f} {a / b:13.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ledger", type=int, default=10_000, help="records preloaded (10000)")
    p.add_argument("--repeats", type=int, default=5, help="rounds per case (5)")
    p.add_argument("--compare", metavar="OLD_SRC", help="before/after against another tree")
    p.add_argument("--profile", metavar="CASE", help='e.g. "idle, not held"')
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.compare:
        compare(args.compare, args)
        return
    res = measure(args.ledger, args.repeats, args.profile)
    if args.json:
        print(json.dumps(res))
    else:
        for name, ms in res.items():
            print(f"{name:28s} {ms:8.1f} ms CPU")


if __name__ == "__main__":
    main()
