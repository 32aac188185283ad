"""In-process A/B of hot-path variants, timed in the real HSM loop (issue 18, docs/benchmarks.md).

Costs inside the audited call's loop are not what a tight loop of the same code shows: between
two HSM calls the caches are cold, and what touches glibc's heap or OpenSSL's state costs
several times its isolated price. So each variant here runs whole audited calls, in 1,000-call
windows that take turns (the order rotates and reverses every round), in one process on one
ledger; a variant's cost is the median of its windows' differences from the baseline window of
the same round ("paired"). Runs across processes move by +-10 % on a 2-core VM; these pairs
move by about +-0.5 us.

Experiments ("timing only": a variant that breaks a guarantee, to price a piece):
- ``hash``: the journal record's chain hash with CPython's SHA-256 (the tree's), OpenSSL's
  (``hashlib.sha256``), and none at all (the record keeps the previous hash: timing only);
- ``record``: the record without its ``write(2)``, with it to /dev/null, without its chain
  hash, its lock or its clock read;
- ``encrypt``: the hot path without the record, the usage check or the catalog refresh check;
- ``datakey``: ``generate_data_key``'s result built as the tree builds it, as a plain tuple,
  through the frozen dataclass's ``__init__``, and as the earlier instance-``__dict__`` object.

Usage: ``PYTHONPATH=src .venv/bin/python bench/inloop.py {hash,record,encrypt,datakey}
[--rounds 40]``; it
makes its own home under /tmp (bench/hotloop.py's set-up) and removes it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keyledger as kl
from keyledger.services import crypto
from keyledger.store import journal

KEY = "bench-aes"
PLAINTEXT = bytes(range(32))
WINDOW = 1_000


def _window(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    for _ in itertools.repeat(None, WINDOW):
        fn()
    return (time.perf_counter() - t0) / WINDOW * 1e6


def _variant(method: Callable, module: types.ModuleType, instance: object, name: str,
             *replacements: tuple[str, str], **extra: object) -> Callable:
    """``method``'s source with each (old, new) of ``replacements`` applied, compiled in
    ``module``'s namespace (plus ``extra``) and bound to ``instance``."""
    src = textwrap.dedent(inspect.getsource(method))
    for old, new in replacements:
        assert old in src, old
        src = src.replace(old, new)
    namespace = dict(vars(module), **extra)
    exec(compile(src, f"<{method.__name__} {name}>", "exec"), namespace)  # noqa: S102 (bench only)
    return types.MethodType(namespace[method.__name__], instance)


_CHAIN_HASH = 'h = _sha256(f"{self._head}{n}{SEP}{t}{fixed[0]}{self._prev}".encode()).hexdigest()'


def _record_variants(led: kl.KeyLedger, variants: dict[str, tuple[tuple[str, str], ...]]
                     ) -> dict[str, Callable[[], object]]:
    """``encrypt`` calls whose journal writer's ``append_ok`` is each variant in turn."""
    writer = led._rt.journal  # noqa: SLF001 (a benchmark swaps the writer's method)
    dev_null = os.open(os.devnull, os.O_WRONLY)  # (closed with the process)
    methods = {name: _variant(journal.JournalWriter.append_ok, journal, writer, name, *reps,
                              _openssl_sha256=hashlib.sha256, _dev_null=dev_null)
               for name, reps in variants.items()}

    def call(method: Callable) -> Callable[[], object]:
        def run() -> object:
            writer.append_ok = method
            return led.encrypt(KEY, PLAINTEXT)
        return run

    return {name: call(method) for name, method in methods.items()}


def hash_variants(led: kl.KeyLedger) -> dict[str, Callable[[], object]]:
    return _record_variants(led, {
        "CPython SHA-256 (tree)": (),
        "OpenSSL SHA-256": (("_sha256(f", "_openssl_sha256(f"),),
        "no hash (timing only)": ((_CHAIN_HASH, "h = self._prev"),),
    })


def record_variants(led: kl.KeyLedger) -> dict[str, Callable[[], object]]:
    write = "os.write(self._fd, line)"
    return _record_variants(led, {
        "the tree's record": (),
        "no write(2) (timing only)": ((write, "pass"),),
        "write(2) to /dev/null": ((write, "os.write(_dev_null, line)"),),
        "no chain hash (timing only)": ((_CHAIN_HASH, "h = self._prev"),),
        "no journal lock (timing only)": (("with self._lock:", "if True:"),),
        "no clock read (timing only)": (("now = time.time_ns() // 1000",
                                         "now = self._trusted_us + 1"),),
    })


def encrypt_variants(led: kl.KeyLedger) -> dict[str, Callable[[], object]]:
    service = led._crypto  # noqa: SLF001 (a benchmark runs variants of the hot path)
    variants = {
        "the tree's encrypt": (),
        "no journal record (timing only)": (("rt.journal.append_ok(calls[action])", "pass"),),
        "no usage check (timing only)": (("if (block is None", "if False and (block is None"),),
        "no catalog refresh check (timing only)": ((
            "if _monotonic() - catalog.checked >= catalog.refresh_s:", "if False:"),),
    }
    methods = {name: _variant(crypto.CryptoService._encrypt_now, crypto, service, name, *reps)
               for name, reps in variants.items()}

    def call(method: Callable) -> Callable[[], object]:
        def run() -> object:
            done = method("encrypt", KEY, PLAINTEXT, None)
            if done is None:  # the full path's turn: this would time nothing
                raise SystemExit("the hot path was not taken; warm the ledger up first")
            return done
        return run

    return {name: call(method) for name, method in methods.items()}


def datakey_variants(led: kl.KeyLedger) -> dict[str, Callable[[], object]]:
    service = led._crypto  # noqa: SLF001 (the variants reuse the hot path's first half)
    urandom, encrypt_now, new = crypto._urandom, service._encrypt_now, object.__new__  # noqa: SLF001
    data_key = crypto.DataKey

    def make(kind: str) -> Callable[[], object]:
        def run() -> object:
            plaintext = urandom(32)
            done = encrypt_now("generate_data_key", KEY, plaintext, None)
            plan = done[1]
            if kind == "tuple":
                return (plaintext, done[0], plan.key.name, plan.version.version)
            if kind == "init":
                return data_key(plaintext, done[0], plan.key.name, plan.version.version)
            obj = new(_DictDataKey)  # the earlier tree's way: an instance __dict__ set at once
            object.__setattr__(obj, "__dict__", {"plaintext": plaintext, "wrapped": done[0],
                                                 "key": plan.key.name,
                                                 "version": plan.version.version})
            return obj
        return run

    return {"generate_data_key (tree)": lambda: led.generate_data_key(KEY),
            "a plain tuple": make("tuple"), "frozen dataclass __init__": make("init"),
            "instance __dict__ (before)": make("dict")}


@dataclass(frozen=True)
class _DictDataKey:
    """The earlier ``DataKey`` layout: a frozen dataclass with an instance ``__dict__``."""

    plaintext: bytes
    wrapped: bytes
    key: str
    version: int


EXPERIMENTS = {"hash": hash_variants, "record": record_variants,
               "encrypt": encrypt_variants, "datakey": datakey_variants}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--rounds", type=int, default=40, help="windows per variant (40)")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hotloop import main as hotloop

    root = Path(tempfile.mkdtemp(prefix="keyledger-inloop-", dir="/tmp"))
    try:
        hotloop("setup", root / "home", 0)
        with kl.open(root / "home", principal="alice") as led:
            led.encrypt(KEY, PLAINTEXT)  # each action's hot-path entry exists from here on
            led.generate_data_key(KEY)
            variants = EXPERIMENTS[args.experiment](led)
            for fn in variants.values():  # warm every variant's caches
                for _ in range(300):
                    fn()
            names = list(variants)
            windows: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order if r % 2 == 0 else reversed(order):
                    windows[name].append(_window(variants[name]))
            vars(led._rt.journal).pop("append_ok", None)  # noqa: SLF001 (the class's again)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = windows[names[0]]
    print(f"{args.experiment}: {args.rounds} windows of {WINDOW:,} calls per variant, "
          f"in turns, one process")
    print(f"{'variant':40s} {'median us':>10s} {'paired vs first':>16s}")
    for name in names:
        paired = statistics.median(a - b for a, b in zip(windows[name], base, strict=True))
        print(f"{name:40s} {statistics.median(windows[name]):10.2f} {paired:+16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
