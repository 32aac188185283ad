"""The audit ledger: one record per call, tamper evidence, no secrets, filters, exports, usage.

Invariants 1 and 2 of DESIGN.md. Every test runs against a real SoftHSM2 token and a real DuckDB
file. Tampering is done the way someone with write access to the store (but not the HSM PIN)
would do it: close the ledger, edit ``keyledger.duckdb`` with DuckDB directly, reopen and verify;
a few cases edit the store behind a running ledger and verify before anything new is ingested.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from conftest import FakeClock

import keyledger as kl
from keyledger.config import write_config
from keyledger.hsm.softhsm import softhsm_conf_text
from keyledger.model import name_digest
from keyledger.store.checkpoints import TIPS_SQL, checkpoint_hash
from keyledger.store.verify import ROW_HASH_SQL

CTX = {"tenant": "acme", "app": "billing"}
CTX_JSON = '{"app":"billing","tenant":"acme"}'  # canonical: sorted keys, compact


def _none(value: object) -> object:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def _records(df: pd.DataFrame) -> list[tuple]:
    """(action, outcome, error, key, version, context, principal) per row, None for nulls."""
    cols = ["action", "outcome", "error", "key", "version", "context", "principal"]
    out = []
    for row in df[cols].itertuples(index=False):
        vals = [_none(v) for v in row]
        if vals[4] is not None:
            vals[4] = int(vals[4])
        out.append(tuple(vals))
    return out


def _db(home: Path) -> duckdb.DuckDBPyConnection:
    """The raw store; only while no ledger has the home open."""
    return duckdb.connect(str(home / "keyledger.duckdb"))


def _query(home: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = _db(home)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


# -- invariant 1: exactly one record per call ------------------------------------------------------


def test_every_call_writes_exactly_one_record(ledger, clock):
    step = timedelta(seconds=1)
    expected: list[tuple] = [("open", "ok", None, None, None, None, "alice")]

    def call(record: tuple, fn, *args, raises=None, **kwargs):
        clock.advance(seconds=1)
        if raises is None:
            result = fn(*args, **kwargs)
        else:
            with pytest.raises(raises):
                fn(*args, **kwargs)
            result = None
        expected.append((*record, "alice"))
        return result

    call(("create_key", "ok", None, "orders", 1, None), ledger.create_key, "orders", spec="AES_256")
    blob = call(("encrypt", "ok", None, "orders", 1, CTX_JSON), ledger.encrypt, "orders",
                b"pay 10", context=CTX)
    call(("decrypt", "ok", None, "orders", 1, CTX_JSON), ledger.decrypt, blob, context=CTX)
    call(("decrypt", "failed", "InvalidCiphertext", "orders", 1, '{"tenant":"evil"}'),
         ledger.decrypt, blob, context={"tenant": "evil"}, raises=kl.InvalidCiphertext)
    call(("encrypt", "failed", "KeyNotFound", name_digest("nope"), None, None), ledger.encrypt,
         "nope", b"x", raises=kl.KeyNotFound)  # a name of no key: only its hash is kept
    call(("rotate", "ok", None, "orders", 2, None), ledger.rotate, "orders")
    call(("encrypt", "ok", None, "orders", 2, None), ledger.encrypt, "orders", b"y")
    call(("decrypt", "failed", "InvalidCiphertext", None, None, None), ledger.decrypt,
         b"not a ciphertext", raises=kl.InvalidCiphertext)
    call(("sign", "failed", "PolicyViolation", "orders", None, None), ledger.sign, "orders", b"m",
         raises=kl.PolicyViolation)
    call(("encrypt", "failed", "InvalidInput", "orders", None, None), ledger.encrypt, "orders",
         "text, not bytes", raises=kl.InvalidInput)
    call(("disable", "ok", None, "orders", None, None), ledger.disable, "orders")
    call(("encrypt", "failed", "KeyStateError", "orders", None, None), ledger.encrypt, "orders",
         b"z", raises=kl.KeyStateError)
    call(("enable", "ok", None, "orders", None, None), ledger.enable, "orders")
    call(("create_key", "failed", "KeyExists", "orders", None, None), ledger.create_key, "orders",
         spec="AES_256", raises=kl.KeyExists)
    call(("get_key", "ok", None, "orders", None, None), ledger.get_key, "orders")
    call(("list_keys", "ok", None, None, None, None), ledger.list_keys)
    clock.advance(seconds=1)
    with kl.open(ledger.home, principal="eve", clock=clock) as eve:  # no role anywhere
        expected.append(("open", "ok", None, None, None, None, "eve"))
        clock.advance(seconds=1)
        with pytest.raises(kl.AccessDenied):
            eve.encrypt("orders", b"x")
        expected.append(("encrypt", "denied", "AccessDenied", "orders", None, None, "eve"))
        clock.advance(seconds=1)
        with pytest.raises(kl.AccessDenied):
            eve.audit()
        expected.append(("audit", "denied", "AccessDenied", None, None, None, "eve"))
    n = len(expected)

    df = ledger.audit()
    assert len(df) == n
    assert _records(df) == expected
    start = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
    assert list(df["time"]) == [start + i * step for i in range(n)]
    # one journal per process, contiguous record numbers: nothing written twice or skipped
    assert df["journal"].nunique() == 1
    assert list(df["jseq"]) == list(range(1, n + 1))
    # the caller sees one opaque error; the ledger keeps the precise reason
    wrong_ctx = df.iloc[4]
    assert "wrong context" in wrong_ctx["detail"]
    # the audit() call itself is one more record, seen by the next read
    again = ledger.audit()
    assert len(again) == n + 1
    assert _records(again.tail(1)) == [("audit", "ok", None, None, None, None, "alice")]
    assert ledger.verify_audit().ok


def test_records_name_the_principal_of_each_ledger(home, clock):
    with kl.open(home, principal="alice", clock=clock) as alice, \
            kl.open(home, principal="bob", clock=clock) as bob:
        alice.create_key("k", spec="HMAC_SHA256")
        with pytest.raises(kl.AccessDenied):
            bob.mac("k", b"m")
        alice.grant("k", "bob", "user")
        tag = bob.mac("k", b"m")
        assert alice.verify_mac("k", b"m", tag)
        df = alice.audit()
    assert [(r.principal, r.action, r.outcome) for r in df.itertuples()] == [
        ("alice", "open", "ok"), ("bob", "open", "ok"), ("alice", "create_key", "ok"),
        ("bob", "mac", "denied"), ("alice", "grant", "ok"), ("bob", "mac", "ok"),
        ("alice", "verify_mac", "ok")]
    denied = df.iloc[3]
    assert denied["error"] == "AccessDenied" and denied["key"] == "k"


# -- invariant 2: tamper evidence ---------------------------------------------------------------


def _populated_home(home: Path, clock) -> None:
    """Two journals (two opens), 40+ records, several checkpoints; all ingested on close."""
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("k", spec="AES_256")
        led.grant("k", "bob", "user")
        led.grant("*", "carol", "auditor")
        for i in range(20):
            clock.advance(minutes=1)
            led.encrypt("k", b"row %d" % i, context={"i": str(i)})
            if i % 6 == 5:
                led.flush_audit()
        led.flush_audit()
    with kl.open(home, principal="bob", clock=clock) as led:
        for i in range(20):
            clock.advance(minutes=1)
            blob = led.encrypt("k", b"more %d" % i)
            led.decrypt(blob)
            if i % 7 == 6:
                led.flush_audit()
        led.flush_audit()
    # on close every record is in the store, none left only in the journals
    n_store = _query(home, "SELECT count(*) FROM audit_log")[0][0]
    n_journal = sum(not line.startswith('["seal"') for p in (home / "journal").glob("*.jsonl")
                    for line in p.read_text().splitlines())
    assert n_store == n_journal >= 60


def _tamper(home: Path, *sqls: str) -> None:
    con = _db(home)
    try:
        for sql in sqls:
            con.execute(sql)
    finally:
        con.close()


def _verify(home: Path, clock) -> kl.VerifyReport:
    with kl.open(home, principal="carol", clock=clock) as led:
        return led.verify_audit()


MID = 12  # a record in the middle of the first journal


def _max_seq(home: Path) -> int:
    return _query(home, "SELECT max(seq) FROM audit_log")[0][0]


@pytest.fixture(scope="module")
def _template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("template") / "home"
    _populated_home(home, FakeClock())
    return home


@pytest.fixture
def tampered_home(_template, home, clock):
    """A private copy of the populated home (its SoftHSM2 config pointed at its own tokens)."""
    shutil.copytree(_template, home)
    (home / "softhsm2.conf").write_text(softhsm_conf_text(home / "tokens"))
    clock.advance(hours=2)  # later than every copied record
    return home


def test_untouched_ledger_verifies(tampered_home, clock):
    report = _verify(tampered_home, clock)
    assert report.ok, str(report)
    assert report.first_bad is None and not report.problems
    assert report.records >= 60 and report.checkpoints >= 5
    assert "OK" in str(report)
    # verifying again (after more records and checkpoints) still holds
    assert _verify(tampered_home, clock).ok


def test_changed_field_is_detected(tampered_home, clock):
    mid = MID
    _tamper(tampered_home, f"UPDATE audit_log SET principal = 'mallory' WHERE seq = {mid}")
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert report.first_bad["seq"] == mid
    assert any("modified" in p for p in report.problems)
    assert f"seq {mid}" in str(report)


@pytest.mark.parametrize("column, value", [
    ("outcome", "'failed'"), ("key", "'other'"), ("version", "7"), ("context", "NULL"),
    ("time", "time + INTERVAL 1 SECOND"), ("error", "'X'"),
])
def test_every_recorded_field_is_covered_by_the_hash(tampered_home, clock, column, value):
    mid = MID
    _tamper(tampered_home, f"UPDATE audit_log SET {column} = {value} WHERE seq = {mid}")
    report = _verify(tampered_home, clock)
    assert not report.ok and report.first_bad["seq"] == mid


def test_deleted_middle_record_is_detected(tampered_home, clock):
    mid = MID
    _tamper(tampered_home, f"DELETE FROM audit_log WHERE seq = {mid}")
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert report.first_bad["seq"] == mid + 1  # the record whose link now points nowhere
    assert any("chain link" in p for p in report.problems)


def test_inserted_forged_record_is_detected(tampered_home, clock):
    max_seq, mid = _max_seq(tampered_home), MID
    _tamper(tampered_home,
            f"""INSERT INTO audit_log SELECT {max_seq} + 1, journal, jseq + 1000, time, principal,
                action, key, key_id, version, outcome, error, detail, context, pid, prev,
                sha256('forged') FROM audit_log WHERE seq = {mid}""")
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert report.first_bad["seq"] == max_seq + 1


def _forge_tail(home: Path) -> int:
    """Append a well-formed record (right hash, right chain link) to the newest journal, as a
    forger who knows the hash recipe would; returns its seq."""
    max_seq = _max_seq(home)
    _tamper(home,
            f"CREATE TEMP TABLE f AS SELECT * FROM audit_log WHERE seq = {max_seq}",
            "UPDATE f SET seq = seq + 1, jseq = jseq + 1, prev = hash, principal = 'mallory'",
            f"UPDATE f SET hash = {ROW_HASH_SQL}",
            "INSERT INTO audit_log SELECT * FROM f")
    return max_seq + 1


def test_forged_record_chained_onto_a_journal_tail_is_detected(tampered_home, clock):
    _forge_tail(tampered_home)
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert report.problems


def test_forged_tail_record_is_named_in_the_report(tampered_home, clock):
    forged = _forge_tail(tampered_home)
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert report.first_bad is not None and report.first_bad.get("seq") == forged


def test_swapped_record_numbers_are_detected(tampered_home, clock):
    mid = MID
    a, b = mid, mid + 1
    _tamper(tampered_home,
            f"""UPDATE audit_log SET jseq = CASE WHEN seq = {a}
                  THEN (SELECT jseq FROM audit_log WHERE seq = {b})
                  ELSE (SELECT jseq FROM audit_log WHERE seq = {a}) END
                WHERE seq IN ({a}, {b})""")
    report = _verify(tampered_home, clock)
    assert not report.ok and report.first_bad["seq"] in (a, b)


def test_reordered_records_are_detected(tampered_home, clock):
    # swap the positions of two whole records (their ledger sequence numbers)
    mid = MID
    a, b = mid, mid + 3
    _tamper(tampered_home,
            f"UPDATE audit_log SET seq = CASE WHEN seq = {a} THEN {b} ELSE {a} END "
            f"WHERE seq IN ({a}, {b})")
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert any("reordered" in p for p in report.problems)
    assert a <= report.first_bad["seq"] <= b


def test_swapped_contents_are_detected(tampered_home, clock):
    # keep seq/jseq/prev/hash in place but exchange what two records say
    a, b = MID, MID + 1
    before = dict(_query(tampered_home, f"SELECT seq, context FROM audit_log WHERE seq IN ({a}, {b})"))
    assert before[a] != before[b]
    cols = ["time", "principal", "action", "key", "version", "outcome", "error", "detail",
            "context"]
    sets = ", ".join(f"{c} = o.{c}" for c in cols)
    _tamper(tampered_home,
            f"CREATE TEMP TABLE o AS SELECT * FROM audit_log WHERE seq IN ({a}, {b})",
            f"UPDATE audit_log SET {sets} FROM o WHERE audit_log.seq + o.seq = {a + b} "
            f"AND audit_log.seq IN ({a}, {b})")
    after = dict(_query(tampered_home, f"SELECT seq, context FROM audit_log WHERE seq IN ({a}, {b})"))
    assert after == {a: before[b], b: before[a]}
    report = _verify(tampered_home, clock)
    assert not report.ok and report.first_bad["seq"] == a


def test_truncated_newest_records_are_detected(tampered_home, clock):
    max_seq = _max_seq(tampered_home)
    _tamper(tampered_home, f"DELETE FROM audit_log WHERE seq > {max_seq - 10}")
    report = _verify(tampered_home, clock)
    assert not report.ok


def test_truncation_with_checkpoints_removed_is_caught_by_the_hsm_head(tampered_home, clock):
    max_seq = _max_seq(tampered_home)
    _tamper(tampered_home,
            f"DELETE FROM audit_log WHERE seq > {max_seq - 10}",
            f"DELETE FROM checkpoints WHERE last_seq > {max_seq - 10}",
            """UPDATE journal_offsets SET tip_jseq = tip_jseq - 10""")
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert any("HSM" in p for p in report.problems)


def _live(home: Path, clock) -> kl.KeyLedger:
    """A ledger whose background ingest stays idle, with nothing left to ingest."""
    _set_settings(home, "audit", ingest_interval_ms=600_000)
    led = kl.open(home, principal="carol", clock=clock)
    led.flush_audit()  # the 'open' record is now checkpointed and the HSM head moved to it
    return led


def test_truncation_is_caught_by_the_hsm_head_while_a_ledger_is_open(tampered_home, clock):
    """Records and checkpoints removed behind a running process: verify_audit() compares the
    ledger with the head the HSM holds (nothing new is ingested in between here)."""
    led = _live(tampered_home, clock)
    try:
        max_seq = _max_seq(tampered_home)
        _tamper(tampered_home,  # no transaction of the ledger is open; DuckDB lets us in
                f"DELETE FROM audit_log WHERE seq > {max_seq - 10}",
                f"DELETE FROM checkpoints WHERE last_seq > {max_seq - 10}")
        report = led.verify_audit()
    finally:
        led.close()
    assert not report.ok
    assert any("HSM holds checkpoint" in p for p in report.problems)


def test_truncation_is_caught_by_the_signed_tips_while_a_ledger_is_open(tampered_home, clock):
    led = _live(tampered_home, clock)
    try:
        max_seq = _max_seq(tampered_home)
        _tamper(tampered_home, f"DELETE FROM audit_log WHERE seq > {max_seq - 10}")
        report = led.verify_audit()
    finally:
        led.close()
    assert not report.ok
    assert any("differ from what it signed" in p for p in report.problems)
    assert report.first_bad and report.first_bad.get("missing") is True


def test_altered_checkpoint_is_detected(tampered_home, clock):
    _tamper(tampered_home, "UPDATE checkpoints SET n_records = n_records - 1 WHERE cp_seq = 3")
    report = _verify(tampered_home, clock)
    assert not report.ok
    assert any("checkpoint 3" in p for p in report.problems)


def test_deleted_checkpoint_is_detected(tampered_home, clock):
    _tamper(tampered_home, "DELETE FROM checkpoints WHERE cp_seq = 2")
    report = _verify(tampered_home, clock)
    assert not report.ok and any("checkpoint" in p for p in report.problems)


def test_replaced_checkpoint_signature_is_detected(tampered_home, clock):
    """Checkpoints are signed by an HSM key: the store alone cannot make a valid signature."""
    led = _live(tampered_home, clock)
    try:
        sig = _query(tampered_home,
                     "SELECT signature FROM checkpoints ORDER BY cp_seq LIMIT 1")[0][0]
        _tamper(tampered_home, f"UPDATE checkpoints SET signature = '{sig}' "
                               "WHERE cp_seq = (SELECT max(cp_seq) FROM checkpoints)")
        report = led.verify_audit()
    finally:
        led.close()
    assert not report.ok
    assert any("signature does not verify" in p for p in report.problems)


def test_recomputed_hash_chain_without_the_hsm_key_is_detected(tampered_home, clock):
    """Rewrite a record and repair every hash after it: rows, chain links, checkpoint chain.
    Only the HSM-held signing key and head stand between this and an undetected forgery."""
    mid = MID
    con = _db(tampered_home)
    try:
        journal, jseq = con.execute("SELECT journal, jseq FROM audit_log WHERE seq = ?",
                                    [mid]).fetchall()[0]
        con.execute("UPDATE audit_log SET principal = 'mallory' WHERE seq = ?", [mid])
        rows = con.execute("SELECT seq FROM audit_log WHERE journal = ? AND jseq >= ? "
                           "ORDER BY jseq", [journal, jseq]).fetchall()
        prev = con.execute("SELECT prev FROM audit_log WHERE seq = ?", [mid]).fetchall()[0][0]
        for (seq,) in rows:
            con.execute("UPDATE audit_log SET prev = ? WHERE seq = ?", [prev, seq])
            con.execute(f"UPDATE audit_log SET hash = {ROW_HASH_SQL} WHERE seq = ?", [seq])
            prev = con.execute("SELECT hash FROM audit_log WHERE seq = ?", [seq]).fetchall()[0][0]
        cp_prev = "0" * 64
        for cp_seq, last_seq, n in con.execute(
                "SELECT cp_seq, last_seq, n_records FROM checkpoints ORDER BY cp_seq").fetchall():
            tips = con.execute(TIPS_SQL, [last_seq]).fetchall()[0][0]
            h = checkpoint_hash(cp_seq, last_seq, n, tips, cp_prev)
            con.execute("UPDATE checkpoints SET tips_digest = ?, prev_hash = ?, hash = ? "
                        "WHERE cp_seq = ?", [tips, cp_prev, h, cp_seq])
            cp_prev = h
    finally:
        con.close()
    report = _verify(tampered_home, clock)
    assert not report.ok


# -- invariant 1: no secrets in the store, journals or exports ------------------------------------


def _forms(secret: bytes) -> list[bytes]:
    """The ways a secret could leak into a text or binary file."""
    return [secret, secret.hex().encode(), base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]


def test_secrets_never_reach_store_journals_or_exports(home, clock, tmp_path):
    plaintexts = [b"SECRET-PLAINTEXT-%d-zq8Xw" % i for i in range(3)]
    big = b"ENVELOPE-PAYLOAD-9d1c " * 50
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("vault", spec="AES_256")
        led.create_key("signer", spec="EC_P256")
        led.create_key("macker", spec="HMAC_SHA256")
        blobs = [led.encrypt("vault", p, context={"purpose": "test"}) for p in plaintexts]
        for blob in blobs:
            led.decrypt(blob, context={"purpose": "test"})
        with pytest.raises(kl.InvalidCiphertext):
            led.decrypt(blobs[0], context={"purpose": "wrong"})
        led.rewrap(blobs[1], context={"purpose": "test"})
        dk = led.generate_data_key("vault")
        env = led.envelope_encrypt("vault", big)
        assert led.envelope_decrypt(env) == big
        led.sign("signer", plaintexts[0])
        led.mac("macker", plaintexts[1])
        with pytest.raises(kl.InvalidInput):
            led.encrypt("vault", plaintexts[2].decode())  # str: refused, must not be logged
        key_repr = repr(led.get_key("vault"))
        texts = [repr(led), key_repr, repr(dk), str(dk), repr(led.list_keys()),
                 repr(led.audit()), str(led.verify_audit())]
        jsonl = led.export_audit(tmp_path / "audit.jsonl", format="jsonl")
        parquet = led.export_audit(tmp_path / "audit_parquet", format="parquet")
    secrets = list(plaintexts) + [big[:40], dk.plaintext]
    secrets += [(home / name).read_text().strip().encode() for name in ("user.pin", "so.pin")]
    assert all(len(s) >= 20 for s in secrets)

    files = [home / "keyledger.duckdb", home / "catalog.json", home / "keyledger.toml",
             jsonl, *sorted(parquet.rglob("*.parquet")), *sorted((home / "journal").glob("*"))]
    files += sorted(home.glob("*.wal"))
    assert len(files) >= 6
    for f in files:
        data = f.read_bytes()
        for s in secrets:
            for form in _forms(s):
                assert form not in data, f"a secret leaked into {f.name}"
    for text in texts:
        for s in secrets:
            forms = [f.decode() for f in _forms(s)[1:]] + [repr(s)]
            if s.isascii():
                forms.append(s.decode())
            assert not any(f in text for f in forms), "a secret leaked into a repr"
    assert "256-bit" in repr(dk) and "vault" in repr(dk)


# -- audit(): filters; export_audit(): jsonl and day-partitioned parquet -------------------------


def test_audit_filters(home, clock):
    t0 = clock()
    with kl.open(home, principal="alice", clock=clock) as alice, \
            kl.open(home, principal="bob", clock=clock) as bob:
        alice.create_key("a", spec="AES_256")
        alice.create_key("b", spec="AES_256")
        alice.grant("*", "bob", "user")
        clock.advance(hours=1)
        t1 = clock()
        for _ in range(3):
            bob.encrypt("a", b"x")
        bob.encrypt("b", b"x")
        with pytest.raises(kl.KeyNotFound):
            bob.encrypt("c", b"x")
        clock.advance(hours=1)
        t2 = clock()
        alice.encrypt("b", b"x")

        assert len(alice.audit(key="a")) == 4  # create + 3 encrypts
        assert set(alice.audit(key="a")["key"]) == {"a"}
        by_bob = alice.audit(principal="bob")
        assert set(by_bob["principal"]) == {"bob"}
        assert list(by_bob["action"]) == ["open"] + ["encrypt"] * 5
        enc = alice.audit(action="encrypt")
        assert len(enc) == 6 and set(enc["action"]) == {"encrypt"}
        failed = alice.audit(outcome="failed")
        assert list(failed["key"]) == [name_digest("c")]  # names no key: hashed
        assert list(failed["error"]) == ["KeyNotFound"]
        assert list(alice.audit(key="c")["seq"]) == list(failed["seq"])  # found by its name
        assert len(alice.audit(action="encrypt", outcome="ok", principal="bob", key="a")) == 3
        # since is inclusive, until exclusive
        assert len(alice.audit(action="encrypt", since=t1, until=t2)) == 5
        assert len(alice.audit(action="encrypt", since=t2)) == 1
        assert len(alice.audit(action="create_key", until=t1)) == 2
        assert len(alice.audit(since=t0 - timedelta(days=1), until=t0)) == 0
        # limit keeps the newest, oldest first (the newest is the read just before)
        everything = alice.audit(limit=None)
        assert list(everything["action"][:2]) == ["open", "open"]
        last = alice.audit(limit=2)
        assert last["seq"].iloc[0] == everything["seq"].iloc[-1]
        assert last["action"].iloc[-1] == "audit"
        assert alice.audit(principal="nobody").empty
        for col in ("time", "principal", "action", "key", "version", "outcome", "error"):
            assert col in last.columns
        assert str(last["time"].dt.tz) == "UTC"


def test_export_jsonl_and_parquet_partitioned_by_day(home, clock, tmp_path):
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("k", spec="AES_256")
        for day in range(3):
            for _ in range(4 + day):
                led.encrypt("k", b"x", context={"day": str(day)})
            if day < 2:
                clock.advance(days=1)
        n = len(led.audit())
        jsonl = led.export_audit(tmp_path / "out.jsonl", format="jsonl")
        pq = led.export_audit(tmp_path / "pq", format="parquet")
        with pytest.raises(kl.InvalidInput):
            led.export_audit(tmp_path / "x.csv", format="csv")
    lines = jsonl.read_text().splitlines()
    assert len(lines) == n + 1  # + the audit() call's own record
    docs = [json.loads(line) for line in lines]
    assert [d["seq"] for d in docs] == sorted(d["seq"] for d in docs)
    assert {"time", "principal", "action", "key", "version", "outcome", "error", "context",
            "hash", "prev"} <= set(docs[0])
    assert docs[-1]["action"] == "audit"

    days = sorted(p.name for p in pq.iterdir() if p.is_dir())
    assert days == ["day=2026-01-01", "day=2026-01-02", "day=2026-01-03"]
    con = duckdb.connect()
    try:
        glob = str(pq / "**" / "*.parquet")
        total = con.execute(
            f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)").fetchall()
        per_day = con.execute(
            f"""SELECT day::VARCHAR, count(*) FILTER (WHERE action = 'encrypt')
                FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY 1 ORDER BY 1"""
        ).fetchall()
    finally:
        con.close()
    assert total[0][0] == n + 2  # + audit() and the jsonl export
    assert per_day == [("2026-01-01", 4), ("2026-01-02", 5), ("2026-01-03", 6)]


# -- usage counters --------------------------------------------------------------------------------


def test_usage_counters_count_ok_calls(home, clock):
    with kl.open(home, principal="alice", clock=clock) as led:
        k = led.create_key("k", spec="AES_256")
        s = led.create_key("s", spec="EC_P256")
        blobs = [led.encrypt("k", b"x") for _ in range(5)]
        for blob in blobs[:3]:
            led.decrypt(blob)
        with pytest.raises(kl.InvalidCiphertext):
            led.decrypt(blobs[0], context={"not": "bound"})  # failed: not counted
        led.flush_audit()  # part of the counts arrive in one batch, the rest in another
        led.rotate("k")
        for _ in range(2):
            led.encrypt("k", b"x")
        led.decrypt(blobs[4])
        sig = led.sign("s", b"m")
        assert led.verify("s", b"m", sig)
    rows = _query(home, "SELECT key_id, version, action, count FROM usage ORDER BY ALL")
    got = {(kid, v, a): c for kid, v, a, c in rows}
    want = {
        (k.key_id, 1, "create_key"): 1, (k.key_id, 1, "encrypt"): 5, (k.key_id, 1, "decrypt"): 4,
        (k.key_id, 2, "rotate"): 1, (k.key_id, 2, "encrypt"): 2,
        (s.key_id, 1, "create_key"): 1, (s.key_id, 1, "sign"): 1, (s.key_id, 1, "verify"): 1,
    }
    assert got == want
    # the counters agree with the ledger they summarise
    (mismatch,) = _query(home, """
        SELECT count(*) FROM usage u FULL JOIN (
            SELECT key_id, version, action, count(*) AS n FROM audit_log
            WHERE outcome = 'ok' AND key_id IS NOT NULL AND version IS NOT NULL GROUP BY ALL) a
        USING (key_id, version, action) WHERE u.count IS DISTINCT FROM a.n""")[0]
    assert mismatch == 0


# -- durability settings ---------------------------------------------------------------------------


def _set_settings(home: Path, section: str, **values: object) -> None:
    """Change settings of an existing home's keyledger.toml (as an operator would)."""
    path = home / "keyledger.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault(section, {}).update(values)
    write_config(home, data)


def test_strict_mode_home_works(home, clock, monkeypatch):
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("k", spec="AES_256")
    _set_settings(home, "audit", strict=True, fsync_interval_ms=20, ingest_interval_ms=200,
                  catalog_refresh_ms=50)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    with kl.open(home, principal="alice", clock=clock) as led:
        synced.clear()
        blob = led.encrypt("k", b"x")
        assert synced, "strict mode fsyncs the journal before the call returns"
        assert led.decrypt(blob) == b"x"
        with pytest.raises(kl.KeyNotFound):
            led.encrypt("missing", b"x")
        df = led.audit()
        assert list(df["action"])[-4:] == ["open", "encrypt", "decrypt", "encrypt"]
        assert list(df["outcome"])[-1] == "failed"
        assert led.verify_audit().ok


def test_default_mode_does_not_fsync_in_the_call(home, clock, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("k", spec="AES_256")
        synced.clear()
        led.encrypt("k", b"x")  # (claims a block of uses: its counter file is synced, once)
        # group commit: the journal is fdatasync'ed in the background, never in the call
        assert led._rt.journal._fd not in synced
        assert led.verify_audit().ok


def test_unknown_audit_setting_is_a_config_error(home, clock):
    with kl.open(home, principal="alice", clock=clock):
        pass
    _set_settings(home, "audit", fsync_every="never")
    with pytest.raises(kl.ConfigError, match=r"\[audit\]"):
        kl.open(home, principal="alice", clock=clock)


def test_the_journal_chain_hash_is_sha256_with_or_without_cpythons_module(monkeypatch):
    """The writer hashes each record with CPython's own SHA-256 (cheaper than OpenSSL's between
    two HSM calls, issue 18) and falls back to hashlib's where a Python lacks that module;
    either way the digest is SHA-256's, which verification (``record_hash``, the SQL twin)
    recomputes with other implementations."""
    import hashlib
    from types import SimpleNamespace

    from keyledger.store import journal

    texts = [b"", b"abc", "caf\u00e9 \u2603 \U0001f511".encode(), os.urandom(1000)]
    for text in texts:
        assert journal._sha256(text).hexdigest() == hashlib.sha256(text).hexdigest()

    def missing(name: str):
        raise ImportError(name)

    # (only the journal module's view of importlib: other threads keep theirs)
    monkeypatch.setattr(journal, "importlib", SimpleNamespace(import_module=missing))
    assert journal._builtin_sha256() is hashlib.sha256
