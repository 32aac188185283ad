"""keyledger benchmark: admin work in one process (create_key, rotate) at 100 and 1,000 keys.

For each size, a copy of a home with exactly N AES-256 keys ``k-0`` ... (built once with
``keep_store_open()``; ``--homes DIR`` keeps the built homes for later runs, so runs of
different code, e.g. with ``PYTHONPATH`` pointing at another tree, measure the same homes),
then rounds of:

* inside ``keep_store_open()`` (the store held, as in a long-running process), per op:
  bare, then ``create_key``, then ``rotate`` of a random ``k-i``;
* with the store opened per transaction: bare, ``create_key``, ``rotate``.

bare = python-pkcs11 ``generate_key`` of a token AES-256 key (``store=True``) on a second
session of the same token (the HSM work a create or a rotation must do), holding
``keyledger.hsm.pkcs11_backend._CALL_LOCK``; those keys are destroyed at the end. Each op is
timed alone, wall and process CPU time; a row is the median over all rounds, a ratio the
median over rounds of (the way's median / the bare median of the same phase). The issue's goal:
create and rotate with the store held at most 3x bare at 1,000 keys, and the same ratio at
100 and 1,000 keys ("flatness", 1.0 = flat).

Usage: ``PYTHONPATH=src .venv/bin/python bench/admin.py [--sizes 100,1000] [--ops 8]
[--rounds 3] [--homes DIR] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pkcs11 import KeyType

import keyledger as kl
from keyledger.hsm.pkcs11_backend import _CALL_LOCK
from keyledger.hsm.softhsm import softhsm_conf_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import log, machine_info  # noqa: E402  (bench/run.py: CPU, versions, commit)

WAYS = ("bare", "create_held", "rotate_held", "create_plain", "rotate_plain")


def build(template: Path, n: int) -> None:
    """A home with exactly ``n`` AES keys ``k-0`` ... (made once: kept when it exists)."""
    if (template / "keyledger.toml").exists():
        return
    partial = template.with_name(template.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    with kl.open(partial, principal="alice") as led, led.keep_store_open():
        for i in range(n):
            led.create_key(f"k-{i}", spec="AES_256")
    partial.rename(template)
    (template / "softhsm2.conf").write_text(softhsm_conf_text(template / "tokens"))
    log(f"built {template.name}: {n} keys in {time.perf_counter() - t0:.1f} s")


def copy_of(template: Path, home: Path) -> Path:
    """A copy of the template (each run measures on exactly N keys; the runs add keys and
    versions); the SoftHSM2 config names its token dir by absolute path, so it is pointed at
    the copy's own tokens, as a restore does."""
    shutil.copytree(template, home, symlinks=True, ignore=shutil.ignore_patterns("run"))
    (home / "softhsm2.conf").write_text(softhsm_conf_text(home / "tokens"))
    return home


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, CPU ms) of one call; CPU time is the whole process's (DuckDB's threads and
    SoftHSM included), so it says what a call costs even while other processes compete for
    the cores; wall time also counts waiting for the disk (DuckDB's commit, SoftHSM's files)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w0) * 1000, (time.process_time() - c0) * 1000


def bench(home: Path, n: int, ops: int, rounds: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    with kl.open(home, principal="alice") as led:
        with _CALL_LOCK:  # a second session on the logged-in token (login is per process)
            session = led._rt.backend._token.open(rw=True)
        made: list = []
        count = iter(range(1 << 30))

        def bare() -> None:
            with _CALL_LOCK:
                made.append(session.generate_key(KeyType.AES, 256, id=uuid.uuid4().bytes,
                                                 label="bench-admin-bare", store=True))

        def create() -> object:
            return led.create_key(f"new-{tag}-{next(count)}", spec="AES_256")

        def rotate() -> object:
            return led.rotate(f"k-{int.from_bytes(os.urandom(4)) % n}")

        # per round and way: (wall, cpu) of each op; each op of a way follows a bare keygen,
        # so the two meet the same machine load
        got: dict[str, list[tuple[float, float]]] = {w: [] for w in (*WAYS, "bare_plain")}
        per_round: list[dict[str, tuple[float, float]]] = []
        try:
            for r in range(rounds):
                this: dict[str, list[tuple[float, float]]] = {w: [] for w in got}
                with led.keep_store_open():
                    create(), rotate()  # the first calls after the open warm DuckDB up
                    for _ in range(ops):
                        this["bare"].append(timed(bare))
                        this["create_held"].append(timed(create))
                        this["rotate_held"].append(timed(rotate))
                for _ in range(ops):
                    this["bare_plain"].append(timed(bare))
                    this["create_plain"].append(timed(create))
                    this["rotate_plain"].append(timed(rotate))
                for w, v in this.items():
                    got[w] += v
                per_round.append({w: _medians(v) for w, v in this.items()})
                log(f"{n} keys, round {r + 1}: " + "  ".join(
                    f"{w} {per_round[-1][w][0]:.1f}" for w in WAYS) + " ms/op (wall)")
        finally:
            with _CALL_LOCK:
                for key in made:
                    key.destroy()
                session.close()

    def ratio(way: str, i: int) -> float:
        base = "bare" if way.endswith("held") else "bare_plain"  # the same phase's bare
        return statistics.median(rd[way][i] / rd[base][i] for rd in per_round)

    return {"keys": n, "ops": ops, "rounds": rounds,
            "ms_per_op": {w: _medians(v)[0] for w, v in got.items()},
            "cpu_ms_per_op": {w: _medians(v)[1] for w, v in got.items()},
            "vs_bare": {w: ratio(w, 0) for w in WAYS if w != "bare"}}


def _medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def render(results: list[dict], machine: dict) -> str:
    lines = [f"admin work, keyledger {kl.__version__} from {Path(kl.__file__).parent} "
             f"(load {machine['loadavg_end']:.2f})"]
    for res in results:
        ms, x = res["ms_per_op"], res["vs_bare"]
        cpu = res["cpu_ms_per_op"]
        lines.append(f"{res['keys']} keys ({res['rounds']} rounds x {res['ops']} ops): "
                     "wall ms/op, ratio to bare (wall) | process CPU ms/op")
        lines.append(f"  {'bare python-pkcs11 AES keygen (store=True)':<42} {ms['bare']:7.1f}"
                     f"            | {cpu['bare']:7.1f}")
        for way, label in (("create_held", "create_key, store held"),
                           ("rotate_held", "rotate, store held"),
                           ("create_plain", "create_key, store per transaction"),
                           ("rotate_plain", "rotate, store per transaction")):
            lines.append(f"  {label:<42} {ms[way]:7.1f} {x[way]:5.2f}x bare | {cpu[way]:7.1f}")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        for way in ("create_held", "rotate_held"):
            lines.append(f"flatness: {way} ratio at {hi['keys']} keys / at {lo['keys']} keys "
                         f"= {hi['vs_bare'][way] / lo['vs_bare'][way]:.2f} (1.00 = flat)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,1000", help="keys in the home (100,1000)")
    p.add_argument("--ops", type=int, default=8, help="timed calls per way and round (8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    p.add_argument("--homes", type=Path, help="keep the built homes here for later runs")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.ops < 1 or args.rounds < 1 or min(sizes) < 1:
        p.error("--sizes, --ops and --rounds must be positive")
    root = args.homes or Path(tempfile.mkdtemp(prefix="keyledger-bench-admin-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="keyledger-bench-admin-run-", dir="/tmp"))
    try:
        results = []
        for n in sizes:
            build(root / f"template-{n}", n)
            home = copy_of(root / f"template-{n}", work / f"home-{n}")
            results.append(bench(home, n, args.ops, args.rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.homes is None:
            shutil.rmtree(root, ignore_errors=True)
    machine = machine_info()
    machine["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps({"machine": machine, "results": results}, indent=2, default=str)
          if args.json else render(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
