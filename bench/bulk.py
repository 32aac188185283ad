"""keyledger benchmark: bulk admin work, with and without ``KeyLedger.keep_store_open()``.

One process, one fresh temporary SoftHSM2 home (removed at the end). Each round creates
``--n`` AES-256 keys three ways, alternating so machine noise hits all alike:

* bare: ``generate_key`` of a token AES-256 key straight through python-pkcs11 on a second
  session of the same token (the HSM work a create must do), holding
  ``keyledger.hsm.pkcs11_backend._CALL_LOCK`` for the loop;
* plain: ``create_key`` + ``grant`` (user) per key, each call in its own short store
  transaction (the file is opened and closed every time, as the store always does);
* held: the same calls inside ``with led.keep_store_open():``.

Reported: milliseconds per key (median over rounds) and the ratios plain / bare, held / bare and
plain / held (medians of the per-round ratios).

Usage: ``.venv/bin/python bench/bulk.py [--n 50] [--rounds 3] [--json]``
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


def timed(fn: Callable[[], None], n: int) -> float:
    """Milliseconds per key of ``fn`` (which makes ``n`` keys)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000 / n


def bench(led: kl.KeyLedger, n: int, rounds: int) -> dict:
    with _CALL_LOCK:  # a second session on the logged-in token (login state is per process)
        session = led._rt.backend._token.open(rw=True)
    made: list = []

    def bare() -> None:
        with _CALL_LOCK:
            for _ in range(n):
                made.append(session.generate_key(KeyType.AES, 256, id=uuid.uuid4().bytes,
                                                 label="bench-bulk-bare", store=True))

    def calls(tag: str) -> None:
        for i in range(n):
            name = f"{tag}-{i}"
            led.create_key(name, spec="AES_256")
            led.grant(name, "svc-bench", "user")

    def held(tag: str) -> None:
        with led.keep_store_open():
            calls(tag)

    rows: dict[str, list[float]] = {"bare": [], "plain": [], "held": []}
    try:
        for r in range(rounds):
            rows["bare"].append(timed(bare, n))
            rows["plain"].append(timed(lambda r=r: calls(f"plain-{r}"), n))
            rows["held"].append(timed(lambda r=r: held(f"held-{r}"), n))
            log(f"round {r + 1}: bare {rows['bare'][-1]:.1f}  plain {rows['plain'][-1]:.1f}  "
                f"held {rows['held'][-1]:.1f} ms/key")
            led.flush_audit()
    finally:
        with _CALL_LOCK:
            for key in made:
                key.destroy()
            session.close()

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rows[a], rows[b], strict=True))

    return {"ms_per_key": {k: statistics.median(v) for k, v in rows.items()},
            "plain_vs_bare": ratio("plain", "bare"), "held_vs_bare": ratio("held", "bare"),
            "plain_vs_held": ratio("plain", "held"), "keys_per_round": n, "rounds": rounds}


def render(res: dict) -> str:
    b = res["bulk"]
    ms = b["ms_per_key"]
    return "\n".join([
        f"bulk admin work: {b['keys_per_round']} keys x {b['rounds']} rounds "
        f"(load {res['machine']['loadavg_end']:.2f})",
        f"  bare python-pkcs11 generate_key      {ms['bare']:7.1f} ms/key",
        f"  create_key + grant                   {ms['plain']:7.1f} ms/key  "
        f"({b['plain_vs_bare']:.1f}x bare)",
        f"  the same in keep_store_open()        {ms['held']:7.1f} ms/key  "
        f"({b['held_vs_bare']:.1f}x bare)",
        f"  keep_store_open() speed-up           {b['plain_vs_held']:7.1f}x",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50, help="keys per way and round (50)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians (3)")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    args = p.parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        p.error("--n and --rounds must be positive")
    root = Path(tempfile.mkdtemp(prefix="keyledger-bench-bulk-", dir="/tmp"))
    try:
        res: dict = {"machine": machine_info(), "params": vars(args)}
        with kl.open(root / "home", principal="alice") as led:
            res["bulk"] = bench(led, args.n, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2, default=str) if args.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
