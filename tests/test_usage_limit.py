"""Usage limits hold at call time: exactly ``usage_limit`` encryptions per version, across
processes, then an automatic rotation or a clear refusal; invalid limits are refused or ignored.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest
from proc_support import Zygote, zygote_fixture

import keyledger as kl
from keyledger import ciphertext as ct

# the other processes are forked from this module's zygote (tests/proc_support.py): separate
# processes with their own login and usage claims, without an interpreter start each
zygote = zygote_fixture()


def _version(blob: bytes) -> int:
    return ct.parse(blob)[0].version


def test_limit_allows_exactly_the_limit_then_refuses(ledger: kl.KeyLedger) -> None:
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("k", usage_limit=100, auto_rotate=False)
    blobs = [ledger.encrypt("k", b"m%d" % i) for i in range(100)]
    with pytest.raises(kl.PolicyViolation) as info:
        ledger.encrypt("k", b"one too many")
    message = str(info.value)
    assert "'k'" in message and "v1" in message and "100" in message and "rotate" in message
    # every way of encrypting counts against the same limit
    with pytest.raises(kl.PolicyViolation):
        ledger.generate_data_key("k")
    with pytest.raises(kl.PolicyViolation):
        ledger.envelope_encrypt("k", b"big data")
    assert ledger.decrypt(blobs[0]) == b"m0"  # decrypting is not limited
    assert ledger.get_key("k").latest_version == 1  # no rotation without auto_rotate
    ledger.rotate("k")
    assert _version(ledger.encrypt("k", b"after rotation")) == 2
    df = ledger.audit(key="k")
    refused = df[df["outcome"] == "failed"]
    assert list(refused["error"]) == ["PolicyViolation"] * 3
    assert set(refused["version"]) == {1}
    assert ((df["action"] == "encrypt") & (df["outcome"] == "ok") & (df["version"] == 1)).sum() \
        == 100


def test_auto_rotate_rotates_at_exactly_the_limit_and_calls_go_on(ledger: kl.KeyLedger) -> None:
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("k", usage_limit=100)  # auto_rotate is on by default
    ledger.grant("k", "app", "user")  # a user may not rotate, but the policy may
    app = kl.open(ledger.home, principal="app", clock=ledger._clock)
    try:
        blobs = [app.encrypt("k", b"m%d" % i) for i in range(250)]
    finally:
        app.close()
    assert Counter(_version(b) for b in blobs) == {1: 100, 2: 100, 3: 50}
    assert [_version(b) for b in blobs] == sorted(_version(b) for b in blobs)
    assert all(ledger.decrypt(b) == b"m%d" % i for i, b in enumerate(blobs))
    rotations = ledger.audit(action="rotate")
    assert list(rotations["principal"]) == ["app", "app"]
    assert list(rotations["outcome"]) == ["ok", "ok"]
    assert list(rotations["version"]) == [2, 3]
    assert all(d.startswith("automatic: v") and "usage limit of 100" in d
               for d in rotations["detail"])


def test_a_lowered_limit_holds_exactly(ledger: kl.KeyLedger) -> None:
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("k", usage_limit=1000, auto_rotate=False)
    for _ in range(10):
        ledger.encrypt("k", b"x")  # this process now holds a block of unspent uses
    ledger.set_policy("k", usage_limit=25)
    for _ in range(15):
        ledger.encrypt("k", b"x")
    with pytest.raises(kl.PolicyViolation, match="usage limit of 25"):
        ledger.encrypt("k", b"x")


def test_keys_without_a_limit_are_not_limited_by_the_home_default(ledger: kl.KeyLedger) -> None:
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("*", usage_limit=3)
    ledger.create_key("own", spec="AES_256")
    ledger.set_policy("own", usage_limit=5, auto_rotate=False)
    assert {_version(ledger.encrypt("k", b"x")) for _ in range(7)} == {1, 2, 3}  # home limit
    for _ in range(5):
        ledger.encrypt("own", b"x")  # the key's own limit beats the home's
    with pytest.raises(kl.PolicyViolation):
        ledger.encrypt("own", b"x")


@pytest.mark.parametrize("bad", [2**64, 2**63, 0, -1, True, 1.5, "100"])
def test_invalid_usage_limits_are_refused(ledger: kl.KeyLedger, bad: object) -> None:
    ledger.create_key("k", spec="AES_256")
    for name in ("k", "*"):
        with pytest.raises(kl.InvalidInput, match="usage_limit"):
            ledger.set_policy(name, usage_limit=bad)
    assert "usage_limit" not in ledger.get_key("k").policy
    assert ledger.run_due().skipped == []  # nothing stored, nothing to report
    refused = ledger.audit(action="set_policy")
    assert list(refused["error"]) == ["InvalidInput", "InvalidInput"]


def test_the_largest_limit_is_accepted(ledger: kl.KeyLedger) -> None:
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("k", usage_limit=2**63 - 1)
    ledger.set_policy("*", usage_limit=2**63 - 1)
    ledger.encrypt("k", b"x")
    ledger.run_due()
    assert ledger.compliance() is not None


def test_a_stored_huge_limit_does_not_break_run_due_or_compliance(ledger: kl.KeyLedger) -> None:
    """Older releases accepted usage_limit=2**64; such a stored value is ignored and reported."""
    ledger.create_key("k", spec="AES_256")
    ledger.create_key("other", spec="AES_256")
    with ledger._rt.db.write() as tx:  # what an older release stored
        tx.execute("UPDATE keys SET policy = ? WHERE name = 'k'",
                   [json.dumps({"usage_limit": 2**64})])
        tx.execute("INSERT INTO meta VALUES ('home_policy', ?) ON CONFLICT DO UPDATE SET "
                   "value = excluded.value", [json.dumps({"usage_limit": 2**70})])
    ledger._rt.catalog.refresh(force=True)
    assert _version(ledger.encrypt("k", b"x")) == 1  # the 2**32 default applies
    report = ledger.run_due()
    bad = [s for s in report.skipped if s["action"] == "usage_limit"]
    assert [s["key"] for s in bad] == ["*", "k"]
    assert all("invalid" in s["reason"] and "set_policy" in s["reason"] for s in bad)
    assert "not evaluated" not in (report.compliance or "")
    ledger.compliance()  # no OverflowError
    ledger.set_policy("k", usage_limit=10)  # and it can be repaired
    assert ledger.get_key("k").policy["usage_limit"] == 10


# -- several processes ------------------------------------------------------------------------

_SPENDER = """
import json, sys
import keyledger as kl
home, stop_after = sys.argv[1], int(sys.argv[2])
led = kl.open(home, principal="app")
print("ready", flush=True)
sys.stdin.readline()
ok, refused = [], 0
while len(ok) < min(stop_after, 5000):
    try:
        ok.append(led.encrypt("k", b"x").hex())
    except kl.PolicyViolation:
        refused += 1
        break
if stop_after < 10**9:
    print("spent", flush=True)
    sys.stdin.readline()  # the parent kills it here, holding unspent uses
led.close()
print(json.dumps({"ok": len(ok), "refused": refused}))
"""


def _spawn(zygote: Zygote, home: Path, stop_after: int) -> subprocess.Popen:
    proc = zygote.popen([sys.executable, "-c", textwrap.dedent(_SPENDER), str(home),
                         str(stop_after)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        pytest.fail(f"child said {line!r}: {proc.communicate(timeout=30)[1]}")
    return proc


def _spend_all(led: kl.KeyLedger, at_most: int = 1000) -> int:
    """Encrypt until refused; how many encryptions were made."""
    for n in range(at_most):
        try:
            led.encrypt("k", b"x")
        except kl.PolicyViolation:
            return n
    pytest.fail(f"{at_most} encryptions and no refusal")


def _limited_home(home: Path, limit: int) -> None:
    with kl.open(home, principal="admin") as led:
        led.create_key("k", spec="AES_256")
        led.set_policy("k", usage_limit=limit, auto_rotate=False)
        led.grant("k", "app", "user")


@pytest.mark.slow
def test_two_processes_sharing_a_limit_never_exceed_it(tmp_path: Path, zygote: Zygote) -> None:
    home = tmp_path / "home"
    _limited_home(home, 600)
    procs = [_spawn(zygote, home, 10**9) for _ in range(2)]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    # each stopped at a refusal, and together they made exactly the limit
    assert [r["refused"] for r in results] == [1, 1]
    assert sum(r["ok"] for r in results) == 600
    with kl.open(home, principal="admin") as led:
        df = led.audit(action="encrypt")
        assert (df["outcome"] == "ok").sum() == 600
        assert led.verify_audit().ok


@pytest.mark.slow
def test_uses_a_killed_process_held_count_as_used(tmp_path: Path, zygote: Zygote) -> None:
    home = tmp_path / "home"
    _limited_home(home, 400)
    victim = _spawn(zygote, home, 10)
    victim.stdin.write("go\n")
    victim.stdin.flush()
    assert victim.stdout.readline() == "spent\n"
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    with kl.open(home, principal="app") as led:
        n = _spend_all(led)
    # the victim spent 10 and claimed more than that; what it held is gone, never handed out
    assert 0 < n < 400 - 10
    # a process that closes gives its unspent uses back: the next one can spend them
    survivor = _spawn(zygote, home, 10**9)
    survivor.stdin.write("go\n")
    survivor.stdin.flush()
    out, _ = survivor.communicate(timeout=60)
    assert json.loads(out.strip().splitlines()[-1]) == {"ok": 0, "refused": 1}


def test_a_closed_process_gives_back_unspent_uses(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _limited_home(home, 100)
    with kl.open(home, principal="app") as led:
        led.encrypt("k", b"x")  # claims a block of 25, spends 1
    with kl.open(home, principal="app") as led:
        n = _spend_all(led)
    assert n == 99


def test_spending_uses_needs_no_store(tmp_path: Path, zygote: Zygote) -> None:
    """The counter of a version is made with it, so a process's first encryption under a
    limited version works while another process holds the store (crypto never opens it)."""
    home = tmp_path / "home"
    _limited_home(home, 50)
    with kl.open(home, principal="app") as app:
        app._rt.db.busy_timeout = 0.3  # a store access would fail fast with StoreBusy
        app._rt.stop_background_ingest()
        holder = zygote.popen(
            [sys.executable, "-c", "import sys, duckdb; con = duckdb.connect(sys.argv[1]); "
             "print('held', flush=True); sys.stdin.readline()", str(home / "keyledger.duckdb")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "held\n"
            blobs = [app.encrypt("k", b"x") for _ in range(50)]
            with pytest.raises(kl.PolicyViolation):
                app.encrypt("k", b"x")
        finally:
            holder.stdin.write("go\n")
            holder.stdin.flush()
            holder.wait(30)
    assert len(blobs) == 50


def test_a_new_versions_zero_counter_lost_to_a_power_loss_still_holds_the_limit(
        ledger: kl.KeyLedger) -> None:
    # create and rotate write a version's zero counter without fsync: after a power loss the
    # file may be empty; the first claim then starts from the ledger, and the limit is exact
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("k", usage_limit=30, auto_rotate=False)
    key = ledger.rotate("k")
    for version in (1, 2):
        (ledger.home / "usage" / f"{key.key_id}-v{version}").write_bytes(b"")
    blobs = [ledger.encrypt("k", b"m%d" % i) for i in range(30)]
    with pytest.raises(kl.PolicyViolation):
        ledger.encrypt("k", b"one too many")
    assert {_version(b) for b in blobs} == {2}


def _no_seed(key_id: str, version: int) -> int:
    return 0


@pytest.mark.parametrize("batches", [False, True])
def test_threads_racing_on_one_block_spend_each_use_once(tmp_path: Path, batches: bool) -> None:
    """A use is spent with no lock (one C call on the block's iterator, issue 18): threads
    racing for the uses of one counter, some in batches, spend exactly the limit, and what
    they leave is given back exactly at release."""
    from keyledger.store.usage import UsageCounters

    counters = UsageCounters(tmp_path / "usage")
    counters.create("k", 1)
    limit, stop_at = 4_000, 3_001
    spent: list[int] = []

    def worker(i: int) -> None:
        n = 0
        while n < stop_at // 6 + 1:
            if batches and i % 2:
                got = counters.take_many("k", 1, limit, _no_seed, 3)
            else:
                got = int(counters.take("k", 1, limit, _no_seed))
            if not got:
                break
            n += got
        spent.append(n)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches between any two bytecodes
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    counters.release()
    stored = int.from_bytes((tmp_path / "usage" / "k-v1").read_bytes(), "little")
    assert stored == sum(spent)  # the unspent rest went back, no use counted twice
    spent.clear()
    for t in [threading.Thread(target=worker, args=(i,)) for i in range(6)]:
        t.start()
        t.join()
    while counters.take("k", 1, limit, _no_seed):  # the rest, to the limit
        spent.append(1)
    assert sum(spent) + stored == limit
    assert not counters.take("k", 1, limit, _no_seed)
