"""Journal seals: records that reach the ledger carry HSM proof that keyledger wrote them, and
``verify_audit()`` is not OK while the ledger is not whole (docs/audit.md "Seals" and
"What verify_audit() checks").

The attacker here can write the home's files (journals, the DuckDB file) but cannot use the
HSM keys. Each test forges, breaks or kills something for real and checks what a person reading
``verify_audit()`` (or ``keyledger audit verify``) is told.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import duckdb
import pytest

import keyledger as kl
from keyledger.cli import main as cli_main
from keyledger.config import write_config
from keyledger.errors import AccessDenied, InvalidInput
from keyledger.store.journal import LINE_FIELDS, genesis, journal_pid, record_hash

DEAD_PID = 999_999_999  # no process has it (pid_max is at most 2^22)


def _forged_line(journal: str, jseq: int, prev: str, principal: str, action: str,
                 key: str | None, time_us: int, detail: str | None = None) -> tuple[str, str]:
    """One record line in the published format (docs/audit.md), correctly hashed and chained."""
    pid = journal_pid(journal)
    assert pid is not None
    fields = dict(jseq=jseq, time_us=time_us, principal=principal, action=action, key=key,
                  key_id=None, version=None, outcome="ok", error=None, detail=detail,
                  context=None, pid=pid, prev=prev)
    h = record_hash(journal, **fields)
    line = [fields[name] for name in LINE_FIELDS[:-1]] + [h]
    return json.dumps(line, separators=(",", ":")) + "\n", h


def _records(path: Path) -> list[list]:
    """The record lines of a journal (seal lines left out)."""
    return [json.loads(line) for line in path.read_text().splitlines()
            if not line.startswith('["seal"')]


def _append_forged(path: Path, principal: str = "mallory", action: str = "destroy") -> int:
    """Append one correctly chained record to an existing journal; returns its jseq."""
    journal = path.name.removesuffix(".jsonl")
    last = _records(path)[-1]
    line, _ = _forged_line(journal, last[0] + 1, last[-1], principal, action, "k", last[1] + 1)
    with path.open("a") as fh:
        fh.write(line)
    return last[0] + 1


def _closed_journal(home: Path) -> Path:
    """A home with one key, and the path of the journal of the (closed) process that made it."""
    with kl.open(home, principal="alice") as led:
        led.create_key("k", spec="AES_256")
        led.encrypt("k", b"x")
        own = led._rt.journal.path
    return own


def _settings(home: Path, section: str, **values: object) -> None:
    data = tomllib.loads((home / "keyledger.toml").read_text())
    data.setdefault(section, {}).update(values)
    write_config(home, data)


def _query(home: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(home / "keyledger.duckdb"))
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def test_a_normal_home_verifies_with_every_record_proven(ledger):
    ledger.create_key("k", spec="AES_256")
    for _ in range(20):
        ledger.decrypt(ledger.encrypt("k", b"x"))
    report = ledger.verify_audit()
    assert report.ok, str(report)
    df = ledger.audit()
    assert len(df) > 40 and df["proven"].all()


def test_forged_journal_in_the_published_format_is_reported(home, ledger):
    ledger.create_key("k", spec="AES_256")
    journal = f"{socket.gethostname()}-{DEAD_PID}-{'ab' * 6}"
    prev, lines = genesis(journal), []
    t = 1_700_000_000_000_000
    for i, (who, action) in enumerate((("bob", "destroy"), ("carol", "grant")), start=1):
        line, prev = _forged_line(journal, i, prev, who, action, "k", t + i)
        lines.append(line)
    (home / "journal" / f"{journal}.jsonl").write_text("".join(lines))

    report = ledger.verify_audit()
    assert not report.ok
    text = " ".join(report.problems)
    assert journal in text and "records 1-2 are unproven" in text and "forged" in text
    assert report.first_bad["journal"] == journal and report.first_bad["jseq"] == 1
    forged = ledger.audit(principal="bob")  # the lines are in the ledger, marked unproven
    assert list(forged["action"]) == ["destroy"] and not forged["proven"].any()


def test_cli_audit_verify_exits_1_on_a_forged_journal(home, capsys):
    _closed_journal(home)
    journal = f"{socket.gethostname()}-{DEAD_PID}-{'cd' * 6}"
    line, _ = _forged_line(journal, 1, genesis(journal), "bob", "destroy", "k", 1)
    (home / "journal" / f"{journal}.jsonl").write_text(line)
    cli = ["--home", str(home), "--principal", "alice", "audit"]
    assert cli_main([*cli, "verify"]) == 1
    assert journal in capsys.readouterr().out
    assert cli_main([*cli, "accept-unproven", journal, "1", "--reason", "INC-9: red team"]) == 0
    assert cli_main([*cli, "verify"]) == 0
    assert "accepted by an admin" in capsys.readouterr().out


def test_line_appended_to_a_dead_journal_is_unproven_until_accepted(home):
    path = _closed_journal(home)
    jseq = _append_forged(path)
    with kl.open(home, principal="alice") as led:
        report = led.verify_audit()
        assert not report.ok
        journal = path.name.removesuffix(".jsonl")
        assert f"journal {journal}: records {jseq}-{jseq} are unproven" in " ".join(
            report.problems)
        # the way forward: an admin accepts the range after investigating
        with pytest.raises(InvalidInput):
            led.accept_unproven(journal, jseq + 5, "beyond what exists")
        led.accept_unproven(journal, jseq, "INC-42: test line written by the red team")
        report = led.verify_audit()
        assert report.ok, str(report)
        assert any(journal in note for note in report.accepted)
        acc = led.audit(action="accept_unproven")
        assert list(acc["outcome"]) == ["failed", "ok"]  # the refused call is audited too
        assert "INC-42" in acc["detail"][1] and acc["proven"][1]


def test_accept_unproven_needs_an_admin_and_is_audited(home):
    path = _closed_journal(home)
    jseq = _append_forged(path)
    journal = path.name.removesuffix(".jsonl")
    with kl.open(home, principal="alice") as led:
        led.grant("*", "aud", "auditor")
    with kl.open(home, principal="aud") as aud:
        with pytest.raises(AccessDenied):
            aud.accept_unproven(journal, jseq, "I say so")
        assert not aud.verify_audit().ok
        denied = aud.audit(action="accept_unproven")
        assert list(denied["outcome"]) == ["denied"]


def test_forged_acceptance_record_is_not_trusted(home):
    """An acceptance is trusted only as a proven record: forging one does not make verify OK."""
    path = _closed_journal(home)
    jseq = _append_forged(path)
    journal = path.name.removesuffix(".jsonl")
    forger = f"{socket.gethostname()}-{DEAD_PID}-{'ef' * 6}"
    line, _ = _forged_line(forger, 1, genesis(forger), "alice", "accept_unproven", None, 1,
                           detail=f"accepted unproven records of {journal} through {jseq}: x")
    (path.parent / f"{forger}.jsonl").write_text(line)
    with kl.open(home, principal="alice") as led:
        report = led.verify_audit()
    assert not report.ok
    assert f"journal {journal}: records {jseq}-{jseq} are unproven" in " ".join(report.problems)


def test_line_appended_to_a_live_journal_is_unproven(ledger):
    ledger.create_key("k", spec="AES_256")
    ledger.encrypt("k", b"x")
    ledger.flush_audit()
    path = ledger._rt.journal.path
    jseq = _append_forged(path)
    report = ledger.verify_audit()
    assert not report.ok
    assert f"records {jseq}-{jseq} are unproven" in " ".join(report.problems)


def test_junk_file_is_reported_and_does_not_stop_ingest(home, ledger):
    ledger.create_key("k", spec="AES_256")
    (home / "journal" / "notajournal.jsonl").write_text("hello\n")
    ledger.encrypt("k", b"x")
    df = ledger.audit(action="encrypt")  # ingest goes on; audit() works
    assert len(df) == 1
    report = ledger.verify_audit()
    assert not report.ok
    assert "notajournal.jsonl" in " ".join(report.problems)
    assert report.records >= 4  # every record so far was ingested


def test_unparseable_line_stops_only_its_journal_and_is_named(home):
    path = _closed_journal(home)
    n_before = len(_records(path))
    with path.open("a") as fh:
        fh.write('[99,"not a record"]\n')
    with kl.open(home, principal="alice") as led:
        led.encrypt("k", b"y")
        assert len(led.audit(action="encrypt")) == 2  # the other journals are ingested
        report = led.verify_audit()
    assert not report.ok
    text = " ".join(report.problems)
    journal = path.name.removesuffix(".jsonl")
    assert f"journal {journal}: line 1 after the ingested part cannot be ingested" in text
    assert f"after record {n_before}" in text


def test_truncated_journal_is_reported(home):
    path = _closed_journal(home)
    os.truncate(path, path.stat().st_size // 2)
    with kl.open(home, principal="alice") as led:
        report = led.verify_audit()
    assert not report.ok
    assert f"journal {path.name.removesuffix('.jsonl')} no longer holds what was ingested" in \
        " ".join(report.problems)


def test_truncating_a_live_journal_does_not_silently_drop_later_records(ledger):
    ledger.create_key("k", spec="AES_256")
    ledger.flush_audit()
    path = ledger._rt.journal.path
    os.truncate(path, 10)
    ledger.encrypt("k", b"x")  # appended after the cut: ingest must not read it misaligned
    ledger.encrypt("k", b"x")
    report = ledger.verify_audit()
    assert not report.ok
    assert "truncated or rewritten" in " ".join(report.problems)


def test_time_going_backwards_within_a_journal_is_reported(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.encrypt("k", b"x")
    clock.advance(hours=-1)  # far more than two racing threads could explain
    ledger.encrypt("k", b"x")
    clock.advance(hours=2)
    report = ledger.verify_audit()
    assert not report.ok
    assert "time went backwards" in " ".join(report.problems)
    assert report.first_bad["action"] == "encrypt"


def test_tampered_seal_mac_is_reported(home, ledger):
    ledger.create_key("k", spec="AES_256")
    ledger._rt.stop_background_ingest()
    ledger.flush_audit()
    ledger.encrypt("k", b"x")
    ledger._rt.journal.seal()
    path = ledger._rt.journal.path
    data = path.read_bytes()
    at = data.rindex(b'["seal"')
    mac_at = data.index(b'"]\n', at) - 1
    flipped = b"0" if data[mac_at:mac_at + 1] != b"0" else b"1"
    with path.open("r+b") as fh:  # same length, in place: the writer keeps appending
        fh.seek(mac_at)
        fh.write(flipped)
    report = ledger.verify_audit()
    assert not report.ok
    assert "does not verify with the HSM seal key" in " ".join(report.problems)


def test_stored_seal_altered_in_the_store_is_reported(home):
    path = _closed_journal(home)
    journal = path.name.removesuffix(".jsonl")
    # whoever can write the DuckDB file claims more than the seal proves
    _query(home, "UPDATE journal_offsets SET seal_jseq = tip_jseq + 1 WHERE journal = ?",
           [journal])
    with kl.open(home, principal="alice") as led:
        report = led.verify_audit()
    assert not report.ok
    assert f"journal {journal}: its stored seal" in " ".join(report.problems)


_KILLED_WORKER = """
import sys
import keyledger as kl
led = kl.open(sys.argv[1], principal="alice")
for i in range(30):
    led.encrypt("k", b"x", context={"i": str(i)})
print("done", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_sigkill_leaves_an_unsealed_tail_unproven_not_lost(home):
    _closed_journal(home)
    # no seal round before the kill: its records after open are all unsealed
    _settings(home, "audit", fsync_interval_ms=600_000)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_KILLED_WORKER), str(home)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("done"), proc.communicate(timeout=30)[1]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    _settings(home, "audit", fsync_interval_ms=50)
    with kl.open(home, principal="alice") as led:
        df = led.audit(action="encrypt")
        killed = df[df["pid"] == proc.pid]
        assert len(killed) == 30 and not killed["proven"].any()  # present, not lost
        report = led.verify_audit()
        assert not report.ok
        journal = killed["journal"].iloc[0]
        last = int(killed["jseq"].max())
        text = " ".join(report.problems)
        assert f"journal {journal}: records 1-{last} are unproven" in text
        assert "killed" in text
        led.accept_unproven(journal, last, "worker SIGKILLed by the test; 30 calls it made")
        report = led.verify_audit()
        assert report.ok, str(report)


def test_a_home_from_before_seals_verifies_after_the_upgrade(home):
    """The first open after the upgrade makes the seal key and seals what the ledger holds."""
    _closed_journal(home)
    # what a home written by the version before seals looks like: no seal key, no seals
    _query(home, "DELETE FROM meta WHERE name = 'seal_key'")
    _query(home, "UPDATE journal_offsets SET seal_jseq = NULL, seal_hash = NULL, "
                 "seal_mac = NULL")
    with kl.open(home, principal="alice") as led:
        assert _query_key(led) is not None
        led.encrypt("k", b"x")
        report = led.verify_audit()
        assert report.ok, str(report)
        assert led.audit()["proven"].all()


def _query_key(led: kl.KeyLedger) -> str | None:
    with led._rt.db.read() as tx:
        row = tx.execute("SELECT value FROM meta WHERE name = 'seal_key'").fetchone()
    return row[0] if row else None
