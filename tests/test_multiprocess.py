"""Several processes on one home: SIGKILL durability, concurrent use, catalog propagation, busy store.

Invariants 5 and 6 of DESIGN.md. Each process here is a real interpreter with its own PKCS#11
login, its own audit journal and its own short-lived DuckDB connections.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HomeTemplate, copy_home, verify_after_kill
from proc_support import Zygote, zygote_fixture

import keyledger as kl
from keyledger.config import write_config
from keyledger.runtime import BACKGROUND_INGEST_WAIT_S

# the concurrent run is a fixed amount of work (each worker's rounds; the dashboard reads until
# both are done), not a fixed time: a timed run did whatever a busy machine allowed
CONCURRENCY_ROUNDS = int(os.environ.get("KEYLEDGER_TEST_CONCURRENCY_ROUNDS", "8"))
CONCURRENCY_LIMIT_S = 600  # the dashboard stops by itself if the test never tells it to

# every other process of these tests is forked from this module's zygote (tests/proc_support.py):
# a separate process with its own login, journal and store connection, without the ~0.7 s of
# CPU an interpreter start and `import keyledger` cost
zygote = zygote_fixture()


def _spawn(zygote: Zygote, code: str, *args: str, stdin: bool = False) -> subprocess.Popen:
    return zygote.popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _readline(proc: subprocess.Popen, expect: str) -> str:
    line = proc.stdout.readline()
    if not line.startswith(expect):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"child said {line!r} instead of {expect!r}; stderr:\n{err}")
    return line


def _settings(home: Path, section: str, **values: object) -> None:
    path = home / "keyledger.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault(section, {}).update(values)
    write_config(home, data)


# home-wide roles of the principals these tests use (deny by default otherwise)
ROLES = {
    "worker": ("user",), "w1": ("admin",), "w2": ("admin",), "dashboard": ("auditor",),
    "auditor": ("auditor",), "peer": ("user",), "admin": ("admin",),
    "alice": ("admin", "user", "auditor"), "other": ("user",),
}


def _provision(home: Path, *keys: str) -> None:
    """A home whose first principal ("setup") creates ``keys`` and grants ROLES."""
    with kl.open(home, principal="setup") as led:
        for name in keys:
            led.create_key(name, spec="AES_256")
        for who, roles in ROLES.items():
            for role in roles:
                led.grant("*", who, role)


@pytest.fixture(scope="module")
def init_home(tmp_path_factory):
    """``init_home(home, *keys)``: a copy at ``home`` of the home ``_provision(home, *keys)``
    makes, provisioned once per set of keys in this module (conftest.copy_home: each test's home
    is an independent copy with its own token files)."""
    made: dict[tuple[str, ...], Path] = {}

    def init_home(home: Path, *keys: str) -> None:
        if keys not in made:
            made[keys] = tmp_path_factory.mktemp("provisioned") / "home"
            _provision(made[keys], *keys)
        copy_home(HomeTemplate(made[keys], None), home)

    return init_home


# -- invariant 6: SIGKILL loses no record of a call that returned -------------------------------

_WORKER = """
import sys
import keyledger as kl
led = kl.open(sys.argv[1], principal="worker")
i = 0
while True:
    led.encrypt("k", b"payload", context={"i": str(i)})
    i += 1
    print("done", i, flush=True)
    if i % 50 == 0:
        led.flush_audit()  # some records in the store, the rest only in the journal
"""


@pytest.mark.slow
@pytest.mark.parametrize("ingest_ms", [1000, 5], ids=["default-ingest", "ingest-every-5ms"])
def test_sigkill_loses_no_record_of_a_returned_call(tmp_path, init_home, zygote, ingest_ms):
    home = tmp_path / "home"
    init_home(home, "k")
    # with a 5 ms ingest the kill often lands inside a store transaction or checkpoint
    _settings(home, "audit", ingest_interval_ms=ingest_ms)
    proc = _spawn(zygote, _WORKER, str(home))
    reported = 0
    while reported < 200:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"worker ended early: {proc.communicate(timeout=30)[1]}")
        reported += 1
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)  # lines written before the kill still count
    reported += sum(1 for line in rest.splitlines() if line.startswith("done"))
    assert proc.returncode == -signal.SIGKILL

    with kl.open(home, principal="alice") as led:
        df = led.audit(principal="worker", action="encrypt")
        # the records of its last seal interval are unproven, not lost; accepted, it verifies
        verify_after_kill(led, proc.pid)
    assert reported <= len(df) <= reported + 1  # + at most the call in flight
    seen = {json.loads(c)["i"] for c in df["context"]}
    assert {str(i) for i in range(reported)} <= seen
    assert set(df["outcome"]) == {"ok"}
    assert df["proven"].iloc[0]  # sealed while it ran


_CRASH_BEFORE_HEAD = """
import os, signal, sys
import keyledger as kl
led = kl.open(sys.argv[1], principal="worker")
for _ in range(5):
    led.encrypt("k", b"x")
# die after the checkpoint is committed to DuckDB but before the HSM head moves to it
led._rt.backend.put_data = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
print("crashing", flush=True)
led.flush_audit()
"""


@pytest.mark.slow
def test_crash_between_checkpoint_and_hsm_head_is_not_reported_as_tampering(tmp_path, init_home,
                                                                          zygote):
    home = tmp_path / "home"
    init_home(home, "k")
    _settings(home, "audit", ingest_interval_ms=600_000)
    proc = _spawn(zygote, _CRASH_BEFORE_HEAD, str(home))
    out, err = proc.communicate(timeout=60)
    assert out.startswith("crashing") and proc.returncode == -signal.SIGKILL, err
    with kl.open(home, principal="auditor") as led:
        assert len(led.audit(principal="worker", action="encrypt")) == 5
        report = led.verify_audit()
    assert report.ok, str(report)


# -- invariant 5: several processes at once, no lock errors, no record lost ----------------------

# Each process opens the home (all at once: open-time reconcile must leave the others alone),
# says "ready", and starts work when told, so the three overlap for the whole run.
_CRYPTO_WORKER = """
import json, os, sys
import keyledger as kl
home, who, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls, errors = 0, []
def call(fn, *args, **kwargs):
    global calls
    calls += 1
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
        return None
calls += 1
led = kl.open(home, principal=who)
print("ready", flush=True)
sys.stdin.readline()
call(led.create_key, f"{who}-main", spec="AES_256")
j = 0
while j < rounds:
    name = f"{who}-{j}"
    call(led.create_key, name, spec="AES_256")
    blob = call(led.encrypt, name, b"secret %d" % j, context={"j": str(j)})
    if call(led.decrypt, blob, context={"j": str(j)}) != b"secret %d" % j:
        errors.append(f"round trip {j} failed")
    call(led.rotate, name)
    if call(led.decrypt, blob, context={"j": str(j)}) != b"secret %d" % j:
        errors.append(f"old ciphertext {j} failed after rotation")
    call(led.disable, name)
    call(led.enable, name)
    for _ in range(10):
        b = call(led.encrypt, f"{who}-main", b"m")
        call(led.decrypt, b)
    j += 1
led.close()
print(json.dumps({"calls": calls, "errors": errors, "pid": os.getpid(), "rounds": j}))
"""

_DASHBOARD = """
import json, os, sys, time
import keyledger as kl
home, stop, limit_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
calls, errors, verify_failures, verified = 1, [], [], 0
led = kl.open(home, principal="dashboard")
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + limit_s
next_verify = 0.0
# until the workers are done (the test makes `stop`) and it verified the audit at least twice
while (verified < 2 or not os.path.exists(stop)) and time.monotonic() < deadline:
    try:
        calls += 1
        led.audit(limit=500)
        calls += 1
        led.list_keys()
        calls += 1
        led.audit(outcome="failed")
        if time.monotonic() >= next_verify:
            calls += 1
            report = led.verify_audit()
            verified += 1
            if not report.ok:
                verify_failures.append(str(report))
            next_verify = time.monotonic() + 2
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    time.sleep(0.05)
led.close()
print(json.dumps({"calls": calls, "errors": errors, "pid": os.getpid(), "verified": verified,
                  "verify_failures": verify_failures}))
"""


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, init_home, zygote):
    """Two crypto/lifecycle workers doing CONCURRENCY_ROUNDS rounds each, and a dashboard
    reading the same home until they are done."""
    base = tmp_path_factory.mktemp("shared")
    home, stop = base / "home", base / "stop"
    init_home(home)
    procs = {}
    try:
        for who, code, args in (("w1", _CRYPTO_WORKER, ("w1", str(CONCURRENCY_ROUNDS))),
                                ("w2", _CRYPTO_WORKER, ("w2", str(CONCURRENCY_ROUNDS))),
                                ("dashboard", _DASHBOARD, (str(stop), str(CONCURRENCY_LIMIT_S)))):
            procs[who] = _spawn(zygote, code, str(home), *args, stdin=True)
        for proc in procs.values():
            _readline(proc, "ready")
        for proc in procs.values():
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = {}
        for who, proc in procs.items():
            if who == "dashboard":  # the workers are done: it stops after its next reads
                stop.touch()
            out, err = proc.communicate(timeout=CONCURRENCY_LIMIT_S + 60)
            assert proc.returncode == 0, f"{who} crashed:\n{err}"
            results[who] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    with kl.open(home, principal="auditor") as led:
        df = led.audit(limit=None)
        report = led.verify_audit()
        keys = led.list_keys()
    return results, df, report, keys


@pytest.mark.slow
def test_concurrent_processes_see_no_errors(shared_run):
    results, *_ = shared_run
    for who, res in results.items():
        assert res["errors"] == [], f"{who}: {res['errors'][:5]}"
    assert results["w1"]["rounds"] == results["w2"]["rounds"] == CONCURRENCY_ROUNDS
    assert results["dashboard"]["verified"] >= 2


@pytest.mark.slow
def test_concurrent_processes_lose_no_record(shared_run):
    results, df, _, keys = shared_run
    counts = df.groupby(["principal", "pid"]).size().to_dict()
    for who, res in results.items():
        assert counts.get((who, res["pid"]), 0) == res["calls"], who
        assert set(df[df["principal"] == who]["outcome"]) == {"ok"}
    # the lifecycle calls all landed: each worker's round keys ended enabled, rotated once
    for who in ("w1", "w2"):
        mine = keys[keys["name"].str.startswith(f"{who}-") & (keys["name"] != f"{who}-main")]
        assert len(mine) == results[who]["rounds"]
        assert set(mine["state"]) == {"active"} and set(mine["latest_version"]) == {2}


@pytest.mark.slow
def test_concurrent_ledger_verifies_afterwards(shared_run):
    *_, report, _ = shared_run
    assert report.ok, str(report)
    assert report.checkpoints >= 2


@pytest.mark.slow
def test_concurrent_verifications_all_pass(shared_run):
    results, *_ = shared_run
    assert results["dashboard"]["verify_failures"] == []


def test_verify_during_another_process_checkpoint_is_not_tampering(tmp_path, init_home, zygote,
                                                                  monkeypatch):
    """Deterministic form of the race: another process ingests and checkpoints just before this
    process's verification transaction starts. verify_audit() holds the store from its ingest to
    its verification, except when a live writer still owes a seal: it then waits with the store
    released, and the race remains possible there (forced here)."""
    home = tmp_path / "home"
    init_home(home, "k")
    _settings(home, "audit", ingest_interval_ms=600_000)
    other = f"""
import keyledger as kl
with kl.open({str(home)!r}, principal="other") as led:
    led.encrypt("k", b"x")
    led.flush_audit()
"""
    with kl.open(home, principal="alice") as led:
        led.flush_audit()  # nothing pending: verify_audit() goes straight to verification
        db = led._rt.db
        real_write = db.write

        def other_process_checkpoints_first(**kwargs):
            monkeypatch.setattr(db, "write", real_write)
            done = zygote.run_python(other, timeout=60)
            assert done.returncode == 0, done.stderr
            return real_write(**kwargs)

        real_await = led._rt.await_seals

        def a_writer_owes_a_seal(*, wait: bool = True):
            return None if not wait else real_await(wait=wait)

        monkeypatch.setattr(led._rt, "await_seals", a_writer_owes_a_seal)
        monkeypatch.setattr(db, "write", other_process_checkpoints_first)
        report = led.verify_audit()
        assert db.write == real_write  # the other process did run in between
    assert report.ok, str(report)


def test_open_in_another_process_does_not_roll_back_an_in_flight_create(tmp_path, init_home,
                                                                        zygote, monkeypatch):
    import keyledger.intents as intents

    home = tmp_path / "home"
    init_home(home)
    opener = f"import keyledger as kl; kl.open({str(home)!r}, principal='bob').close()"
    real_fault = intents.fault

    def another_process_opens(point: str) -> None:
        if point == "create:after_hsm":
            done = zygote.run_python(opener, timeout=60)
            assert done.returncode == 0, done.stderr
        real_fault(point)

    with kl.open(home, principal="alice") as led:
        monkeypatch.setattr(intents, "fault", another_process_opens)
        # RSA: its generation may be slow, so the store is not held across it (a quick key's
        # create holds the store from intent to commit: no other process opens in between)
        led.create_key("k", spec="RSA_2048")
        monkeypatch.setattr(intents, "fault", real_fault)
        assert led.verify("k", b"x", led.sign("k", b"x"))
        assert led.reconcile(full=True).clean


_PEER = """
import json, sys, time
import keyledger as kl
led = kl.open(sys.argv[1], principal="peer")
led.encrypt("shared", b"x")
print("ready", flush=True)

def poll(want_refused):
    sys.stdin.readline()
    start, attempts = time.monotonic(), 0
    while time.monotonic() - start < 2.0:
        attempts += 1
        try:
            led.encrypt("shared", b"x")
            if not want_refused:
                return True, attempts
        except kl.KeyStateError:
            if want_refused:
                return True, attempts
        time.sleep(0.005)
    return False, attempts

refused, n1 = poll(True)
print(json.dumps({"refused": refused}), flush=True)
allowed, n2 = poll(False)
print(json.dumps({"allowed": allowed, "attempts": n1 + n2}), flush=True)
led.close()
"""


@pytest.mark.slow
def test_disable_in_one_process_stops_encrypt_in_another(tmp_path, init_home, zygote):
    home = tmp_path / "home"
    init_home(home, "shared")
    proc = _spawn(zygote, _PEER, str(home), stdin=True)
    try:
        _readline(proc, "ready")
        with kl.open(home, principal="admin") as admin:
            admin.disable("shared")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert json.loads(_readline(proc, "{"))["refused"] is True
            admin.enable("shared")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            done = json.loads(_readline(proc, "{"))
            assert done["allowed"] is True
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with kl.open(home, principal="auditor") as led:
        peer = led.audit(principal="peer", action="encrypt")
    # every attempt is in the ledger, the refused ones with the reason
    assert len(peer) == 1 + done["attempts"]
    assert set(peer[peer["outcome"] == "failed"]["error"]) == {"KeyStateError"}


_HOLDER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
con.close()
"""


@contextlib.contextmanager
def _store_held_elsewhere(zygote: Zygote, home: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the home's DuckDB file for the block."""
    holder = _spawn(zygote, _HOLDER, str(home / "keyledger.duckdb"), stdin=True)
    try:
        _readline(holder, "held")
        yield holder
    finally:
        holder.stdin.write("release\n")
        holder.stdin.flush()
        holder.communicate(timeout=30)


@pytest.mark.slow
def test_store_held_by_another_process_gives_store_busy_and_crypto_keeps_working(tmp_path,
                                                                                 init_home,
                                                                                 zygote):
    home = tmp_path / "home"
    init_home(home, "k")
    _settings(home, "store", busy_timeout_s=1)
    with kl.open(home, principal="alice") as led:
        blob = led.encrypt("k", b"before")
        with _store_held_elsewhere(zygote, home) as holder:
            with pytest.raises(kl.StoreBusy) as info:
                led.create_key("k2", spec="AES_256")
            message = str(info.value)
            assert str(holder.pid) in message
            assert "keyledger.duckdb" in message
            with pytest.raises(kl.StoreBusy):
                led.rotate("k")
            # crypto needs no store: it keeps working while the store is held
            for i in range(20):
                assert led.decrypt(led.encrypt("k", b"during %d" % i)) == b"during %d" % i
            assert led.decrypt(blob) == b"before"
            assert "k" in set(led.list_keys()["name"])
            with pytest.raises(kl.StoreBusy):
                led.audit()  # reading the ledger needs the store
        led.create_key("k2", spec="AES_256")  # works again once the holder is gone
        df = led.audit(principal="alice")
        report = led.verify_audit()
    busy = df[df["error"] == "StoreBusy"]
    assert list(busy["action"]) == ["create_key", "rotate", "audit"]
    assert (df["action"] == "encrypt").sum() == 21
    assert report.ok, str(report)


def test_background_ingest_waits_briefly_for_a_held_store(tmp_path, init_home, zygote):
    """A background ingest round waits 0.2 s for a held store, then skips the round: waiting
    out the busy timeout would hold this process's store lock, so its own reads and admin calls
    would wait for the ingest's timeout before starting their own."""
    home = tmp_path / "home"
    init_home(home, "k")
    _settings(home, "store", busy_timeout_s=1)
    with kl.open(home, principal="alice") as led:
        led._rt.stop_background_ingest()  # this test makes the attempts itself
        led.encrypt("k", b"x")  # a journal line waiting to be ingested
        with _store_held_elsewhere(zygote, home) as holder:
            with pytest.raises(kl.StoreBusy, match=f"held by process {holder.pid} for more "
                                                   "than 0.2 s"):
                led._rt.ingest(busy_timeout=BACKGROUND_INGEST_WAIT_S)
            with pytest.raises(kl.StoreBusy, match="for more than 1 s"):
                led._rt.ingest()  # a caller that needs the records waits its busy timeout
        assert led._rt.ingest(busy_timeout=0).records >= 1  # free again: the line goes in


# -- keep_store_open: bulk admin work in one process, the store held for the block -------------

_STORE_PEER = """
import sys, keyledger as kl
led = kl.open(sys.argv[1], principal="alice")
print("ready", flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "encrypt":
            led.decrypt(led.encrypt("k", b"while held"))
        elif line.strip() == "audit":
            led.audit()
        else:
            break
        print("ok", flush=True)
    except kl.KeyLedgerError as exc:
        print(type(exc).__name__, flush=True)
led.close()
"""

_OPENER = """
import sys, keyledger as kl
try:
    kl.open(sys.argv[1], principal="other").close()
    print("opened", flush=True)
except kl.KeyLedgerError as exc:
    print(type(exc).__name__, str(exc), flush=True)
"""


def _open_elsewhere(zygote: Zygote, home: Path) -> str:
    """What another process says when it opens the home: "opened" or the error it got."""
    out, _ = _spawn(zygote, _OPENER, str(home)).communicate(timeout=60)
    return out


def _ask(proc: subprocess.Popen, command: str) -> str:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@pytest.mark.slow
def test_keep_store_open_holds_the_store_for_the_block_only(tmp_path, init_home, zygote):
    home = tmp_path / "home"
    init_home(home, "k")
    _settings(home, "store", busy_timeout_s=1)
    peer = _spawn(zygote, _STORE_PEER, str(home), stdin=True)
    try:
        _readline(peer, "ready")
        with kl.open(home, principal="admin") as led, kl.open(home, principal="auditor") as aud:
            led._rt.stop_background_ingest()  # flush_audit below has records to move, always
            with led.keep_store_open() as same:
                assert same is led
                with led.keep_store_open():  # nests
                    for i in range(5):
                        led.create_key(f"bulk-{i}", spec="AES_256")
                        led.grant(f"bulk-{i}", "peer", "user")
                # still held after the inner block: another process cannot open the home
                out = _open_elsewhere(zygote, home)
                assert out.startswith("StoreBusy"), out
                assert "keyledger.duckdb" in out
                # a process that opened before keeps doing crypto; its store reads wait
                assert _ask(peer, "encrypt") == "ok"
                assert _ask(peer, "audit") == "StoreBusy"
                # this process's other ledgers and its ingest use the held store
                led.rotate("bulk-0")
                assert aud.flush_audit() > 0
                assert len(aud.audit(action="create_key")) == 6
            # released: everyone gets the store again
            assert _ask(peer, "audit") == "ok"
            out = _open_elsewhere(zygote, home)
            assert out.startswith("opened"), out
            assert led.get_key("bulk-0").latest_version == 2
            report = aud.verify_audit()
            assert report.ok, str(report)
            df = aud.audit(principal="alice")
        assert (df["error"] == "StoreBusy").sum() == 1
    finally:
        peer.stdin.write("stop\n")
        peer.stdin.flush()
        peer.communicate(timeout=30)


_BULK = """
import sys, keyledger as kl
led = kl.open(sys.argv[1], principal="admin")
with led.keep_store_open():
    led.create_key("made-while-held", spec="AES_256")
    print("created", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.slow
def test_sigkill_inside_keep_store_open_keeps_committed_work_and_frees_the_store(tmp_path,
                                                                                  init_home,
                                                                                  zygote):
    home = tmp_path / "home"
    init_home(home, "k")
    proc = _spawn(zygote, _BULK, str(home), stdin=True)
    try:
        _readline(proc, "created")
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with kl.open(home, principal="admin") as led:  # the kernel released the file lock
        assert led.last_reconcile.clean, str(led.last_reconcile)
        key = led.get_key("made-while-held")
        assert key.state.value == "active"
        assert led.decrypt(led.encrypt("made-while-held", b"x")) == b"x"
        verify_after_kill(led, proc.pid)


def test_keep_store_open_on_a_closed_ledger_is_refused(tmp_path):
    led = kl.open(tmp_path / "home", principal="admin")
    led.close()
    with pytest.raises(kl.KeyStateError, match="closed"), led.keep_store_open():
        pass


@pytest.mark.slow
def test_backup_inside_keep_store_open_keeps_other_processes_out(tmp_path, init_home, zygote):
    # fcntl(2) drops a process's lock on a file when it closes any descriptor of it: the
    # backup's own descriptors of the database must outlive the held store, or a second
    # process could open the file while this one still writes it
    home = tmp_path / "home"
    init_home(home, "k")
    _settings(home, "store", busy_timeout_s=1)
    with kl.open(home, principal="admin") as led, led.keep_store_open():
        led.backup(tmp_path / "b.klbk", passphrase="correct horse battery")
        out = _open_elsewhere(zygote, home)
        assert out.startswith("StoreBusy"), out
        led.create_key("after-backup", spec="AES_256")
    out = _open_elsewhere(zygote, home)
    assert out.startswith("opened"), out


_WRITER = """
import fcntl, json, sys
import keyledger as kl
from keyledger.store import storelock

real_flock, refused = fcntl.flock, []

def counting_flock(fd, op):  # count the tries the other process's hold of the store refused
    try:
        return real_flock(fd, op)
    except BlockingIOError:
        refused.append(1)
        raise

storelock.fcntl.flock = counting_flock
led = kl.open(sys.argv[1], principal="admin")
print("ready", flush=True)
sys.stdin.readline()
led.create_key("written-during-query", spec="AES_256")
print(json.dumps({"created": True, "waited": len(refused) > 0}), flush=True)
led.close()
"""

LONG_QUERY = ("SELECT count(*) AS n FROM range(1000000000) a, range(1000000) b "
              "WHERE a.range + b.range = 7")


def test_long_query_is_stopped_at_its_timeout_and_a_waiting_writer_then_succeeds(tmp_path,
                                                                                 init_home,
                                                                                 zygote,
                                                                                 monkeypatch):
    """A query holds the store file (DuckDB: one process at a time); a writer in another
    process waits (busy timeout, 15 s) instead of failing, and gets the store once the query
    is interrupted at ``[store] query_timeout_s`` (3 s here, below the busy timeout)."""
    import threading

    import keyledger.store.queries as queries

    home = tmp_path / "home"
    init_home(home)
    _settings(home, "store", query_timeout_s=3)
    started = threading.Event()
    real_interrupt_after = queries._interrupt_after

    def interrupt_after(con, seconds):  # the statement runs right after this is entered
        started.set()
        return real_interrupt_after(con, seconds)

    monkeypatch.setattr(queries, "_interrupt_after", interrupt_after)
    writer = _spawn(zygote, _WRITER, str(home), stdin=True)
    outcome: dict[str, BaseException] = {}
    try:
        _readline(writer, "ready")
        with kl.open(home, principal="auditor") as led:
            def run() -> None:
                try:
                    led.query(LONG_QUERY)
                except BaseException as exc:  # noqa: BLE001 - checked below
                    outcome["error"] = exc

            thread = threading.Thread(target=run)
            thread.start()
            assert started.wait(60)
            writer.stdin.write("go\n")
            writer.stdin.flush()
            done = json.loads(_readline(writer, "{"))
            thread.join(60)
            assert isinstance(outcome.get("error"), kl.InvalidInput), outcome
            assert "stopped after 3 s" in str(outcome["error"])
            assert "timeout_s" in str(outcome["error"])
            assert done == {"created": True, "waited": True}
            assert led.query("SELECT count(*) AS n FROM keys WHERE name = ?",
                             ["written-during-query"]).iloc[0, 0] == 1
            stopped = led.audit(action="query", outcome="failed")
            assert list(stopped["error"]) == ["InvalidInput"]
        writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()


# -- a process proves it is alive by its run/<pid>.lock; threads must never lose it ------------
def _alive_file_is_locked(home: Path) -> bool:
    """What another process's reconcile asks: does run/<pid>.lock exist, held by its owner?"""
    try:
        fd = os.open(home / "run" / f"{os.getpid()}.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_thread_opening_while_another_closes_keeps_the_process_alive_for_others(tmp_path,
                                                                                  init_home):
    """The last close of a home and an open in another thread used to overlap: the new runtime
    locked the old run/<pid>.lock just before the closing one unlinked it, so other processes
    took this live process for dead and rolled back its in-flight rotations."""
    home = tmp_path / "home"
    init_home(home)
    first = kl.open(home, principal="alice")
    runtime = first._rt
    opened: list[kl.KeyLedger] = []
    opener = threading.Thread(target=lambda: opened.append(kl.open(home, principal="bob")))
    original = runtime.shutdown

    def shutdown_while_another_thread_opens() -> None:
        opener.start()
        time.sleep(1.0)  # the opener runs into this shutdown (or, fixed, waits for it)
        original()

    runtime.shutdown = shutdown_while_another_thread_opens  # type: ignore[method-assign]
    first.close()
    opener.join(timeout=60)
    assert len(opened) == 1
    try:
        assert opened[0]._rt is not runtime
        assert _alive_file_is_locked(home)
    finally:
        opened[0].close()
    assert not _alive_file_is_locked(home)
