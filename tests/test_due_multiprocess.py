"""Must show: nothing runs twice when two processes call ``run_due`` at the same moment.

Two fresh interpreters open the same home with the same fixed clock, wait at a barrier (a file
the parent creates once both are ready) and call ``run_due`` together. Afterwards every due key
has gained exactly one version (counted in the catalog, in the audit ledger and on the token with
``pkcs11-tool``), the due destroy happened once, and the two reports' ``done`` lists are
disjoint and together cover the due work. The loser either saw the lease ("process N is running
due work") or found each item already done when it re-checked under the store lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import FakeClock, hsm_labels
from proc_support import Zygote, zygote_fixture

import keyledger as kl

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_TOOL = shutil.which("pkcs11-tool")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PKCS11_TOOL is None or not os.path.exists(MODULE),
                       reason="needs SoftHSM2 and pkcs11-tool (opensc)"),
]

# the two children are forked from this module's zygote (tests/proc_support.py): separate
# processes (own login, journal, store connection and lease pid), no interpreter start each
zygote = zygote_fixture()

_CHILD = textwrap.dedent("""
    import json, os, time
    from datetime import datetime
    import keyledger as kl
    home, when, ready, go = {home!r}, {when!r}, {ready!r}, {go!r}
    fixed = datetime.fromisoformat(when)
    led = kl.open(home, principal="alice", clock=lambda: fixed)
    open(ready, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("no go signal from the parent")
        time.sleep(0.0005)
    report = led.run_due()
    led.close()
    print(json.dumps({{"pid": os.getpid(), "done": report.done, "skipped": report.skipped}}))
""")

SYMMETRIC = ["aes-1", "aes-2", "aes-3", "aes-4", "mac-1"]
SIGNING = ["ec-1"]


def key_labels(home: Path) -> dict[str, set[str]]:
    """Versions on the token per key name, from labels ``kl:<name>:v<n>``."""
    labels: dict[str, set[str]] = {}
    for value in hsm_labels(home):
        _, name, version = value.split(":")
        labels.setdefault(name, set()).add(version)
    return labels


def race(zygote: Zygote, home: Path, clock: FakeClock, tmp: Path, tag: str) -> list[dict]:
    """Two children call run_due at once; returns their parsed reports."""
    ready = [tmp / f"{tag}-ready-{i}" for i in range(2)]
    go = tmp / f"{tag}-go"
    codes = [_CHILD.format(home=str(home), when=clock().isoformat(), ready=str(r), go=str(go))
             for r in ready]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(zygote.run_python, code, timeout=120) for code in codes]
        deadline = time.monotonic() + 90
        while not all(r.exists() for r in ready):
            if time.monotonic() > deadline or any(f.done() for f in futures):
                break
            time.sleep(0.005)
        go.touch()
        procs = [f.result() for f in futures]
    for p in procs:
        assert p.returncode == 0, p.stderr
    return [json.loads(p.stdout.strip().splitlines()[-1]) for p in procs]


def check_race(reports: list[dict], expected: set[tuple[str, str]]) -> None:
    done_sets = [{(d["action"], d["key"]) for d in r["done"]} for r in reports]
    for r, s in zip(reports, done_sets, strict=True):
        assert len(s) == len(r["done"]), r  # no item twice within one report
    assert not done_sets[0] & done_sets[1], reports
    assert done_sets[0] | done_sets[1] == expected, reports
    pids = {r["pid"] for r in reports}
    for r in reports:
        for s in r["skipped"]:
            if s["action"] == "run_due":  # lost the lease to the other child
                m = re.fullmatch(r"process (\d+) is running due work", s["reason"])
                assert m and int(m.group(1)) in pids - {r["pid"]}, s
            else:  # planned from a stale view, refused on the re-check under the store lock
                assert "not done" in s["reason"] and (s["action"], s["key"]) in expected, s


def test_two_processes_calling_run_due_at_once_do_each_item_once(home: Path, clock: FakeClock,
                                                                 tmp_path: Path,
                                                                 zygote: Zygote) -> None:
    with kl.open(home, principal="alice", clock=clock) as led:
        for name in SYMMETRIC[:4]:
            led.create_key(name, spec="AES_256")
        led.create_key("mac-1", spec="HMAC_SHA256")
        led.create_key("ec-1", spec="EC_P256")
        led.create_key("gone", spec="AES_256")
        led.schedule_deletion("gone", 7)
        blobs = {name: led.encrypt(name, name.encode()) for name in SYMMETRIC[:4]}
    start = clock()

    # Round 1, day 400: every key is past its period (90 d / 365 d), "gone" past its window.
    clock.advance(days=400)
    reports = race(zygote, home, clock, tmp_path, "r1")
    check_race(reports, {("rotate", n) for n in SYMMETRIC + SIGNING} | {("destroy", "gone")})
    labels = key_labels(home)
    assert "gone" not in labels
    for name in SYMMETRIC + SIGNING:
        assert labels[name] == {"v1", "v2"}, (name, labels[name])

    # Round 2, 100 days later: the symmetric keys are due again, the signing key is not.
    clock.advance(days=100)
    reports = race(zygote, home, clock, tmp_path, "r2")
    check_race(reports, {("rotate", n) for n in SYMMETRIC})
    labels = key_labels(home)
    for name in SYMMETRIC:
        assert labels[name] == {"v1", "v2", "v3"}, (name, labels[name])
    assert labels["ec-1"] == {"v1", "v2"}

    with kl.open(home, principal="alice", clock=clock) as led:
        versions = {n: led.get_key(n).latest_version for n in SYMMETRIC + SIGNING}
        assert versions == {**{n: 3 for n in SYMMETRIC}, "ec-1": 2}
        assert led.get_key("gone").state is kl.KeyState.DESTROYED
        rotations = led.audit(action="rotate", outcome="ok", since=start + timedelta(days=1))
        assert rotations.groupby("key").size().to_dict() == {
            **{n: 2 for n in SYMMETRIC}, "ec-1": 1}
        assert len(led.audit(action="destroy", outcome="ok")) == 1
        assert len(led.audit(action="run_due")) == 4
        for name, blob in blobs.items():
            assert led.decrypt(blob) == name.encode()
