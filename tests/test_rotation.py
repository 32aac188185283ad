"""Must show: rotation policies and due work (issue 5 items 1-4), on a real SoftHSM2 token.

1. Policy resolution: the defaults (90 days for encrypt, wrap and MAC keys, 365 days for signing
   keys), then the home's rule by purpose, then a tag rule, then the key's own period; the
   shortest of several matching tag rules; ``rotation_source`` names where a period came from.
2. Two simulated years of weekly due work: tests/test_rotation_two_years.py (split off so that
   it and this module's 100,000-ciphertext rewrap run on different test workers).
3. ``run_due`` with nothing due does nothing; with a quorum of 2 a due destroy is skipped with a
   reason. (Two processes at once: tests/test_due_multiprocess.py.)
4. ``rewrap_many`` over a list, a pandas Series and a Parquet file; dry runs change nothing; bad
   items give one error row each; 100,000 ciphertexts in one call (slow). ``version_usage``.
5. ``trim``: material of old versions leaves the HSM (checked with ``pkcs11-tool``), their
   ciphertexts are refused, newer ones decrypt; with a quorum of 2 it needs request/approve.
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FakeClock
from conftest import hsm_labels as token_labels

import keyledger as kl
from keyledger.services.maintenance import REWRAP_CHUNK

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_TOOL = shutil.which("pkcs11-tool")
needs_pkcs11_tool = pytest.mark.skipif(PKCS11_TOOL is None or not os.path.exists(MODULE),
                                       reason="needs SoftHSM2 and pkcs11-tool (opensc)")
CTX = {"tenant": "acme", "table": "orders"}
DAY = timedelta(days=1)


# -- helpers ----------------------------------------------------------------------------------------
def header_of(blob: bytes) -> tuple[str, int]:
    """(key id, version) read straight from the documented ciphertext layout, not via keyledger."""
    assert blob[:2] == b"KL", blob[:4]
    return str(uuid.UUID(bytes=blob[4:20])), struct.unpack(">I", blob[20:24])[0]


def hsm_labels(home: Path) -> set[str]:
    """Labels of the keyledger key objects (``kl:<name>:v<n>``) as ``pkcs11-tool`` lists them."""
    return set(token_labels(home))


def key_labels(home: Path, name: str) -> set[str]:
    return {label for label in hsm_labels(home) if label.startswith(f"kl:{name}:")}


def period_of(led: kl.KeyLedger, name: str) -> timedelta:
    """The effective period as ``list_keys`` shows it: next_rotation_due - rotated_at."""
    row = led.list_keys().set_index("name").loc[name]
    return (row["next_rotation_due"] - row["rotated_at"]).to_pytimedelta()


def done(report, action: str | None = None) -> list[tuple[str, str]]:
    return [(d["action"], d["key"]) for d in report.done if action in (None, d["action"])]


def second_admin(led: kl.KeyLedger, home: Path, clock: FakeClock) -> kl.KeyLedger:
    """Bob, a second home admin, in the same process (he shares alice's runtime)."""
    led.grant("*", "bob", "admin")
    return kl.open(home, principal="bob", clock=clock)


# == 1. policy resolution =============================================================================
def test_defaults_are_90_days_for_encrypt_wrap_mac_and_365_for_sign(ledger: kl.KeyLedger,
                                                                      clock: FakeClock) -> None:
    ledger.create_key("enc", spec="AES_256")
    ledger.create_key("wrap", spec="AES_256", purpose="wrap")
    ledger.create_key("mac", spec="HMAC_SHA256")
    ledger.create_key("ec", spec="EC_P256")
    ledger.create_key("ed", spec="ED25519")
    df = ledger.list_keys().set_index("name")
    expected = {"enc": 90, "wrap": 90, "mac": 90, "ec": 365, "ed": 365}
    for name, days in expected.items():
        assert df.loc[name, "next_rotation_due"] == pd.Timestamp(clock() + timedelta(days=days))
        key = ledger.get_key(name)
        assert key.rotation_source == "default"
        assert key.rotation_period == timedelta(days=days)


def test_home_rule_by_purpose_overrides_the_default(ledger: kl.KeyLedger) -> None:
    for name, spec, purpose in (("enc", "AES_256", None), ("wrap", "AES_256", "wrap"),
                                ("ec", "EC_P256", None)):
        ledger.create_key(name, spec=spec, purpose=purpose)
    ledger.set_policy("*", rotation_by_purpose={"encrypt": "30d", "sign": "2y"})
    # Existing keys follow the new home rule at once; purposes without a rule keep the default.
    assert period_of(ledger, "enc") == timedelta(days=30)
    assert period_of(ledger, "ec") == timedelta(days=730)
    assert period_of(ledger, "wrap") == timedelta(days=90)
    assert ledger.get_key("enc").rotation_source == "home"
    assert ledger.get_key("ec").rotation_source == "home"
    assert ledger.get_key("wrap").rotation_source == "default"


@pytest.mark.parametrize("rules", [{"rotation_by_purpose": {"encrypt": None}},
                                   {"rotation_by_tag": {"env=prod": None}}])
def test_a_home_rule_without_a_period_is_refused_and_changes_nothing(
        ledger: kl.KeyLedger, rules: dict) -> None:
    ledger.create_key("prod", spec="AES_256", tags={"env": "prod"})
    with pytest.raises(kl.InvalidInput, match="period"):  # not an AttributeError on None
        ledger.set_policy("*", **rules)
    assert period_of(ledger, "prod") == timedelta(days=90)  # the default: nothing changed
    assert ledger.get_key("prod").rotation_source == "default"
    refused = ledger.audit(action="set_policy")
    assert list(refused["outcome"]) == ["failed"] and list(refused["error"]) == ["InvalidInput"]


def test_a_tag_rule_overrides_the_home_rule(ledger: kl.KeyLedger) -> None:
    ledger.set_policy("*", rotation_by_purpose={"encrypt": "30d"},
                      rotation_by_tag={"env=prod": "14d", "tier=archive": "180d"})
    ledger.create_key("prod", spec="AES_256", tags={"env": "prod"})
    ledger.create_key("archive", spec="AES_256", tags={"tier": "archive"})
    ledger.create_key("dev", spec="AES_256", tags={"env": "dev"})
    assert period_of(ledger, "prod") == timedelta(days=14)
    assert ledger.get_key("prod").rotation_source == "tag env=prod"
    # Precedence, not "shortest wins": a tag rule beats the home rule even when it is longer.
    assert period_of(ledger, "archive") == timedelta(days=180)
    assert ledger.get_key("archive").rotation_source == "tag tier=archive"
    # A tag whose value does not match leaves the home rule in force.
    assert period_of(ledger, "dev") == timedelta(days=30)
    assert ledger.get_key("dev").rotation_source == "home"
    # Retagging moves a key between rules.
    ledger.set_tags("dev", {"env": "prod"})
    assert period_of(ledger, "dev") == timedelta(days=14)
    assert ledger.get_key("dev").rotation_source == "tag env=prod"


def test_a_keys_own_period_overrides_a_tag_rule(ledger: kl.KeyLedger) -> None:
    ledger.set_policy("*", rotation_by_purpose={"encrypt": "30d"},
                      rotation_by_tag={"env=prod": "14d"})
    ledger.create_key("own", spec="AES_256", tags={"env": "prod"}, rotation_period="7d")
    assert period_of(ledger, "own") == timedelta(days=7)
    assert ledger.get_key("own").rotation_source == "key"
    ledger.create_key("later", spec="AES_256", tags={"env": "prod"})
    assert ledger.get_key("later").rotation_source == "tag env=prod"
    ledger.set_policy("later", rotation_period=timedelta(days=60))  # longer than the tag rule
    assert period_of(ledger, "later") == timedelta(days=60)
    assert ledger.get_key("later").rotation_source == "key"


def test_the_shortest_of_several_matching_tag_rules_wins(ledger: kl.KeyLedger) -> None:
    ledger.set_policy("*", rotation_by_tag={"env=prod": "30d", "data=pci": "10d",
                                            "team=pay": "20d", "env=dev": "1d"})
    ledger.create_key("k", spec="AES_256", tags={"env": "prod", "data": "pci", "team": "pay"})
    assert period_of(ledger, "k") == timedelta(days=10)
    assert ledger.get_key("k").rotation_source == "tag data=pci"
    ledger.set_tags("k", {"env": "prod", "team": "pay"})
    assert period_of(ledger, "k") == timedelta(days=20)
    assert ledger.get_key("k").rotation_source == "tag team=pay"


def test_run_due_rotates_by_the_resolved_period(ledger: kl.KeyLedger, clock: FakeClock) -> None:
    ledger.set_policy("*", rotation_by_tag={"env=prod": "14d"})
    ledger.create_key("prod", spec="AES_256", tags={"env": "prod"})
    ledger.create_key("plain", spec="AES_256")
    clock.advance(days=14, seconds=-1)
    assert ledger.run_due().done == []
    clock.advance(seconds=1)
    report = ledger.run_due()
    assert done(report) == [("rotate", "prod")]
    assert "14 days" in report.done[0]["reason"] and "tag env=prod" in report.done[0]["reason"]
    assert ledger.get_key("prod").latest_version == 2
    assert ledger.get_key("plain").latest_version == 1
    df = ledger.list_keys().set_index("name")
    assert df.loc["prod", "next_rotation_due"] == pd.Timestamp(clock() + timedelta(days=14))


def test_turning_auto_rotate_off_is_quorum_guarded(ledger: kl.KeyLedger, home: Path,
                                                   clock: FakeClock) -> None:
    ledger.create_key("k", spec="AES_256")
    with second_admin(ledger, home, clock) as bob:
        ledger.set_policy("*", quorum=2)
        with pytest.raises(kl.PolicyViolation, match="request"):
            ledger.set_policy("k", auto_rotate=False)
        assert ledger.get_key("k").policy.get("auto_rotate", True) is True
        rid = ledger.request("set_policy", "k", "legacy app pins the key", auto_rotate=False)
        assert bob.approve(rid)["executed"] is True
    assert ledger.get_key("k").policy["auto_rotate"] is False


def test_weakening_the_homes_rotation_rules_is_quorum_guarded(ledger: kl.KeyLedger, home: Path,
                                                              clock: FakeClock) -> None:
    ledger.set_policy("*", rotation_by_purpose={"encrypt": "30d"},
                      rotation_by_tag={"env=prod": "14d"}, usage_limit=1000)
    ledger.create_key("k", spec="AES_256")
    ledger.create_key("prod", spec="AES_256", tags={"env": "prod"})
    with second_admin(ledger, home, clock) as bob:
        ledger.set_policy("*", quorum=2)
        for change in ({"rotation_by_purpose": {"encrypt": "10y"}},
                       {"rotation_by_tag": {}},
                       {"usage_limit": 2**40}):
            with pytest.raises(kl.PolicyViolation, match="request"):
                ledger.set_policy("*", **change)
        assert period_of(ledger, "k") == timedelta(days=30)
        assert period_of(ledger, "prod") == timedelta(days=14)
        # Tightening stays a one-admin change; the weakening goes through approval.
        ledger.set_policy("*", rotation_by_purpose={"encrypt": "20d"})
        assert period_of(ledger, "k") == timedelta(days=20)
        rid = ledger.request("set_policy", "*", "archive keys", rotation_by_purpose={"encrypt": "1y"})
        assert bob.approve(rid)["executed"] is True
    assert period_of(ledger, "k") == timedelta(days=365)


# == 3. due work: nothing due, deletion windows, usage limits, quorum ================================
def test_run_due_with_nothing_due_does_nothing(ledger: kl.KeyLedger, clock: FakeClock,
                                               home: Path) -> None:
    ledger.create_key("enc", spec="AES_256")
    ledger.create_key("sig", spec="EC_P256")
    ledger.create_key("lim", spec="AES_256")
    ledger.set_policy("lim", usage_limit=10)
    ledger.create_key("manual", spec="AES_256")
    ledger.set_policy("manual", auto_rotate=False)
    ledger.create_key("pending", spec="AES_256")
    ledger.schedule_deletion("pending", 30)
    for _ in range(9):
        ledger.encrypt("lim", b"x")
    clock.advance(days=29)
    before = ledger.list_keys()
    labels = hsm_labels(home) if PKCS11_TOOL else None
    report = ledger.run_due()
    assert report.done == [] and report.skipped == []
    assert report.to_frame().empty
    assert "0 done, 0 skipped" in str(report)
    pd.testing.assert_frame_equal(ledger.list_keys(), before)
    if labels is not None:
        assert hsm_labels(home) == labels
    actions = ledger.audit(since=clock())["action"].tolist()
    assert actions.count("run_due") == 1
    assert not {"rotate", "destroy", "deactivate"} & set(actions)
    rec = ledger.audit(action="run_due").iloc[-1]
    assert rec["outcome"] == "ok" and rec["detail"] == "0 done, 0 skipped"


@needs_pkcs11_tool
def test_deletion_waits_for_its_window_then_run_due_destroys(ledger: kl.KeyLedger,
                                                             clock: FakeClock, home: Path) -> None:
    ledger.create_key("old", spec="AES_256")
    blob = ledger.encrypt("old", b"last words")
    ledger.schedule_deletion("old", 7)
    clock.advance(days=7, minutes=-1)
    assert ledger.run_due().done == []
    assert ledger.get_key("old").state is kl.KeyState.PENDING_DELETION
    assert key_labels(home, "old") == {"kl:old:v1"}
    clock.advance(minutes=1)
    report = ledger.run_due()
    assert done(report) == [("destroy", "old")] and report.skipped == []
    assert ledger.get_key("old").state is kl.KeyState.DESTROYED
    assert key_labels(home, "old") == set()
    with pytest.raises(kl.KeyStateError):
        ledger.decrypt(blob)
    assert ledger.run_due().done == []  # and not again


def test_usage_limit_rotates_at_the_next_run_due(ledger: kl.KeyLedger) -> None:
    ledger.create_key("own", spec="AES_256")
    ledger.set_policy("own", usage_limit=3)
    ledger.create_key("home", spec="AES_256")
    ledger.create_key("sig", spec="EC_P256")
    ledger.set_policy("*", usage_limit=2)  # applies to keys without their own limit
    blobs = [ledger.encrypt("own", b"a"), ledger.encrypt("own", b"b"), ledger.encrypt("home", b"c")]
    for _ in range(5):
        ledger.sign("sig", b"signing is not an encryption")
    assert ledger.run_due().done == []
    blobs += [ledger.encrypt("own", b"d"), ledger.encrypt("home", b"e")]
    assert ledger.get_key("own").latest_version == 1  # nothing happens before run_due
    report = ledger.run_due()
    assert sorted(done(report)) == [("rotate", "home"), ("rotate", "own")]
    reasons = {d["key"]: d["reason"] for d in report.done}
    assert "3 of 3 encryptions" in reasons["own"] and "2 of 2 encryptions" in reasons["home"]
    assert ledger.get_key("own").latest_version == 2
    assert ledger.run_due().done == []  # the new version starts from zero
    assert [header_of(ledger.encrypt(n, b"f"))[1] for n in ("own", "home")] == [2, 2]
    for blob, plaintext in zip(blobs, (b"a", b"b", b"c", b"d", b"e"), strict=True):
        assert ledger.decrypt(blob) == plaintext


@pytest.mark.parametrize("scope", ["*", "key"])
def test_quorum_two_skips_a_due_destroy_with_a_reason(ledger: kl.KeyLedger, clock: FakeClock,
                                                      home: Path, scope: str) -> None:
    ledger.create_key("old", spec="AES_256")
    blob = ledger.encrypt("old", b"keep me a while")
    with second_admin(ledger, home, clock) as bob:
        ledger.set_policy("*" if scope == "*" else "old", quorum=2)
        ledger.schedule_deletion("old", 7)
        clock.advance(days=8)
        report = ledger.run_due()
        assert report.done == []
        assert [(s["action"], s["key"]) for s in report.skipped] == [("destroy", "old")]
        reason = report.skipped[0]["reason"]
        assert "needs 2 approvals" in reason and "request('destroy'" in reason
        assert report.to_frame()["outcome"].tolist() == ["skipped"]
        assert ledger.get_key("old").state is kl.KeyState.PENDING_DELETION
        if PKCS11_TOOL:
            assert key_labels(home, "old") == {"kl:old:v1"}
        assert ledger.run_due().skipped == report.skipped  # skipped again, never done alone
        rid = ledger.request("destroy", "old", "retired service")
        assert ledger.get_key("old").state is kl.KeyState.PENDING_DELETION
        assert bob.approve(rid)["executed"] is True
    assert ledger.get_key("old").state is kl.KeyState.DESTROYED
    with pytest.raises(kl.KeyStateError):
        ledger.decrypt(blob)
    assert ledger.run_due().skipped == []


def test_run_due_now_in_the_future_is_done_or_refused(ledger: kl.KeyLedger,
                                                      clock: FakeClock) -> None:
    ledger.create_key("old", spec="AES_256")
    ledger.schedule_deletion("old", 7)
    try:
        report = ledger.run_due(now=clock() + timedelta(days=8))
    except kl.InvalidInput:
        return  # refusing a `now` later than the clock is a fine answer
    # Otherwise the report must not say the window ended and then refuse because it did not.
    assert done(report) == [("destroy", "old")], str(report)


# == 4. rewrap_many and version_usage ================================================================
@dataclass
class Corpus:
    items: list[tuple[str, bytes, bytes]]  # key, plaintext, ciphertext
    counts: dict[tuple[str, int], int]
    latest: dict[str, int]

    @property
    def blobs(self) -> list[bytes]:
        return [blob for _, _, blob in self.items]


@pytest.fixture
def corpus(ledger: kl.KeyLedger, clock: FakeClock) -> Corpus:
    """Ciphertexts under a v1 (3), a v2 (2) and b v1 (4); then both keys rotate once more."""
    ledger.create_key("a", spec="AES_256")
    ledger.create_key("b", spec="AES_256")
    items = []

    def make(name: str, n: int) -> None:
        for _ in range(n):
            plaintext = os.urandom(1 + len(items) * 7 % 50)
            items.append((name, plaintext, ledger.encrypt(name, plaintext, context=CTX)))

    make("a", 3)
    ledger.rotate("a")
    make("b", 2)
    make("a", 2)
    make("b", 2)
    ledger.rotate("a")
    ledger.rotate("b")
    clock.advance(hours=1)
    return Corpus(items, {("a", 1): 3, ("a", 2): 2, ("b", 1): 4}, {"a": 3, "b": 2})


def counts_of(result) -> dict[tuple[str, int], int]:
    return {(r.key, int(r.version)): int(r.ciphertexts) for r in result.counts.itertuples()}


def assert_rewrapped(led: kl.KeyLedger, corpus: Corpus, new: list[bytes | None]) -> None:
    assert len(new) == len(corpus.items)
    for (name, plaintext, old), blob in zip(corpus.items, new, strict=True):
        assert blob is not None and blob != old
        key = led.get_key(name)
        assert header_of(blob) == (key.key_id, corpus.latest[name])
        assert led.decrypt(blob, context=CTX) == plaintext
        assert led.decrypt(old, context=CTX) == plaintext  # rotation never breaks old data


def write_parquet(path: Path, blobs: list[bytes]) -> None:
    pq.write_table(pa.table({"id": list(range(len(blobs))),
                             "ciphertext": pa.array(blobs, type=pa.binary())}), path)


def test_rewrap_many_dry_run_counts_and_changes_nothing(ledger: kl.KeyLedger, corpus: Corpus,
                                                        tmp_path: Path) -> None:
    blobs = corpus.blobs
    copy = list(blobs)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_parquet(src, blobs)
    before_file = src.read_bytes()
    usage_before = ledger.version_usage()
    sources = {"list": blobs, "series": pd.Series(blobs, index=range(100, 100 + len(blobs))),
               "parquet": src}
    for what, source in sources.items():
        result = ledger.rewrap_many(source, context=CTX, dry_run=True, out=out)
        assert result.dry_run, what
        assert counts_of(result) == corpus.counts, what
        assert result.ciphertexts == [None] * len(blobs), what
        assert result.errors.empty, what
        assert "nothing changed" in str(result)
    assert blobs == copy and src.read_bytes() == before_file and not out.exists()
    assert ledger.audit(action="rewrap").empty
    assert ledger.audit(action="rewrap_many")["detail"].tolist() == [
        f"dry run over {len(blobs)} ciphertexts"] * 3
    after = ledger.version_usage()
    pd.testing.assert_frame_equal(after[["key", "version", "encryptions", "decryptions"]],
                                  usage_before[["key", "version", "encryptions", "decryptions"]])
    assert {k.name: k.latest_version for k in map(ledger.get_key, "ab")} == corpus.latest


def test_rewrap_many_over_a_list(ledger: kl.KeyLedger, corpus: Corpus) -> None:
    result = ledger.rewrap_many(corpus.blobs, context=CTX, progress=False)
    assert not result.dry_run and result.ok == len(corpus.items) and result.errors.empty
    assert counts_of(result) == corpus.counts  # the "before" picture
    assert_rewrapped(ledger, corpus, result.ciphertexts)
    # one rewrap_many record per key of the chunk, with its counts; the call's own without a key
    assert ledger.audit(action="rewrap").empty
    ctx_text = ledger.audit(action="encrypt")["context"].iloc[0]
    records = ledger.audit(action="rewrap_many").sort_values("seq")
    records = records[["key", "version", "outcome", "detail", "context"]].astype(object)
    assert records.where(records.notna(), None).values.tolist() == [
        ["a", 3, "ok", "count=5 ok=5 failed=0 versions=3:5 from=1:3,2:2", ctx_text],
        ["b", 2, "ok", "count=4 ok=4 failed=0 versions=2:4 from=1:4", ctx_text],
        [None, None, "ok", f"{len(corpus.items)} rewrapped, 0 failed", None]]
    usage = ledger.version_usage().set_index(["key", "version"])["encryptions"]
    assert usage.to_dict() == {("a", 1): 3, ("a", 2): 2, ("a", 3): 5,
                               ("b", 1): 4, ("b", 2): 4}


def test_rewrap_many_over_a_pandas_series(ledger: kl.KeyLedger, corpus: Corpus) -> None:
    series = pd.Series(corpus.blobs, index=[f"row{i}" for i in range(len(corpus.items))])
    result = ledger.rewrap_many(series, context=CTX, progress=False)
    assert result.ok == len(corpus.items) and result.errors.empty
    assert counts_of(result) == corpus.counts
    assert_rewrapped(ledger, corpus, result.ciphertexts)
    assert series.tolist() == corpus.blobs  # the input is not modified in place


def test_rewrap_many_over_a_parquet_file_writes_out(ledger: kl.KeyLedger, corpus: Corpus,
                                                    tmp_path: Path) -> None:
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_parquet(src, corpus.blobs)
    before_file = src.read_bytes()
    result = ledger.rewrap_many(src, context=CTX, out=out, progress=False)
    assert result.ok == len(corpus.items) and result.errors.empty
    assert counts_of(result) == corpus.counts
    assert src.read_bytes() == before_file
    table = pq.read_table(out)
    assert table.column_names == ["id", "ciphertext"]
    assert table.column("id").to_pylist() == list(range(len(corpus.items)))
    written = table.column("ciphertext").to_pylist()
    assert written == result.ciphertexts
    assert_rewrapped(ledger, corpus, written)


def test_rewrap_many_reports_each_bad_item_and_finishes_the_rest(
        ledger: kl.KeyLedger, corpus: Corpus, tmp_path: Path) -> None:
    blobs = corpus.blobs
    bad = 4
    tampered = blobs[bad][:-1] + bytes([blobs[bad][-1] ^ 1])
    items = blobs[:bad] + [tampered] + blobs[bad + 1:]
    result = ledger.rewrap_many(items, context=CTX, progress=False)
    assert result.ok == len(items) - 1
    assert result.errors[["index", "error"]].values.tolist() == [[bad, "InvalidCiphertext"]]
    assert result.ciphertexts[bad] is None
    good = [i for i in range(len(items)) if i != bad]
    for i in good:
        name, plaintext, _ = corpus.items[i]
        assert header_of(result.ciphertexts[i])[1] == corpus.latest[name]
        assert ledger.decrypt(result.ciphertexts[i], context=CTX) == plaintext
    assert "1 failed" in str(result)
    # Not a ciphertext at all: counted as "invalid" by the dry run, one error row when rewrapped.
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_parquet(src, [*blobs[:2], b"not a ciphertext", *blobs[2:]])
    dry = ledger.rewrap_many(src, context=CTX, dry_run=True)
    assert counts_of(dry) == {**corpus.counts, ("invalid", 0): 1}
    result = ledger.rewrap_many(src, context=CTX, out=out, progress=False)
    assert result.errors["index"].tolist() == [2]
    written = pq.read_table(out).column("ciphertext").to_pylist()
    assert written[2] is None and None not in written[:2] + written[3:]
    assert ledger.audit(action="rewrap", outcome="failed")["error"].tolist() == [
        "InvalidCiphertext", "InvalidCiphertext"]


def test_rewrap_many_dry_run_needs_the_user_role(ledger: kl.KeyLedger, home: Path,
                                                 clock: FakeClock) -> None:
    ledger.create_key("payroll", spec="AES_256")
    blob = ledger.encrypt("payroll", b"salary")
    with kl.open(home, principal="eve", clock=clock) as eve, pytest.raises(kl.AccessDenied):
        eve.rewrap_many([blob], dry_run=True)


def test_version_usage_shows_decryptions_and_last_decrypt(ledger: kl.KeyLedger,
                                                          clock: FakeClock) -> None:
    ledger.create_key("k", spec="AES_256")
    created = clock()
    v1 = [ledger.encrypt("k", bytes([i])) for i in range(3)]
    ledger.rotate("k")
    v2 = [ledger.encrypt("k", bytes([i])) for i in range(2)]
    t1 = clock.advance(days=1)
    for blob in v1 * 2:
        ledger.decrypt(blob)
    t2 = clock.advance(days=1)
    ledger.decrypt(v2[0])
    df = ledger.version_usage("k").set_index("version")
    assert df.index.tolist() == [1, 2]
    assert df.loc[1, "encryptions"] == 3 and df.loc[2, "encryptions"] == 2
    assert df.loc[1, "decryptions"] == 6 and df.loc[2, "decryptions"] == 1
    assert df.loc[1, "last_decrypt"] == pd.Timestamp(t1)  # tz-aware UTC
    assert df.loc[2, "last_decrypt"] == pd.Timestamp(t2)
    assert df.loc[1, "state"] == "retired" and df.loc[2, "state"] == "active"
    assert df.loc[1, "created_at"] == pd.Timestamp(created)
    assert not df["below_min_decryption"].any()
    ledger.create_key("unused", spec="AES_256")
    whole = ledger.version_usage()
    unused = whole[whole["key"] == "unused"].iloc[0]
    assert unused["decryptions"] == 0 and pd.isna(unused["last_decrypt"])
    # Raising the minimum decryption version shows up, and refusals are not counted as use.
    ledger.set_policy("k", min_decryption_version=2)
    with pytest.raises(kl.KeyStateError):
        ledger.decrypt(v1[0])
    df = ledger.version_usage("k").set_index("version")
    assert df.loc[1, "below_min_decryption"] and not df.loc[2, "below_min_decryption"]
    assert df.loc[1, "decryptions"] == 6


@pytest.mark.slow
def test_rewrap_many_moves_100_000_ciphertexts(ledger: kl.KeyLedger) -> None:
    n = 100_000
    key = ledger.create_key("bulk", spec="AES_256")
    blobs = ledger.encrypt_many("bulk", [i.to_bytes(4, "big") for i in range(n)])  # setup
    ledger.rotate("bulk")
    assert counts_of(ledger.rewrap_many(blobs, dry_run=True)) == {("bulk", 1): n}
    result = ledger.rewrap_many(blobs, progress=False)
    assert result.ok == n and result.errors.empty
    new = result.ciphertexts
    assert {header_of(b) for b in new} == {(key.key_id, 2)}
    assert len(set(new)) == n
    for i in range(0, n, 97):  # a spread sample decrypts to the right plaintext
        assert ledger.decrypt(new[i]) == i.to_bytes(4, "big")
    assert ledger.decrypt(new[-1]) == (n - 1).to_bytes(4, "big")
    usage = ledger.version_usage("bulk").set_index("version")
    assert usage.loc[1, "encryptions"] == n and usage.loc[2, "encryptions"] == n
    records = ledger.audit(action="rewrap_many", key="bulk", limit=None)
    assert len(records) == -(-n // REWRAP_CHUNK) and ledger.audit(action="rewrap").empty
    assert sum(int(d.split()[1][3:]) for d in records["detail"]) == n  # ok=<items>


def test_rewrap_many_of_single_encrypt_calls_across_chunks_keeps_item_errors(
        ledger: kl.KeyLedger) -> None:
    """Ciphertexts of single ``encrypt`` calls over two chunks, one tampered in the second: it
    fails as a single ``rewrap`` would (same error, same failed record), the rest move."""
    n, bad = REWRAP_CHUNK + 3, REWRAP_CHUNK + 1
    key = ledger.create_key("single", spec="AES_256")
    blobs = [ledger.encrypt("single", i.to_bytes(4, "big"), context=CTX) for i in range(n)]
    blobs[bad] = blobs[bad][:-1] + bytes([blobs[bad][-1] ^ 1])
    ledger.rotate("single")
    with pytest.raises(kl.InvalidCiphertext) as single:
        ledger.rewrap(blobs[bad], context=CTX)
    result = ledger.rewrap_many(blobs, context=CTX, progress=False)
    assert result.ok == n - 1 and result.ciphertexts[bad] is None
    assert result.errors.values.tolist() == [[bad, "InvalidCiphertext", str(single.value)]]
    assert {header_of(b) for b in result.ciphertexts if b} == {(key.key_id, 2)}
    assert ledger.decrypt(result.ciphertexts[-1], context=CTX) == (n - 1).to_bytes(4, "big")
    failed = ledger.audit(action="rewrap", limit=None)
    assert failed[["outcome", "error"]].values.tolist() == [["failed", "InvalidCiphertext"]] * 2
    details = ledger.audit(action="rewrap_many", key="single", limit=None).sort_values("seq")
    assert details["detail"].tolist() == [
        f"count={REWRAP_CHUNK} ok={REWRAP_CHUNK} failed=0 versions=2:{REWRAP_CHUNK} "
        f"from=1:{REWRAP_CHUNK}", "count=2 ok=2 failed=0 versions=2:2 from=1:2"]
    usage = ledger.version_usage("single").set_index("version")
    assert usage.loc[2, "encryptions"] == n - 1 and usage.loc[1, "decryptions"] == 0


def test_rewrap_many_at_a_usage_limit_rotates_mid_chunk_or_goes_item_by_item(
        ledger: kl.KeyLedger) -> None:
    ledger.create_key("lim", spec="AES_256")
    blobs = ledger.encrypt_many("lim", [bytes([i]) for i in range(25)])
    ledger.rotate("lim")
    ledger.set_policy("lim", usage_limit=10)  # auto_rotate on: v2 x10, v3 x10, v4 x5
    result = ledger.rewrap_many(blobs, progress=False)
    assert result.ok == 25 and [header_of(b)[1] for b in result.ciphertexts] == \
        [2] * 10 + [3] * 10 + [4] * 5
    record = ledger.audit(action="rewrap_many", key="lim").iloc[0]
    assert record["detail"] == "count=25 ok=25 failed=0 versions=2:10,3:10,4:5 from=1:25"
    assert record["version"] == 4
    usage = ledger.version_usage("lim").set_index("version")["encryptions"]
    assert usage.to_dict() == {1: 25, 2: 10, 3: 10, 4: 5}
    # auto_rotate off: the 5 uses v4 has left go, each other item fails as a single rewrap does
    ledger.set_policy("lim", usage_limit=10, auto_rotate=False)
    result = ledger.rewrap_many(blobs, progress=False)
    assert result.ok == 5 and set(result.errors["error"]) == {"PolicyViolation"}
    assert result.errors["index"].tolist() == list(range(5, 25))
    assert ledger.get_key("lim").latest_version == 4
    usage = ledger.version_usage("lim").set_index("version")["encryptions"]
    assert usage[4] == 10


def test_rewrap_many_refuses_items_of_keys_the_caller_may_not_use_one_by_one(
        ledger: kl.KeyLedger, home: Path, clock: FakeClock) -> None:
    for name in ("mine", "theirs"):
        ledger.create_key(name, spec="AES_256")
    blobs = [ledger.encrypt("mine", b"m1"), ledger.encrypt("theirs", b"t1"),
             ledger.encrypt("mine", b"m2")]
    ledger.grant("mine", "bob", "user")
    ledger.rotate("mine")
    with kl.open(home, principal="bob", clock=clock) as bob:
        with pytest.raises(kl.AccessDenied) as single:
            bob.rewrap(blobs[1])
        result = bob.rewrap_many(blobs, progress=False)
    assert result.ok == 2 and result.errors.values.tolist() == [
        [1, "AccessDenied", str(single.value)]]
    assert ledger.decrypt(result.ciphertexts[2]) == b"m2"
    denied = ledger.audit(action="rewrap", outcome="denied", limit=None)
    assert denied["principal"].tolist() == ["bob", "bob"]


# == 5. trim ==========================================================================================
@pytest.fixture
def three_versions(ledger: kl.KeyLedger) -> list[bytes]:
    ledger.create_key("t", spec="AES_256")
    blobs = [ledger.encrypt("t", b"under v1")]
    ledger.rotate("t")
    blobs.append(ledger.encrypt("t", b"under v2"))
    ledger.rotate("t")
    blobs.append(ledger.encrypt("t", b"under v3"))
    return blobs


@needs_pkcs11_tool
def test_trim_destroys_old_material_and_refuses_its_ciphertexts(
        ledger: kl.KeyLedger, home: Path, three_versions: list[bytes]) -> None:
    assert key_labels(home, "t") == {"kl:t:v1", "kl:t:v2", "kl:t:v3"}
    key = ledger.trim("t", 3)
    assert key.min_decryption_version == 3
    assert key_labels(home, "t") == {"kl:t:v3"}
    for blob in three_versions[:2]:
        with pytest.raises(kl.KeyStateError):
            ledger.decrypt(blob)
    assert ledger.decrypt(three_versions[2]) == b"under v3"
    assert header_of(ledger.encrypt("t", b"still encrypts"))[1] == 3
    usage = ledger.version_usage("t").set_index("version")
    assert usage["state"].tolist() == ["destroyed", "destroyed", "active"]
    assert usage["below_min_decryption"].tolist() == [True, True, False]
    assert ledger.audit(action="trim")["detail"].tolist() == ["destroyed v1, v2"]
    with pytest.raises(kl.PolicyViolation):
        ledger.trim("t", 4)  # above the latest version
    with pytest.raises(kl.PolicyViolation):
        ledger.trim("t", 1)


@needs_pkcs11_tool
def test_trim_with_quorum_two_needs_request_and_approval(
        ledger: kl.KeyLedger, home: Path, clock: FakeClock, three_versions: list[bytes]) -> None:
    with second_admin(ledger, home, clock) as bob:
        ledger.set_policy("*", quorum=2)
        with pytest.raises(kl.PolicyViolation, match="request"):
            ledger.trim("t", 2)
        assert key_labels(home, "t") == {"kl:t:v1", "kl:t:v2", "kl:t:v3"}
        assert ledger.decrypt(three_versions[0]) == b"under v1"
        rid = ledger.request("trim", "t", "v1 data migrated", min_version=2)
        assert key_labels(home, "t") == {"kl:t:v1", "kl:t:v2", "kl:t:v3"}  # still pending
        assert ledger.decrypt(three_versions[0]) == b"under v1"
        result = bob.approve(rid)
        assert result["executed"] is True and result["approvals"] == 2
    assert key_labels(home, "t") == {"kl:t:v2", "kl:t:v3"}
    with pytest.raises(kl.KeyStateError):
        ledger.decrypt(three_versions[0])
    assert ledger.decrypt(three_versions[1]) == b"under v2"
    assert ledger.get_key("t").min_decryption_version == 2


@pytest.mark.parametrize("bad", [None, "", "2", 2.0, True])
def test_a_trim_request_without_a_whole_min_version_is_refused_when_filed(
        ledger: kl.KeyLedger, three_versions: list[bytes], bad: object) -> None:
    """Checked when filed (was a raw TypeError/ValueError when the approval ran it)."""
    before = len(ledger.requests())
    with pytest.raises(kl.InvalidInput, match="min_version"):
        ledger.request("trim", "t", "migrated", min_version=bad)
    assert len(ledger.requests()) == before  # nothing filed
    refused = ledger.audit(action="request", limit=1, newest_first=True)
    assert refused["outcome"].tolist() == ["failed"]


def test_run_due_keeps_working_across_time_zones(ledger: kl.KeyLedger, clock: FakeClock) -> None:
    """``now`` may be given in any time zone; due-ness is the same instant."""
    ledger.create_key("k", spec="AES_256")
    clock.advance(days=90)
    report = ledger.run_due(now=clock().astimezone(timezone(timedelta(hours=-5))))
    assert done(report) == [("rotate", "k")]
