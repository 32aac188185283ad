"""Batch encryption for columns (docs/batch.md): encrypt_many / decrypt_many over lists, pandas
Series and Arrow arrays on a real SoftHSM2 token; one audit record per batch; usage exact."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pyarrow as pa
import pytest

import keyledger as kl
from keyledger import ciphertext as ct
from keyledger.columns import BatchResult, decrypt_columns, encrypt_columns


def _version(blob: bytes) -> int:
    return ct.parse(blob)[0].version


def _records(led: kl.KeyLedger, action: str) -> pd.DataFrame:
    led.flush_audit()
    df = led.audit(action=action, limit=None)
    return df.reset_index(drop=True)


def _detail(text: str) -> dict[str, str]:
    """The ``k=v`` fields of a batch record's detail (before any "; reason")."""
    return dict(part.split("=", 1) for part in text.split(";")[0].split())


def _user(led: kl.KeyLedger, name: str) -> kl.KeyLedger:
    return kl.open(led.home, principal=name, clock=led._clock)


# -- round trips -------------------------------------------------------------------------------
def test_list_round_trip_keeps_nulls_and_reads_with_single_calls(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    values = [b"123-45-6789", None, b"", bytearray(b"ba"), memoryview(b"mv"), pd.NA]
    out = ledger.encrypt_many("pii", values)
    assert isinstance(out, list) and len(out) == 6
    assert out[1] is None and out[5] is None
    # every output is an ordinary ciphertext: decrypt reads it
    assert [ledger.decrypt(c) for c in out if c is not None] == [b"123-45-6789", b"", b"ba",
                                                                  b"mv"]
    assert ledger.decrypt_many(out) == [b"123-45-6789", None, b"", b"ba", b"mv", None]
    # and decrypt_many reads what encrypt wrote
    single = [ledger.encrypt("pii", b"one"), None, ledger.encrypt("pii", b"two")]
    assert ledger.decrypt_many(single) == [b"one", None, b"two"]
    assert len({c[ct.HEADER_LEN - ct.NONCE_LEN:ct.HEADER_LEN] for c in out if c}) == 4  # nonces


def test_series_keeps_index_and_name(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    s = pd.Series([b"a", None, b"c", float("nan")], index=[10, 20, 30, 40], name="ssn")
    enc = ledger.encrypt_many("pii", s)
    assert isinstance(enc, pd.Series)
    assert list(enc.index) == [10, 20, 30, 40] and enc.name == "ssn"
    assert enc.isna().tolist() == [False, True, False, True]
    dec = ledger.decrypt_many(enc)
    assert list(dec.index) == [10, 20, 30, 40] and dec.name == "ssn"
    assert dec.tolist() == [b"a", None, b"c", None]
    assert s.iloc[0] == b"a"  # the input is unchanged


@pytest.mark.parametrize("chunked", [False, True])
def test_arrow_arrays_round_trip_as_binary(ledger: kl.KeyLedger, chunked: bool) -> None:
    ledger.create_key("pii", spec="AES_256")
    arr = pa.array([b"x", None, b"yz"], type=pa.binary())
    values = pa.chunked_array([arr[:1], arr[1:]]) if chunked else arr
    enc = ledger.encrypt_many("pii", values)
    assert isinstance(enc, pa.ChunkedArray if chunked else pa.Array)
    assert enc.type == pa.binary() and enc.null_count == 1
    dec = ledger.decrypt_many(enc)
    assert dec.type == pa.binary() and dec.to_pylist() == [b"x", None, b"yz"]
    large = ledger.encrypt_many("pii", pa.array([b"big"], type=pa.large_binary()))
    assert large.type == pa.large_binary()
    assert ledger.decrypt(large[0].as_py()) == b"big"


def test_mixed_versions_after_rotate_decrypt_in_one_batch(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    before = ledger.encrypt_many("pii", [b"v1-%d" % i for i in range(3)])
    ledger.rotate("pii")
    after = ledger.encrypt_many("pii", [b"v2-%d" % i for i in range(2)])
    single = ledger.encrypt("pii", b"v2-single")
    assert {_version(c) for c in before} == {1} and {_version(c) for c in after} == {2}
    mixed = [after[0], before[0], None, single, before[1], after[1], before[2]]
    assert ledger.decrypt_many(mixed) == [b"v2-0", b"v1-0", None, b"v2-single", b"v1-1",
                                          b"v2-1", b"v1-2"]
    rec = _records(ledger, "decrypt_many").iloc[-1]
    assert rec["version"] == 1  # the lowest version read; detail has each version's items
    assert _detail(rec["detail"])["versions"] == "1:3,2:3"
    usage = ledger.version_usage("pii").set_index("version")
    assert usage.loc[1, "decryptions"] == 3 and usage.loc[2, "decryptions"] == 3
    assert usage.loc[1, "encryptions"] == 3 and usage.loc[2, "encryptions"] == 3


# -- the audit record --------------------------------------------------------------------------
def test_one_audit_record_per_batch_with_count_key_version_outcome(
        ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    ledger.flush_audit()
    before = len(ledger.audit(limit=None))
    enc = ledger.encrypt_many("pii", [b"a", None, b"b", b"c"], context={"table": "people"})
    ledger.decrypt_many(enc, context={"table": "people"})
    ledger.flush_audit()
    new = ledger.audit(limit=None).iloc[before:]
    new = new[new["action"] != "audit"]  # (the read before is a record of its own)
    assert list(new["action"]) == ["encrypt_many", "decrypt_many"]  # no per-item records
    for _, rec in new.iterrows():
        assert rec["key"] == "pii" and rec["version"] == 1 and rec["outcome"] == "ok"
        assert rec["context"] == '{"table":"people"}'
        assert _detail(rec["detail"]) == {"count": "4", "nulls": "1", "ok": "3",
                                          "failed": "0", "versions": "1:3"}
    # the fields are queryable: count per batch out of the detail text
    got = ledger.query("SELECT action, regexp_extract(detail, 'count=([0-9]+)', 1)::INT AS n "
                       "FROM audit_log WHERE action LIKE '%_many' ORDER BY seq")
    assert got.to_dict("records") == [{"action": "encrypt_many", "n": 4},
                                      {"action": "decrypt_many", "n": 4}]


def test_a_10k_batch_round_trips_with_one_record_each(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    values = [i.to_bytes(32, "big") for i in range(10_000)]
    enc = ledger.encrypt_many("pii", values)
    assert len(set(enc)) == 10_000
    assert ledger.decrypt_many(enc) == values
    assert len(_records(ledger, "encrypt_many")) == 1
    assert len(_records(ledger, "decrypt_many")) == 1
    usage = ledger.version_usage("pii").set_index("version")
    assert usage.loc[1, "encryptions"] == 10_000 and usage.loc[1, "decryptions"] == 10_000
    assert ledger.verify_audit().ok  # batch records are chained and checked like any other


def test_empty_batches_return_empty_and_are_recorded(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    assert ledger.encrypt_many("pii", []) == []
    assert ledger.decrypt_many([]) == []
    assert ledger.encrypt_many("pii", [None, None]) == [None, None]
    empty = ledger.encrypt_many("pii", pd.Series([], dtype=object, name="c"))
    assert isinstance(empty, pd.Series) and empty.empty and empty.name == "c"
    recs = _records(ledger, "encrypt_many")
    assert len(recs) == 3 and set(recs["outcome"]) == {"ok"}
    assert _detail(recs.iloc[1]["detail"])["nulls"] == "2"


# -- usage limits --------------------------------------------------------------------------------
def test_a_batch_across_the_usage_limit_rotates_mid_batch_exactly(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    ledger.set_policy("pii", usage_limit=100)  # auto_rotate is on by default
    enc = ledger.encrypt_many("pii", [b"m%d" % i for i in range(250)])
    assert [_version(c) for c in enc] == [1] * 100 + [2] * 100 + [3] * 50  # in order
    assert ledger.get_key("pii").latest_version == 3
    assert ledger.decrypt_many(enc) == [b"m%d" % i for i in range(250)]
    rec = _records(ledger, "encrypt_many").iloc[-1]
    assert _detail(rec["detail"])["versions"] == "1:100,2:100,3:50"
    assert rec["version"] == 3  # the version the batch ended on: the latest at its time
    # v3 has exactly 50 uses left: a batch of 50 stays on it, the next item rotates
    more = ledger.encrypt_many("pii", [b"n"] * 51)
    assert Counter(_version(c) for c in more) == {3: 50, 4: 1}
    usage = ledger.version_usage("pii").set_index("version")
    assert list(usage["encryptions"]) == [100, 100, 100, 1]


def test_a_batch_over_the_limit_without_auto_rotate_is_refused_whole(
        ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    ledger.set_policy("pii", usage_limit=100, auto_rotate=False)
    assert len(ledger.encrypt_many("pii", [b"a"] * 60)) == 60
    with pytest.raises(kl.PolicyViolation) as info:
        ledger.encrypt_many("pii", [b"b"] * 41)
    assert "auto_rotate is off" in str(info.value) and "nothing was encrypted" in str(info.value)
    # the refused batch spent nothing: exactly the 40 uses left remain
    assert len(ledger.encrypt_many("pii", [b"c"] * 40)) == 40
    with pytest.raises(kl.PolicyViolation):
        ledger.encrypt("pii", b"one too many")
    assert ledger.get_key("pii").latest_version == 1
    recs = _records(ledger, "encrypt_many")
    assert list(recs["outcome"]) == ["ok", "failed", "ok"]
    assert recs.iloc[1]["error"] == "PolicyViolation"
    assert _detail(recs.iloc[1]["detail"])["ok"] == "0"
    assert ledger.version_usage("pii").set_index("version").loc[1, "encryptions"] == 100


_BATCH_SPENDER = """
import json, sys
import keyledger as kl
led = kl.open(sys.argv[1], principal="app")
print("ready", flush=True)
sys.stdin.readline()
ok = 0
while True:
    try:
        ok += len(led.encrypt_many("k", [b"x"] * 50))
    except kl.PolicyViolation:
        break
led.close()  # gives back the uses its block still holds
print(json.dumps({"ok": ok}))
"""


@pytest.mark.slow
def test_batches_in_two_processes_never_pass_the_limit_and_count_exactly(tmp_path) -> None:
    import json
    import subprocess
    import sys

    home = tmp_path / "home"
    with kl.open(home, principal="admin") as led:
        led.create_key("k", spec="AES_256")
        led.set_policy("k", usage_limit=600, auto_rotate=False)
        led.grant("k", "app", "user")
    procs = [subprocess.Popen([sys.executable, "-c", _BATCH_SPENDER, str(home)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=60)[1]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    made = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        made.append(json.loads(out.strip().splitlines()[-1])["ok"])
    assert sum(made) <= 600 and sum(made) % 50 == 0  # whole batches, never past the limit
    with kl.open(home, principal="app") as app:
        left = 600 - sum(made)  # what the processes' blocks held came back when they closed
        assert len(app.encrypt_many("k", [b"y"] * left)) == left
        with pytest.raises(kl.PolicyViolation):
            app.encrypt_many("k", [b"z"])
    with kl.open(home, principal="admin") as led:
        assert led.version_usage("k").set_index("version").loc[1, "encryptions"] == 600
        assert led.verify_audit().ok


# -- per-item errors -----------------------------------------------------------------------------
def test_errors_return_reports_failed_items_and_raise_names_the_first(
        ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    values = [b"ok0", "text", b"ok2", 7]
    result = ledger.encrypt_many("pii", values, errors="return")
    assert isinstance(result, BatchResult) and result.failed == 2 and not result.ok
    assert result.values[1] is None and result.values[3] is None
    assert [(i, e) for i, e, _ in result.errors] == [(1, "InvalidInput"), (3, "InvalidInput")]
    assert "item 1" in result.errors[0][2] and "encode" in result.errors[0][2]
    assert ledger.decrypt_many([result.values[0], result.values[2]]) == [b"ok0", b"ok2"]
    assert "ok0" not in repr(result)  # a notebook echo shows counts, never values
    with pytest.raises(kl.InvalidInput, match="item 1"):
        ledger.encrypt_many("pii", values)
    recs = _records(ledger, "encrypt_many")
    assert list(recs["outcome"]) == ["ok", "failed"]
    ok, failed = (_detail(d) for d in recs["detail"])
    assert ok["failed"] == "2" and ok["first_failed"] == "1" and ok["ok"] == "2"
    assert failed["first_failed"] == "1" and failed["ok"] == "0"  # raise: nothing encrypted
    with pytest.raises(kl.InvalidInput, match="errors must be"):
        ledger.encrypt_many("pii", [b"x"], errors="ignore")


def test_tampered_ciphertext_in_the_middle_of_a_decrypt_batch(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    enc = ledger.encrypt_many("pii", [b"p%d" % i for i in range(6)])
    bad = bytearray(enc[3])
    bad[-1] ^= 1
    enc[3] = bytes(bad)
    enc[4] = b"KL junk"
    with pytest.raises(kl.InvalidCiphertext, match="item 3"):
        ledger.decrypt_many(enc)
    result = ledger.decrypt_many(enc, errors="return")
    assert result.values == [b"p0", b"p1", b"p2", None, None, b"p5"]
    assert [(i, e) for i, e, _ in result.errors] == [(3, "InvalidCiphertext"),
                                                     (4, "InvalidCiphertext")]
    recs = _records(ledger, "decrypt_many")
    assert list(recs["outcome"]) == ["failed", "ok"] and recs.iloc[0]["error"] == \
        "InvalidCiphertext"
    raised, returned = (_detail(d) for d in recs["detail"])
    assert raised["first_failed"] == "3" and returned["first_failed"] == "3"
    assert returned["failed"] == "2" and returned["ok"] == "4"
    assert "authentication failed" in recs.iloc[0]["detail"]  # precise in the record only
    assert "authentication" not in result.errors[0][2]


def test_wrong_context_fails_every_item(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    enc = ledger.encrypt_many("pii", [b"a", b"b"], context={"t": "1"})
    assert ledger.decrypt(enc[0], context={"t": "1"}) == b"a"
    with pytest.raises(kl.InvalidCiphertext, match="item 0"):
        ledger.decrypt_many(enc, context={"t": "2"})
    assert ledger.decrypt_many(enc, context={"t": "1"}) == [b"a", b"b"]


def test_one_key_per_decrypt_batch(ledger: kl.KeyLedger) -> None:
    ledger.create_key("a", spec="AES_256")
    ledger.create_key("b", spec="AES_256")
    items = [ledger.encrypt("a", b"1"), ledger.encrypt("b", b"2"), ledger.encrypt("a", b"3")]
    with pytest.raises(kl.InvalidInput, match="item 1 .*one key"):
        ledger.decrypt_many(items)
    result = ledger.decrypt_many(items, errors="return")
    assert result.values == [b"1", None, b"3"] and result.errors[0][:2] == (1, "InvalidInput")


def test_str_where_bytes_belong_is_refused(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    with pytest.raises(kl.InvalidInput, match="encode"):
        ledger.encrypt_many("pii", ["123-45-6789"])
    with pytest.raises(kl.InvalidInput, match="text"):
        ledger.encrypt_many("pii", pd.Series(["a"], dtype="string"))
    with pytest.raises(kl.InvalidInput, match="text"):
        ledger.encrypt_many("pii", pa.array(["a"]))
    with pytest.raises(kl.InvalidInput, match="must be a list"):
        ledger.encrypt_many("pii", b"not a column")
    with pytest.raises(kl.InvalidInput, match="item 0 must be bytes"):
        ledger.decrypt_many(["KL..."])
    recs = _records(ledger, "encrypt_many")
    assert len(recs) == 4 and set(recs["outcome"]) == {"failed"}
    assert "123-45-6789" not in " ".join(recs["detail"].astype(str))  # no plaintext recorded


# -- key state, purpose, access --------------------------------------------------------------------
def test_key_states_purpose_and_min_versions_hold_for_batches(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    old = ledger.encrypt_many("pii", [b"a"])
    ledger.disable("pii")
    with pytest.raises(kl.KeyStateError):
        ledger.encrypt_many("pii", [b"b"])
    with pytest.raises(kl.KeyStateError):
        ledger.decrypt_many(old)
    ledger.enable("pii")
    ledger.deactivate("pii")  # no more protection; decryption goes on
    with pytest.raises(kl.KeyStateError):
        ledger.encrypt_many("pii", [b"b"])
    assert ledger.decrypt_many(old) == [b"a"]
    ledger.create_key("gone", spec="AES_256")
    doomed = ledger.encrypt_many("gone", [b"x"])
    ledger.schedule_deletion("gone", 7)
    with pytest.raises(kl.KeyStateError):
        ledger.encrypt_many("gone", [b"y"])
    with pytest.raises(kl.KeyStateError):
        ledger.decrypt_many(doomed)
    ledger.create_key("signer", spec="EC_P256")
    with pytest.raises(kl.PolicyViolation, match="signer"):
        ledger.encrypt_many("signer", [b"x"])
    ledger.create_key("r", spec="AES_256")
    v1 = ledger.encrypt_many("r", [b"one"])
    ledger.rotate("r")
    v2 = ledger.encrypt_many("r", [b"two"])
    ledger.set_policy("r", min_decryption_version=2)
    result = ledger.decrypt_many(v1 + v2, errors="return")
    assert result.values == [None, b"two"] and result.errors[0][:2] == (0, "KeyStateError")
    assert "minimum decryption version" in result.errors[0][2]
    recs = pd.concat([_records(ledger, "encrypt_many"), _records(ledger, "decrypt_many")])
    failed = recs[recs["outcome"] == "failed"]
    assert sorted(failed["error"]) == ["KeyStateError"] * 5 + ["PolicyViolation"]


def test_a_principal_without_user_is_denied_and_audited(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    enc = ledger.encrypt_many("pii", [b"secret"])
    ledger.grant("pii", "bob", "auditor")
    bob = _user(ledger, "bob")
    try:
        with pytest.raises(kl.AccessDenied):
            bob.encrypt_many("pii", [b"x"])
        with pytest.raises(kl.AccessDenied):
            bob.decrypt_many(enc)
        with pytest.raises(kl.AccessDenied):
            decrypt_columns(bob, pd.DataFrame({"c": enc}), ["c"])
    finally:
        bob.close()
    ledger.flush_audit()
    denied = ledger.audit(principal="bob", limit=None)
    denied = denied[denied["action"] != "open"]
    assert list(denied["action"]) == ["encrypt_many", "decrypt_many", "decrypt_many"]
    assert set(denied["outcome"]) == {"denied"} and set(denied["key"]) == {"pii"}


# -- DataFrames ----------------------------------------------------------------------------------
def test_encrypt_and_decrypt_columns_return_new_frames(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    ledger.create_key("card", spec="AES_256")
    df = pd.DataFrame({"id": [1, 2, 3], "ssn": [b"111", None, b"333"],
                       "pan": [b"4111", b"4222", b"4333"]}, index=["a", "b", "c"])
    enc = encrypt_columns(ledger, df, {"ssn": "pii", "pan": "card"})
    assert df["ssn"].tolist() == [b"111", None, b"333"]  # the input is not changed
    assert enc["id"].tolist() == [1, 2, 3] and list(enc.index) == ["a", "b", "c"]
    assert enc["ssn"].iloc[1] is None and ledger.decrypt(enc["pan"].iloc[0]) == b"4111"
    back = decrypt_columns(ledger, enc, ["ssn", "pan"])
    pd.testing.assert_frame_equal(back, df)
    assert len(_records(ledger, "encrypt_many")) == 2  # one batch (one record) per column
    with pytest.raises(kl.InvalidInput, match="no column 'nope'"):
        encrypt_columns(ledger, df, {"nope": "pii"})


def test_text_columns_are_encoded_and_come_back_as_text_when_asked(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    df = pd.DataFrame({"ssn": ["123-45-6789", None, "987-65-4321"],
                       "name": pd.array(["Ada", "Grace", pd.NA], dtype="string")})
    enc = encrypt_columns(ledger, df, {"ssn": "pii", "name": "pii"})
    assert ledger.decrypt(enc["ssn"].iloc[0]) == b"123-45-6789"  # UTF-8 by default
    assert enc["ssn"].iloc[1] is None and pd.isna(enc["name"].iloc[2])
    as_bytes = decrypt_columns(ledger, enc, ["ssn"])
    assert as_bytes["ssn"].tolist() == [b"123-45-6789", None, b"987-65-4321"]
    back = decrypt_columns(ledger, enc, ["ssn", "name"], encoding="utf-8")
    assert back["ssn"].tolist() == ["123-45-6789", None, "987-65-4321"]
    assert back["name"].tolist()[:2] == ["Ada", "Grace"] and pd.isna(back["name"].iloc[2])
    with pytest.raises(kl.InvalidInput, match="bytes"):
        encrypt_columns(ledger, df, {"ssn": "pii"}, encoding=None)  # text refused, as asked
    with pytest.raises(kl.InvalidInput, match="text encoding"):
        encrypt_columns(ledger, df, {"ssn": "pii"}, encoding="no-such-codec")
    binary = encrypt_columns(ledger, pd.DataFrame({"b": [b"\xff\xfe"]}), {"b": "pii"})
    with pytest.raises(kl.InvalidInput, match="not utf-8 text"):
        decrypt_columns(ledger, binary, ["b"], encoding="utf-8")


def test_batches_on_the_in_memory_backend(tmp_path, clock) -> None:
    from keyledger.hsm import memory

    memory.init_home(tmp_path / "mem")
    with kl.open(tmp_path / "mem", principal="alice", clock=clock) as led:
        led.create_key("pii", spec="AES_256")
        enc = led.encrypt_many("pii", [b"a", None, b"b"])
        assert led.decrypt(enc[0]) == b"a" and led.decrypt_many(enc) == [b"a", None, b"b"]
        enc[2] = enc[2][:-1] + bytes([enc[2][-1] ^ 1])
        result = led.decrypt_many(enc, errors="return")
        assert result.values == [b"a", None, None] and result.errors[0][:2] == (
            2, "InvalidCiphertext")


# -- over kl.connect -----------------------------------------------------------------------------
def test_batches_round_trip_through_keyledger_serve(tmp_path, simulation_template) -> None:
    from serve_support import audit, new_home, start

    from keyledger.remote import client as remote

    home, keys = new_home(tmp_path, simulation_template)
    with kl.open(home, principal="admin") as led:
        led.create_key("pii", spec="AES_256")
        led.grant("pii", "app1", "user")
        local_ct = led.encrypt("pii", b"written locally")
    server = start(home)
    try:
        app = kl.connect(server.url, access_key_id=keys["app1"]["AccessKeyId"],
                         secret_access_key=keys["app1"]["SecretAccessKey"])
        with app:
            s = pd.Series([b"a", None, b"c"], index=[5, 6, 7], name="ssn")
            enc = app.encrypt_many("pii", s, context={"t": "x"})
            assert isinstance(enc, pd.Series) and list(enc.index) == [5, 6, 7]
            assert enc.name == "ssn" and enc.iloc[1] is None
            arr = app.decrypt_many(pa.array(list(enc), type=pa.binary()), context={"t": "x"})
            assert isinstance(arr, pa.Array) and arr.to_pylist() == [b"a", None, b"c"]
            assert app.decrypt_many([local_ct]) == [b"written locally"]
            bad = [enc.iloc[0], enc.iloc[2][:-1] + bytes([enc.iloc[2][-1] ^ 1])]
            result = app.decrypt_many(bad, context={"t": "x"}, errors="return")
            assert isinstance(result, BatchResult) and result.values == [b"a", None]
            assert result.errors[0][:2] == (1, "InvalidCiphertext")
            with pytest.raises(kl.InvalidCiphertext, match="item 1"):
                app.decrypt_many(bad, context={"t": "x"})
            frame = encrypt_columns(app, pd.DataFrame({"ssn": [b"1", b"2"]}), {"ssn": "pii"})
            assert decrypt_columns(app, frame, ["ssn"])["ssn"].tolist() == [b"1", b"2"]
            # a column too big for one request travels in parts; indices stay the column's
            small = remote.BATCH_REQUEST_BYTES
            remote.BATCH_REQUEST_BYTES = 2_000
            try:
                many = app.encrypt_many("pii", [b"%04d" % i for i in range(100)])
                many[70] = many[70][:-1] + bytes([many[70][-1] ^ 1])
                with pytest.raises(kl.InvalidCiphertext, match="item 70 "):
                    app.decrypt_many(many)
                parted = app.decrypt_many(many, errors="return")
            finally:
                remote.BATCH_REQUEST_BYTES = small
            assert [e[0] for e in parted.errors] == [70]
            assert parted.values[:70] == [b"%04d" % i for i in range(70)]
    finally:
        assert server.stop() == 0, server.log.read_text()
    recs = audit(home, principal="app1", limit=None)
    first = recs[recs["action"].isin(["encrypt_many", "decrypt_many"])].iloc[:3]
    assert list(first["action"]) == ["encrypt_many", "decrypt_many", "decrypt_many"]
    assert _detail(first.iloc[0]["detail"])["count"] == "3" and set(first["key"]) == {"pii"}


def test_decrypt_many_takes_bytearray_and_memoryview_items(ledger: kl.KeyLedger) -> None:
    ledger.create_key("pii", spec="AES_256")
    enc = ledger.encrypt_many("pii", [b"a", b"b", b"c"])
    items = [bytearray(enc[0]), memoryview(enc[1]), enc[2]]
    assert ledger.decrypt_many(items) == [b"a", b"b", b"c"]
