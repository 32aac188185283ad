"""keyledger benchmark: admin work in one process (create_key, rotate) at 100 and 1,000 keys.

For each size, a home with N AES-256 keys (built once with ``keep_store_open()``; ``--homes``
keeps the built homes for the next run, so runs of different code can share them), then
alternating rounds of:

* bare: python-pkcs11 ``generate_key`` of a token AES-256 key (``store=True``) on a second
  session of the same token (the HSM work a create or a rotation must do), holding
  ``keyledger.hsm.pkcs11_backend._CALL_LOCK``; the keys are destroyed afterwards;
* create held / rotate held: ``create_key`` / ``rotate`` inside ``keep_store_open()``;
* create plain / rotate plain: the same with the store opened per transaction.

Each op is timed alone; a row is the median ms per op over all rounds, a ratio the median of
the per-round ratios (op / bare). The issue's goal: held create and rotate at most 3x bare at
1,000 keys, and the same ratio at 100 and 1,000 keys.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import log, machine_info  # noqa: E402  (bench/run.py: CPU, versions, commit)

WAYS = ("bare", "create_held", "rotate_held", "create_plain", "rotate_plain")


def build(home: Path, n: int) -> None:
    """A home with ``n`` AES keys ``k-0`` ... (skipped when ``home`` has them already)."""
    with kl.open(home, principal="alice") as led:
        have = len(led.list_keys())
        if have >= n:
            return
        t0 = time.perf_counter()
        with led.keep_store_open():
            for i in range(have, n):
                led.create_key(f"k-{i}", spec="AES_256")
        log(f"built {home.name}: {n - have} keys in {time.perf_counter() - t0:.1f} s")


def per_op(fn: Callable[[int], object], ops: int) -> list[float]:
    """Milliseconds of each of ``ops`` calls ``fn(i)``."""
    out = []
    for i in range(ops):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def bench(home: Path, n: int, ops: int, rounds: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    with kl.open(home, principal="alice") as led:
        with _CALL_LOCK:  # a second session on the logged-in token (login is per process)
            session = led._rt.backend._token.open(rw=True)
        made: list = []

        def bare(_: int) -> None:
            with _CALL_LOCK:
                made.append(session.generate_key(KeyType.AES, 256, id=uuid.uuid4().bytes,
                                                 label="bench-admin-bare", store=True))

        def create(way: str, r: int) -> Callable[[int], object]:
            return lambda i: led.create_key(f"new-{tag}-{way}-{r}-{i}", spec="AES_256")

        def rotate(_: int) -> object:
            return led.rotate(f"k-{int.from_bytes(os.urandom(4)) % n}")

        samples: dict[str, list[float]] = {w: [] for w in WAYS}
        per_round: dict[str, list[float]] = {w: [] for w in WAYS}
        try:
            for r in range(rounds):
                runs = {
                    "bare": lambda: per_op(bare, ops),
                    "create_held": lambda r=r: _held(led, create("h", r), ops),
                    "rotate_held": lambda: _held(led, rotate, ops),
                    "create_plain": lambda r=r: per_op(create("p", r), ops),
                    "rotate_plain": lambda: per_op(rotate, ops),
                }
                for way in WAYS:
                    got = runs[way]()
                    samples[way] += got
                    per_round[way].append(statistics.median(got))
                log(f"{n} keys, round {r + 1}: " + "  ".join(
                    f"{w} {per_round[w][-1]:.1f}" for w in WAYS) + " ms/op")
        finally:
            with _CALL_LOCK:
                for key in made:
                    key.destroy()
                session.close()
    ratios = {w: statistics.median(x / b for x, b in zip(per_round[w], per_round["bare"],
                                                          strict=True))
              for w in WAYS if w != "bare"}
    return {"keys": n, "ops": ops, "rounds": rounds,
            "ms_per_op": {w: statistics.median(v) for w, v in samples.items()},
            "vs_bare": ratios}


def _held(led: kl.KeyLedger, fn: Callable[[int], object], ops: int) -> list[float]:
    """Per-op times inside one ``keep_store_open()`` block (its open and close not counted,
    as in a long-running process)."""
    with led.keep_store_open():
        fn(-1)  # the first call after the open pays DuckDB's warm-up: not timed
        return per_op(fn, ops)


def render(results: list[dict], machine: dict) -> str:
    lines = [f"admin work, keyledger {kl.__version__} from {Path(kl.__file__).parent} "
             f"(load {machine['loadavg_end']:.2f})"]
    for res in results:
        ms, x = res["ms_per_op"], res["vs_bare"]
        lines.append(f"{res['keys']} keys ({res['rounds']} rounds x {res['ops']} ops):")
        lines.append(f"  bare python-pkcs11 AES keygen (store=True) {ms['bare']:7.1f} ms/op")
        for way, label in (("create_held", "create_key, store held"),
                           ("rotate_held", "rotate, store held"),
                           ("create_plain", "create_key, store per transaction"),
                           ("rotate_plain", "rotate, store per transaction")):
            lines.append(f"  {label:<42} {ms[way]:7.1f} ms/op  {x[way]:5.2f}x bare")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        for way in ("create_held", "rotate_held"):
            lines.append(f"  {way} ratio at {hi['keys']} / at {lo['keys']} keys: "
                         f"{hi['vs_bare'][way] / lo['vs_bare'][way]:.2f}")
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
    try:
        results = []
        for n in sizes:
            build(root / f"home-{n}", n)
            results.append(bench(root / f"home-{n}", n, args.ops, args.rounds))
    finally:
        if args.homes is None:
            shutil.rmtree(root, ignore_errors=True)
    machine = machine_info()
    machine["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps({"machine": machine, "results": results}, indent=2, default=str)
          if args.json else render(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
