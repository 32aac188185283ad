"""The incremental catalog export (issue 18 §5): a change re-reads and re-encodes only the keys it
touched, the writer's own cache takes the export without re-reading catalog.json, and still
every other process sees each change as soon as the call returns, never a torn file, also after
a process died between its commit and its export."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import keyledger as kl
from keyledger.store import catalog as cat
from keyledger.store import db
from keyledger.store.catalog import SNAPSHOT_NAME

# another process's view: its own runtime and catalog cache, asked after each call returned
_VIEWER = """
import json, sys
import keyledger as kl
led = kl.open(sys.argv[1], principal="alice")
print("ready", flush=True)
for line in sys.stdin:
    led._rt.catalog.refresh(force=True)  # "after the call returned", not after refresh_ms
    try:
        k = led.get_key(line.strip())
    except kl.KeyLedgerError as exc:
        print(json.dumps({"error": type(exc).__name__}), flush=True)
        continue
    print(json.dumps({"state": k.state.value, "latest": k.latest_version,
                      "aliases": list(k.aliases), "tags": k.tags, "rotated": str(k.rotated_at),
                      "versions": {v: s.state for v, s in k.versions.items()}}), flush=True)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _ask(viewer: subprocess.Popen, name: str) -> dict:
    assert viewer.stdin is not None and viewer.stdout is not None
    viewer.stdin.write(name + "\n")
    viewer.stdin.flush()
    line = viewer.stdout.readline()
    if not line:
        pytest.fail(f"the viewer process died: {viewer.communicate(timeout=30)[1]}")
    return json.loads(line)


def _seen(key: kl.Key) -> dict:
    return {"state": key.state.value, "latest": key.latest_version, "aliases": list(key.aliases),
            "tags": key.tags, "rotated": str(key.rotated_at),
            "versions": {str(v): s.state for v, s in key.versions.items()}}


@pytest.mark.parametrize("held", [True, False], ids=["store-held", "store-per-transaction"])
def test_another_process_sees_each_change_when_the_call_returns(ledger, home, clock, held):
    ledger.create_key("seed", spec="AES_256")
    viewer = _spawn(_VIEWER, str(home))
    try:
        assert viewer.stdout is not None and viewer.stdout.readline().startswith("ready")
        with ledger.keep_store_open() if held else contextlib.nullcontext():
            steps = [
                ("a", lambda: ledger.create_key("a", spec="AES_256", tags={"team": "pay"})),
                ("a", lambda: ledger.rotate("a")),
                ("a", lambda: ledger.set_alias("a", "a-current")),
                ("a", lambda: ledger.set_tags("a", {"team": "risk"})),
                ("a", lambda: ledger.disable("a", reason="paused")),
                ("a", lambda: ledger.enable("a")),
                ("seed", lambda: ledger.rotate("seed")),
                ("a", lambda: ledger.schedule_deletion("a", 7)),
            ]
            for name, step in steps:
                returned = step()
                assert _ask(viewer, name) == _seen(returned)
            clock.advance(days=8)
            returned = ledger.destroy("a")
            assert returned.state is kl.KeyState.DESTROYED
            assert _ask(viewer, "a") == _seen(returned)
            assert _ask(viewer, "a-current") == _seen(returned)  # through the alias too
    finally:
        viewer.kill()
        viewer.communicate(timeout=30)


def test_the_returned_key_equals_a_fresh_load_after_reopening(ledger, home, clock):
    with ledger.keep_store_open():
        returned = {
            "a": ledger.create_key("a", spec="AES_256", owner="team-pay", rotation_period="30d"),
            "s": ledger.create_key("s", spec="EC_P256", activate=False),
        }
        clock.advance(hours=1)
        returned["a"] = ledger.rotate("a")
        returned["a"] = ledger.rotate("a", reason="again")
        returned["s"] = ledger.set_policy("s", usage_limit=10)
        returned["a"] = ledger.mark_compromised("a", "leaked")
    ledger.close()
    with kl.open(home, principal="alice", clock=clock) as led:
        for name, key in returned.items():
            assert led.get_key(name) == key
            with led._rt.db.read() as tx:
                assert cat.load_key(tx, name) == key


def test_the_writer_never_rereads_its_own_export(ledger, home, monkeypatch):
    ledger.create_key("other", spec="AES_256")
    reads: list[Path] = []
    read_text = Path.read_text

    def spy(self: Path, *args, **kwargs):
        reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", spy)
    with ledger.keep_store_open():
        ledger.create_key("a", spec="AES_256")
        ledger.rotate("a")
        ledger.disable("a")
        ledger.set_tags("other", {"x": "y"})
    assert home / SNAPSHOT_NAME not in reads
    # an unchanged key keeps its built Key: a change does not rebuild every key
    ledger.create_key("b", spec="AES_256")
    assert ledger._rt.catalog.get("other").tags == {"x": "y"}
    again = ledger._rt.catalog.get("other")
    ledger.rotate("b")
    assert ledger._rt.catalog.get("other") is again


_READER = """
import json, os, sys
path, stop = sys.argv[1], sys.argv[2]
reads = torn = shrank = 0
last = 0
seen = set()
while not os.path.exists(stop):
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        continue
    reads += 1
    try:
        doc = json.loads(text)
    except ValueError:
        torn += 1
        continue
    n = len(doc["keys"])
    shrank += n < last
    last = n
    seen.add(sum(k["latest_version"] for k in doc["keys"]))
print(json.dumps({"reads": reads, "torn": torn, "shrank": shrank, "states": len(seen)}))
"""


def test_a_reader_never_sees_a_torn_catalog(ledger, home, tmp_path):
    stop = tmp_path / "stop"
    reader = _spawn(_READER, str(home / SNAPSHOT_NAME), str(stop))
    try:
        with ledger.keep_store_open():
            for i in range(15):
                ledger.create_key(f"k{i}", spec="AES_256")
                ledger.rotate(f"k{i}")
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    got = json.loads(out or "{}") if reader.returncode == 0 else pytest.fail(err)
    assert got["reads"] > 0 and got["torn"] == 0 and got["shrank"] == 0
    assert got["states"] > 1  # it did read while the catalog changed


_DIES_BEFORE_EXPORT = """
import os, signal, sys
import keyledger as kl
from keyledger.store import catalog
led = kl.open(sys.argv[1], principal="alice")
def die(self, con):  # the commit is in; the process dies before catalog.json follows
    os.kill(os.getpid(), signal.SIGKILL)
catalog.SnapshotExporter.__call__ = die
led.disable("a", reason="stop using it")
"""


def test_a_change_whose_process_died_before_its_export_reaches_catalog_json(ledger, home):
    ledger.create_key("a", spec="AES_256")
    ledger.create_key("b", spec="AES_256")
    blob = ledger.encrypt("a", b"secret")
    ledger.rotate("b")  # this long-running process has exported before
    child = _spawn(_DIES_BEFORE_EXPORT, str(home))
    child.communicate(timeout=120)  # commits, then dies
    assert child.returncode == -9
    assert json.loads((home / SNAPSHOT_NAME).read_text())["keys"][0]["state"] == "active"
    with ledger.keep_store_open():
        ledger.rotate("b")  # an unrelated change: its export finds the dead process's commit
    doc = json.loads((home / SNAPSHOT_NAME).read_text())
    assert {k["name"]: k["state"] for k in doc["keys"]} == {
        "a": kl.KeyState.SUSPENDED.value, "b": "active"}
    assert ledger.get_key("a").state is kl.KeyState.SUSPENDED
    with pytest.raises(kl.KeyStateError):
        ledger.encrypt("a", b"more")
    with pytest.raises(kl.KeyStateError):
        ledger.decrypt(blob)
    with ledger._rt.db.snapshot() as tx:
        assert (home / SNAPSHOT_NAME).read_text() == json.dumps(
            {"keys": cat.key_docs(tx.con),
             "grants": [list(g) for g in tx.execute(
                 "SELECT scope, principal, role FROM grants ORDER BY ALL").fetchall()],
             "home_policy": cat.read_home_policy(tx.con)}, separators=(",", ":"))


def test_a_hand_edited_catalog_json_is_replaced_by_the_next_export(ledger, home):
    # someone with write access to the home marks a suspended key active in the snapshot
    ledger.create_key("a", spec="AES_256")
    ledger.disable("a")
    ledger.create_key("b", spec="AES_256")
    path = home / SNAPSHOT_NAME
    path.write_text(path.read_text().replace('"state":"suspended"', '"state":"active"'))
    ledger.rotate("b")  # any change: its export compares the file with the catalog's rows
    assert json.loads(path.read_text())["keys"][0]["state"] == "suspended"
    ledger._rt.catalog.refresh(force=True)
    assert ledger.get_key("a").state is kl.KeyState.SUSPENDED


# -- a held store: create and rotate export what they wrote, without reading it back -----------------
def _committed_encoding(led: kl.KeyLedger) -> str:
    """catalog.json as a full encoding of the committed catalog would be, read through the held
    store (a snapshot would set the keeper aside and end the unbroken hold)."""
    with led._rt.db.read() as tx:
        doc = {"keys": cat.key_docs(tx),
               "grants": [list(g) for g in tx.execute(
                   "SELECT scope, principal, role FROM grants ORDER BY ALL").fetchall()],
               "home_policy": cat.read_home_policy(tx)}
    return json.dumps(doc, separators=(",", ":"))


def _fresh_key(led: kl.KeyLedger, name: str) -> kl.Key:
    with led._rt.db.read() as tx:
        return cat.load_key(tx, name)


def test_held_creates_and_rotations_export_exactly_what_they_committed(ledger, home, clock,
                                                                       monkeypatch):
    full_checks: list[int] = []
    full = cat.SnapshotExporter._export

    def counting(self, con, expected):
        full_checks.append(1)
        return full(self, con, expected)

    monkeypatch.setattr(cat.SnapshotExporter, "_export", counting)
    ledger.create_key("before", spec="AES_256")
    steps = [
        ("a", lambda: ledger.create_key("a", spec="AES_256", tags={"team": "pay"},
                                        owner="team-pay", rotation_period="30d")),
        ("s", lambda: ledger.create_key("s", spec="EC_P256", activate=False)),
        ("a", lambda: ledger.rotate("a")),
        ("a", lambda: ledger.rotate("a", reason="again")),
        ("before", lambda: ledger.rotate("before")),
        ("m", lambda: ledger.create_key("m", spec="HMAC_SHA256")),
    ]
    with ledger.keep_store_open():
        ledger.create_key("first-in-hold", spec="AES_256")  # checks the tables once
        full_checks.clear()
        for i, (name, step) in enumerate(steps):
            clock.advance(minutes=5)
            returned = step()
            assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger), i
            assert returned == _fresh_key(ledger, name) == ledger.get_key(name), i
        assert full_checks == []  # none of them read the catalog back
        # other changes still check the tables, and read again what the fast ones built
        for name, step in [("a", lambda: ledger.set_alias("a", "a-now")),
                           ("a", lambda: ledger.rotate("a")),  # keeps the alias
                           ("s", lambda: ledger.mark_compromised("s", "leaked")),
                           ("s", lambda: ledger.rotate("s")),  # from compromised
                           ("a", lambda: ledger.disable("a")),
                           ("a", lambda: ledger.enable("a")),
                           ("a", lambda: ledger.mark_compromised("a", "leaked")),
                           ("a", lambda: ledger.rotate("a"))]:  # from compromised
            returned = step()
            assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger), name
            assert returned == _fresh_key(ledger, name), name
    assert full_checks  # the state changes above did
    doc = json.loads((home / SNAPSHOT_NAME).read_text())
    a = next(k for k in doc["keys"] if k["name"] == "a")
    assert a["aliases"] == ["a-now"] and [v[2] for v in a["versions"]] == [
        "compromised", "compromised", "compromised", "compromised", "active"]


def test_a_held_create_without_the_creators_grant(ledger, home):
    ledger.set_policy("*", creator_is_user=False)
    with ledger.keep_store_open():
        ledger.create_key("x", spec="AES_256")
        ledger.create_key("y", spec="AES_256")
        assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger)


_OTHER_PROCESS = """
import os, signal, sys
import keyledger as kl
from keyledger.store import catalog
led = kl.open(sys.argv[1], principal="alice")
if sys.argv[2] == "dies":
    def die(self, con):  # the commit is in; the process dies before catalog.json follows
        os.kill(os.getpid(), signal.SIGKILL)
    catalog.SnapshotExporter.__call__ = die
led.disable("a", reason="from another process")
led.create_key("theirs", spec="AES_256")
led.close()
"""


@pytest.mark.parametrize("other", ["exports", "dies"])
def test_another_process_commit_between_holds_is_in_the_next_held_export(ledger, home, other):
    with ledger.keep_store_open():
        ledger.create_key("a", spec="AES_256")
        ledger.create_key("b", spec="AES_256")  # built from its rows: this process's view
    child = _spawn(_OTHER_PROCESS, str(home), other)
    child.communicate(timeout=120)
    assert child.returncode == (-9 if other == "dies" else 0)
    with ledger.keep_store_open():
        ledger.create_key("c", spec="AES_256")  # the first export of this hold
        ledger.rotate("b")
        doc = json.loads((home / SNAPSHOT_NAME).read_text())
        assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger)
    names = {k["name"]: k["state"] for k in doc["keys"]}
    assert names["a"] == kl.KeyState.SUSPENDED.value
    assert ("theirs" in names) == (other == "exports")  # a dead process made no second change
    assert ledger.get_key("a").state is kl.KeyState.SUSPENDED


def test_rows_of_a_transaction_rolled_back_are_never_exported(ledger, home):
    with ledger.keep_store_open():
        key = ledger.create_key("a", spec="AES_256")
        with pytest.raises(RuntimeError), ledger._rt.db.write() as tx:
            tx.execute("UPDATE keys SET state = 'suspended' WHERE key_id = ?", [key.key_id])
            ledger._rt.exporter.wrote(tx, key.key_id, {"state": "suspended"})
            raise RuntimeError("the transaction fails after naming its rows")
        ledger.create_key("b", spec="AES_256")
        assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger)
    assert ledger.get_key("a").state is kl.KeyState.ACTIVE


def test_a_state_change_during_a_held_rotation_rolls_it_back(ledger, home, monkeypatch):
    ledger.create_key("a", spec="AES_256")
    backend = ledger._rt.backend
    generate = backend.generate

    def disabled_meanwhile(*args, **kwargs):
        out = generate(*args, **kwargs)
        ledger.disable("a", reason="meanwhile")  # between the intent and the commit
        return out

    with ledger.keep_store_open():
        monkeypatch.setattr(backend, "generate", disabled_meanwhile)
        with pytest.raises(kl.KeyStateError, match="became suspended during the rotation"):
            ledger.rotate("a")
        monkeypatch.undo()
        assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger)
    key = ledger.get_key("a")
    assert key.state is kl.KeyState.SUSPENDED and key.latest_version == 1
    assert ledger.reconcile().problems == []


def test_held_creates_and_rotations_read_nothing_the_last_export_knows(ledger, home, clock,
                                                                       monkeypatch):
    """Issue 18 §5, flat in the number of keys: while the store is held and nothing else can
    have changed, a create's name check and a rotation's state check come from the last
    export (no SELECT), and the process's catalog takes the changed key without a pass over
    every key (no rebuilt view)."""
    main = threading.get_ident()
    statements: list[str] = []
    recording = [False]
    execute = db.Tx.execute

    def counting(self, sql, params=None):
        if recording[0] and threading.get_ident() == main:  # not the background ingest
            statements.append(" ".join(sql.split()))
        return execute(self, sql, params)

    rebuilt: list[int] = []
    whole_view = cat._view

    def counting_view(*args):
        rebuilt.append(1)
        return whole_view(*args)

    ledger.create_key("old", spec="AES_256")
    with ledger.keep_store_open():
        ledger.create_key("first", spec="AES_256")  # the hold's first export checks the tables
        monkeypatch.setattr(db.Tx, "execute", counting)
        monkeypatch.setattr(cat, "_view", counting_view)
        for step in (lambda: ledger.create_key("a", spec="AES_256"),
                     lambda: ledger.rotate("a"), lambda: ledger.rotate("old"),
                     lambda: ledger.create_key("b", spec="EC_P256")):
            clock.advance(minutes=1)
            recording[0] = True
            step()
            recording[0] = False
            assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger)
        recording[0] = True
        with pytest.raises(kl.KeyExists):
            ledger.create_key("old", spec="AES_256")  # refused from the export's names
        monkeypatch.undo()
    assert [s for s in statements if s.startswith("SELECT")] == []
    assert rebuilt == []
    assert ledger.get_key("a").latest_version == 2 and ledger.get_key("old").latest_version == 2
    assert ledger.get_key("b").spec.name == "EC_P256"


_TAKES_NAMES = """
import sys
import keyledger as kl
with kl.open(sys.argv[1], principal="alice") as led:
    led.create_key("theirs", spec="AES_256")
    led.set_alias("a", "a-alias")
    led.rotate("a")
"""


def test_held_checks_see_what_another_process_and_other_calls_changed(ledger, home):
    with ledger.keep_store_open():
        ledger.create_key("a", spec="AES_256")
        ledger.create_key("b", spec="AES_256")
    child = _spawn(_TAKES_NAMES, str(home))
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    with ledger.keep_store_open():
        ledger.create_key("c", spec="AES_256")  # the first export of this hold reads theirs
        for taken in ("theirs", "a-alias", "a"):
            with pytest.raises(kl.KeyExists):
                ledger.create_key(taken, spec="AES_256")
        assert ledger.rotate("a").latest_version == 3  # on top of the other process's v2
        ledger.set_alias("c", "c-alias")  # another kind of change, in this process
        with pytest.raises(kl.KeyExists):
            ledger.create_key("c-alias", spec="AES_256")
        ledger.disable("b")
        with pytest.raises(kl.KeyStateError):
            ledger.rotate("b")
        assert (home / SNAPSHOT_NAME).read_text() == _committed_encoding(ledger)
    assert ledger.get_key("b").latest_version == 1
