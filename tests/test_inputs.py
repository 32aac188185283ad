"""Must show: bad input is refused with a specific error and a clear message, changes nothing
(catalog and token), and leaves exactly one "failed" audit record naming the error class."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from conftest import hsm_objects

import keyledger as kl
from keyledger import ciphertext as ct
from keyledger.model import name_digest

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_TOOL = shutil.which("pkcs11-tool")
NOISE = {"audit", "list_keys"}  # records made by the checks themselves


def key_objects(home: Path) -> list[tuple[str, str, str, str]]:
    """The key objects on the token (labels "kl:..."), read by `pkcs11-tool` in another process."""
    return sorted((o["label"], o.get("id", ""), o["type"], o.get("access", ""))
                  for o in hsm_objects(home) if o.get("label", "").startswith("kl:"))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Seeded:
    led: kl.KeyLedger
    home: Path
    blob: bytes  # a valid ciphertext under "k"
    sig: bytes  # a valid signature under "s"
    last_seq: int | None = None  # newest audit seq already seen (see run_refused)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Seeded:
    """One home for the whole module: since no bad call may change anything, sharing it is part
    of the test. Keys: "k" AES_256 active, "s" EC_P256 active, "m" HMAC active, "gone" destroyed,
    "pend" pending deletion."""
    if PKCS11_TOOL is None or not os.path.exists(MODULE):
        pytest.skip("needs SoftHSM2 and pkcs11-tool (opensc)")
    home = tmp_path_factory.mktemp("inputs") / "home"
    clock = Clock()
    led = kl.open(home, principal="alice", clock=clock)
    try:
        led.create_key("k", spec="AES_256", owner="payments")
        led.create_key("s", spec="EC_P256")
        led.create_key("m", spec="HMAC_SHA256")
        led.create_key("gone", spec="AES_128")
        led.create_key("pend", spec="AES_128")
        led.schedule_deletion("gone", 7)
        clock.now += timedelta(days=8)
        led.destroy("gone")
        led.schedule_deletion("pend", 30)
        yield Seeded(led, home, led.encrypt("k", b"payload", context={"t": "1"}),
                     led.sign("s", b"payload"))
    finally:
        led.close()


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Seeded], object]
    error: type[kl.KeyLedgerError]
    says: tuple[str, ...]  # fragments the message must contain
    action: str  # audit action expected
    key: str | None = None  # audit key column expected


ALL_SPECS = tuple(kl.SPECS)

CASES = [
    # unknown key, for every kind of call that takes a name
    # (a name that names no key may be a secret in the wrong argument: only its hash is kept)
    *[Case(f"unknown-{op}", call, kl.KeyNotFound, ("'nope'", "no key named"), op,
           name_digest("nope"))
      for op, call in [
          ("get_key", lambda s: s.led.get_key("nope")),
          ("encrypt", lambda s: s.led.encrypt("nope", b"x")),
          ("generate_data_key", lambda s: s.led.generate_data_key("nope")),
          ("envelope_encrypt", lambda s: s.led.envelope_encrypt("nope", b"x")),
          ("sign", lambda s: s.led.sign("nope", b"x")),
          ("verify", lambda s: s.led.verify("nope", b"x", b"sig")),
          ("mac", lambda s: s.led.mac("nope", b"x")),
          ("verify_mac", lambda s: s.led.verify_mac("nope", b"x", b"tag")),
          ("public_key_pem", lambda s: s.led.public_key_pem("nope")),
          ("rotate", lambda s: s.led.rotate("nope")),
          ("enable", lambda s: s.led.enable("nope")),
          ("disable", lambda s: s.led.disable("nope")),
          ("mark_compromised", lambda s: s.led.mark_compromised("nope", "leaked")),
          ("schedule_deletion", lambda s: s.led.schedule_deletion("nope", 7)),
          ("cancel_deletion", lambda s: s.led.cancel_deletion("nope")),
          ("destroy", lambda s: s.led.destroy("nope")),
          ("set_policy", lambda s: s.led.set_policy("nope", rotation_period="30d")),
          ("set_tags", lambda s: s.led.set_tags("nope", {"a": "b"})),
          ("set_alias", lambda s: s.led.set_alias("nope", "alias")),
      ]],
    # bad spec and purpose
    Case("bad-spec", lambda s: s.led.create_key("new", spec="AES_999"), kl.InvalidInput,
         ("'AES_999'", *ALL_SPECS), "create_key", "new"),
    Case("spec-not-a-string", lambda s: s.led.create_key("new", spec=256), kl.InvalidInput,
         ("spec must be a string", "int"), "create_key", "new"),
    Case("purpose-unknown", lambda s: s.led.create_key("new", spec="AES_256", purpose="shred"),
         kl.InvalidInput, ("'shred'", "encrypt", "sign", "mac", "wrap"), "create_key", "new"),
    Case("purpose-mismatch", lambda s: s.led.create_key("new", spec="EC_P256", purpose="encrypt"),
         kl.InvalidInput, ("EC_P256", "'encrypt'"), "create_key", "new"),
    # names
    Case("empty-name-create", lambda s: s.led.create_key("", spec="AES_256"), kl.InvalidInput,
         ("must not be empty",), "create_key", name_digest("")),
    Case("empty-name-encrypt", lambda s: s.led.encrypt("", b"x"), kl.InvalidInput,
         ("must not be empty",), "encrypt", name_digest("")),
    Case("bad-chars-name", lambda s: s.led.create_key("a b", spec="AES_256"), kl.InvalidInput,
         ("'a b'", "letters, digits"), "create_key", name_digest("a b")),
    Case("name-int-create", lambda s: s.led.create_key(42, spec="AES_256"), kl.InvalidInput,
         ("must be a string", "int"), "create_key", None),
    Case("name-int-encrypt", lambda s: s.led.encrypt(42, b"x"), kl.InvalidInput,
         ("must be a string", "int"), "encrypt", None),
    Case("name-int-rotate", lambda s: s.led.rotate(42), kl.InvalidInput,
         ("must be a string", "int"), "rotate", None),
    Case("owner-empty", lambda s: s.led.create_key("new", spec="AES_256", owner=""),
         kl.InvalidInput, ("owner must not be empty",), "create_key", "new"),
    # wrong types of data
    Case("plaintext-str", lambda s: s.led.encrypt("k", "card 4111"), kl.InvalidInput,
         ("plaintext must be bytes", "encode"), "encrypt", "k"),
    Case("plaintext-none", lambda s: s.led.encrypt("k", None), kl.InvalidInput,
         ("plaintext must be bytes", "NoneType"), "encrypt", "k"),
    Case("message-str-sign", lambda s: s.led.sign("s", "hello"), kl.InvalidInput,
         ("message must be bytes",), "sign", "s"),
    Case("signature-str", lambda s: s.led.verify("s", b"payload", "sig"), kl.InvalidInput,
         ("signature must be bytes",), "verify", "s"),
    Case("ciphertext-str", lambda s: s.led.decrypt("KL..."), kl.InvalidInput,
         ("ciphertext must be bytes",), "decrypt", None),
    Case("ciphertext-garbage", lambda s: s.led.decrypt(b"x" * 64), kl.InvalidCiphertext,
         ("not a keyledger ciphertext",), "decrypt", None),
    Case("tags-not-strings", lambda s: s.led.create_key("new", spec="AES_256", tags={"n": 1}),
         kl.InvalidInput, ("tags must be a mapping of strings",), "create_key", "new"),
    Case("exportable-not-bool", lambda s: s.led.create_key("new", spec="AES_256",
                                                            exportable="yes"),
         kl.InvalidInput, ("exportable must be True or False",), "create_key", "new"),
    # deletion window
    Case("days-3", lambda s: s.led.schedule_deletion("k", days=3), kl.PolicyViolation,
         ("7 to 30 days", "not 3"), "schedule_deletion", "k"),
    Case("days-31", lambda s: s.led.schedule_deletion("k", days=31), kl.PolicyViolation,
         ("7 to 30 days", "not 31"), "schedule_deletion", "k"),
    Case("days-str", lambda s: s.led.schedule_deletion("k", days="7"), kl.InvalidInput,
         ("days must be a whole number",), "schedule_deletion", "k"),
    Case("days-float", lambda s: s.led.schedule_deletion("k", days=7.5), kl.InvalidInput,
         ("days must be a whole number",), "schedule_deletion", "k"),
    Case("days-bool", lambda s: s.led.schedule_deletion("k", days=True), kl.InvalidInput,
         ("days must be a whole number",), "schedule_deletion", "k"),
    # periods and policies
    Case("rotation-period-abc-create",
         lambda s: s.led.create_key("new", spec="AES_256", rotation_period="abc"),
         kl.InvalidInput, ("'abc'", "90d"), "create_key", "new"),
    Case("rotation-period-abc-policy", lambda s: s.led.set_policy("k", rotation_period="abc"),
         kl.InvalidInput, ("'abc'", "90d"), "set_policy", "k"),
    Case("rotation-period-int", lambda s: s.led.set_policy("k", rotation_period=90),
         kl.InvalidInput, ("timedelta",), "set_policy", "k"),
    Case("min-decryption-zero", lambda s: s.led.set_policy("k", min_decryption_version=0),
         kl.InvalidInput, ("min_decryption_version", "positive"), "set_policy", "k"),
    Case("min-decryption-above-latest",
         lambda s: s.led.set_policy("k", min_decryption_version=5),
         kl.PolicyViolation, ("above the latest version 1", "rotate first"), "set_policy", "k"),
    Case("set-policy-nothing", lambda s: s.led.set_policy("k"), kl.InvalidInput,
         ("nothing to change",), "set_policy", "k"),
    Case("compromise-without-reason", lambda s: s.led.mark_compromised("k", ""),
         kl.InvalidInput, ("reason",), "mark_compromised", "k"),
    # duplicates
    Case("duplicate-create", lambda s: s.led.create_key("k", spec="AES_256"), kl.KeyExists,
         ("'k'", "already exists"), "create_key", "k"),
    Case("duplicate-create-other-spec", lambda s: s.led.create_key("s", spec="RSA_2048"),
         kl.KeyExists, ("'s'", "already exists"), "create_key", "s"),
    Case("alias-taken", lambda s: s.led.set_alias("k", "s"), kl.KeyExists,
         ("'s'", "already exists"), "set_alias", "k"),
    # illegal transitions
    Case("enable-destroyed", lambda s: s.led.enable("gone"), kl.KeyStateError,
         ("'gone'", "destroyed"), "enable", "gone"),
    Case("rotate-destroyed", lambda s: s.led.rotate("gone"), kl.KeyStateError,
         ("'gone'", "destroyed"), "rotate", "gone"),
    Case("schedule-destroyed", lambda s: s.led.schedule_deletion("gone", 7), kl.KeyStateError,
         ("'gone'", "destroyed"), "schedule_deletion", "gone"),
    Case("cancel-deletion-active", lambda s: s.led.cancel_deletion("k"), kl.KeyStateError,
         ("'k'", "it is active"), "cancel_deletion", "k"),
    Case("destroy-active", lambda s: s.led.destroy("k"), kl.KeyStateError,
         ("'k'", "it is active", "schedule deletion"), "destroy", "k"),
    Case("destroy-pending-too-early", lambda s: s.led.destroy("pend"), kl.PolicyViolation,
         ("'pend'", "waiting period", "cancel the deletion"), "destroy", "pend"),
    Case("rotate-pending", lambda s: s.led.rotate("pend"), kl.KeyStateError,
         ("'pend'", "pending-deletion", "cancel"), "rotate", "pend"),
    Case("encrypt-pending", lambda s: s.led.encrypt("pend", b"x"), kl.KeyStateError,
         ("'pend'", "pending-deletion"), "encrypt", "pend"),
    # purpose
    Case("encrypt-with-sign-key", lambda s: s.led.encrypt("s", b"x"), kl.PolicyViolation,
         ("'s'", "sign key", "encrypt"), "encrypt", "s"),
    Case("sign-with-aes-key", lambda s: s.led.sign("k", b"x"), kl.PolicyViolation,
         ("'k'", "encrypt key", "sign"), "sign", "k"),
    Case("pem-of-symmetric", lambda s: s.led.public_key_pem("m"), kl.PolicyViolation,
         ("'m'", "symmetric"), "public_key_pem", "m"),
]



def forged_blob(s: Seeded, name: str) -> bytes:
    """A well-formed ciphertext header naming key ``name`` (read via list_keys: not counted)."""
    keys = s.led.list_keys().set_index("name")
    return ct.pack_header(uuid.UUID(keys.loc[name, "key_id"]).bytes, 1, b"\0" * 12) + b"\0" * 32


# Found by hand and by tests/test_hostile.py: each escaped as a raw Python exception, was
# silently misread, or (reason) failed only after the HSM had made a new version.
RAW_BEFORE = [
    Case("decrypt-header-names-hmac-key", lambda s: s.led.decrypt(forged_blob(s, "m")),
         kl.InvalidCiphertext, ("cannot be decrypted",), "decrypt", "m"),
    Case("decrypt-header-names-ec-key", lambda s: s.led.decrypt(forged_blob(s, "s")),
         kl.InvalidCiphertext, ("cannot be decrypted",), "decrypt", "s"),
    Case("rotation-period-overflow",
         lambda s: s.led.create_key("new", spec="AES_256", rotation_period="9999999999d"),
         kl.InvalidInput, ("at most 100 years",), "create_key", "new"),
    Case("rotation-period-overflow-policy",
         lambda s: s.led.set_policy("k", rotation_period="9999999999d"),
         kl.InvalidInput, ("at most 100 years",), "set_policy", "k"),
    Case("key-attributes-unknown-version", lambda s: s.led.key_attributes("k", version=99),
         kl.KeyStateError, ("version 99", "'k'"), "key_attributes", "k"),
    Case("key-attributes-version-str", lambda s: s.led.key_attributes("k", version="1"),
         kl.InvalidInput, ("version must be a positive whole number",), "key_attributes", "k"),
    Case("export-audit-none", lambda s: s.led.export_audit(None), kl.InvalidInput,
         ("path must be a file path",), "export_audit", None),
    Case("grant-lookalike-principal", lambda s: s.led.grant("k", "alice\n", "admin"),
         kl.InvalidInput, ("invalid principal",), "grant", "k"),
    Case("alias-trailing-newline", lambda s: s.led.set_alias("k", "k2\n"), kl.InvalidInput,
         ("invalid alias",), "set_alias", "k"),
    Case("owner-trailing-newline",
         lambda s: s.led.create_key("new", spec="AES_256", owner="ops\n"), kl.InvalidInput,
         ("invalid owner",), "create_key", "new"),
    Case("name-trailing-newline", lambda s: s.led.encrypt("k\n", b"x"), kl.InvalidInput,
         ("invalid key name",), "encrypt", name_digest("k\n")),
    Case("creator-is-user-str", lambda s: s.led.set_policy("*", creator_is_user="no"),
         kl.InvalidInput, ("creator_is_user must be True or False",), "set_policy", "*"),
    Case("activate-str", lambda s: s.led.create_key("new", spec="AES_256", activate="no"),
         kl.InvalidInput, ("activate must be True or False",), "create_key", "new"),
    Case("verify-version-str", lambda s: s.led.verify("s", b"payload", s.sig, version="1"),
         kl.InvalidInput, ("version must be a positive whole number",), "verify", "s"),
    Case("verify-mac-version-float", lambda s: s.led.verify_mac("m", b"x", b"t", version=1.0),
         kl.InvalidInput, ("version must be a positive whole number",), "verify_mac", "m"),
    Case("public-key-version-zero", lambda s: s.led.public_key_pem("s", version=0),
         kl.InvalidInput, ("version must be a positive whole number",), "public_key_pem", "s"),
    Case("rotate-reason-dict", lambda s: s.led.rotate("k", reason={"why": "x"}),
         kl.InvalidInput, ("reason must be text",), "rotate", "k"),
    Case("destroy-reason-int", lambda s: s.led.destroy("pend", reason=7),
         kl.InvalidInput, ("reason must be text",), "destroy", "pend"),
    Case("reconcile-full-str", lambda s: s.led.reconcile(full="no"), kl.InvalidInput,
         ("full must be True or False",), "reconcile", None),
    Case("backup-passphrase-lone-surrogate",  # found by tests/test_hostile.py
         lambda s: s.led.backup(s.home.parent / "never.klbak", passphrase="\ud800" * 20),
         kl.InvalidInput, ("passphrase must be valid Unicode",), "backup", None),
]

BAD_CONTEXT = [
    Case("context-int-value-encrypt",
         lambda s: s.led.encrypt("k", b"x", context={"tenant": 1}), kl.InvalidInput,
         ("context", "strings"), "encrypt", "k"),
    Case("context-int-key-encrypt",
         lambda s: s.led.encrypt("k", b"x", context={1: "a"}), kl.InvalidInput,
         ("context", "strings"), "encrypt", "k"),
    Case("context-list-decrypt",
         lambda s: s.led.decrypt(s.blob, context={"t": ["1"]}), kl.InvalidInput,
         ("context", "strings"), "decrypt", None),
    Case("context-not-mapping-data-key",
         lambda s: s.led.generate_data_key("k", context=[("t", "1")]), kl.InvalidInput,
         ("context", "mapping"), "generate_data_key", "k"),
]

def run_refused(s: Seeded, case: Case) -> pd.DataFrame:
    """Run a bad call; check error, message and that nothing changed. Returns new audit rows.

    ``audit()`` ingests and checkpoints (~0.2 s), so the newest seq seen by the previous case is
    reused; it is cleared first, so a case that fails part-way makes the next one read afresh."""
    last_seq, s.last_seq = s.last_seq, None
    if last_seq is None:
        last_seq = int(s.led.audit()["seq"].max())
    keys_before, hsm_before = s.led.list_keys(), key_objects(s.home)
    with pytest.raises(case.error) as err:
        case.call(s)
    assert type(err.value) is case.error, f"expected exactly {case.error.__name__}"
    message = str(err.value)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    pd.testing.assert_frame_equal(keys_before, s.led.list_keys())
    assert key_objects(s.home) == hsm_before
    audit = s.led.audit()
    new = audit[(audit["seq"] > last_seq) & ~audit["action"].isin(NOISE)]
    s.last_seq = int(audit["seq"].max())
    return new


def assert_one_failed_record(new: pd.DataFrame, case: Case) -> None:
    assert len(new) == 1, new[["action", "outcome", "error"]].to_dict("records")
    rec = new.iloc[0]
    assert rec["action"] == case.action
    assert rec["outcome"] == "failed"
    assert rec["error"] == case.error.__name__
    if case.key is None:
        assert rec["key"] is None or pd.isna(rec["key"])
    else:
        assert rec["key"] == case.key


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_refused_without_change_and_audited(seeded, case):
    new = run_refused(seeded, case)
    assert_one_failed_record(new, case)


@pytest.mark.parametrize("case", RAW_BEFORE, ids=[c.id for c in RAW_BEFORE])
def test_formerly_raw_errors_are_refused_without_change_and_audited(seeded, case):
    new = run_refused(seeded, case)
    assert_one_failed_record(new, case)


def test_a_secret_passed_as_key_name_is_kept_only_as_a_hash(seeded):
    """encrypt("4111-...", b"x"): the card number is a valid name that names no key. The
    ledger keeps sha256:<12 hex> in key and detail, and audit(key=...) still finds it."""
    s, card = seeded, "4111-1111-1111-1111"
    with pytest.raises(kl.KeyNotFound):
        s.led.encrypt(card, b"x")
    s.led.flush_audit()
    hits = s.led.audit(key=card)
    assert list(hits["key"]) == [name_digest(card)] and list(hits["error"]) == ["KeyNotFound"]
    assert name_digest(card) in hits.iloc[0]["detail"]
    leaked = s.led.query("SELECT count(*) AS n FROM audit_log WHERE contains(CAST(COLUMNS(*) "
                         "AS VARCHAR), ?)", [card[:9]])
    assert leaked.iloc[0, 0] == 0
    for journal in (s.home / "journal").iterdir():
        assert card[:9].encode() not in journal.read_bytes()
    s.last_seq = None


def test_grants_refuses_a_name_no_key_can_have(seeded):
    """grants('\\udcff') raised a bare UnicodeEncodeError from pyarrow (found by
    tests/test_hostile.py); a name filter is checked as a key name ('*' stays allowed)."""
    led = seeded.led
    for bad in ("\udcff", "k\n", 7):
        with pytest.raises(kl.InvalidInput, match="key name"):
            led.grants(bad)
    failed = led.audit(action="list_keys", outcome="failed", limit=None)
    assert failed["error"].tolist()[-3:] == ["InvalidInput"] * 3
    assert set(led.grants("*")["key"]) == {"*"}


def test_query_refuses_sql_text_that_is_not_unicode(seeded):
    """query('\ud800') raised a bare TypeError from DuckDB's statement splitter (found by
    tests/test_hostile.py): SQL holding a lone surrogate is refused as text that does not parse,
    recorded as a failed query, and the ledger goes on answering."""
    led = seeded.led
    for bad in ("\ud800", "SELECT 1 -- \udcff", "SELECT '\udfff' AS x"):
        with pytest.raises(kl.InvalidInput, match="not valid Unicode"):
            led.query(bad)
    failed = led.audit(action="query", outcome="failed", limit=None)
    assert failed["error"].tolist()[-3:] == ["InvalidInput"] * 3
    assert led.query("SELECT 41 + 1 AS x")["x"].tolist() == [42]


def test_audit_refuses_malformed_filters(seeded):
    s = seeded
    for kwargs, says in [({"since": "yesterday"}, "since must be a timezone-aware datetime"),
                         ({"until": datetime(2026, 1, 1)}, "until must be a timezone-aware"),
                         ({"key": 42}, "key must be text"),
                         ({"newest_first": "yes"}, "newest_first must be True or False"),
                         ({"limit": 2**70}, "limit must be a whole number")]:
        with pytest.raises(kl.InvalidInput, match=says):
            s.led.audit(**kwargs)
    s.led.flush_audit()
    failed = s.led.audit(action="audit", outcome="failed")
    assert len(failed) >= 5 and set(failed["error"]) == {"InvalidInput"}
    s.last_seq = None


def test_open_refuses_a_lookalike_principal_and_bad_arguments(seeded, tmp_path):
    """"alice\n" is not "alice": before the fix it was accepted (and granted admin on a new
    home, or read as a distinct principal here)."""
    for kwargs, says in [({"principal": "alice\n"}, "invalid principal"),
                         ({"principal": "alice\x00"}, "invalid principal"),
                         ({"clock": 5}, "clock must be a function")]:
        with pytest.raises(kl.InvalidInput, match=says):
            kl.open(seeded.home, **kwargs)
    with pytest.raises(kl.InvalidInput, match="home must be a folder path"):
        kl.open(42, principal="alice")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", BAD_CONTEXT, ids=[c.id for c in BAD_CONTEXT])
def test_bad_context_refused_without_change(seeded, case):
    run_refused(seeded, case)


@pytest.mark.parametrize("case", BAD_CONTEXT, ids=[c.id for c in BAD_CONTEXT])
def test_bad_context_audited(seeded, case):
    assert_one_failed_record(run_refused(seeded, case), case)


def test_errors_are_keyledger_errors_with_stdlib_bases():
    """Callers can catch our errors as KeyLedgerError, or by the matching builtin."""
    assert issubclass(kl.InvalidInput, ValueError)
    assert issubclass(kl.KeyNotFound, LookupError)
    for cls in (kl.InvalidInput, kl.KeyNotFound, kl.KeyExists, kl.KeyStateError,
                kl.PolicyViolation, kl.InvalidCiphertext):
        assert issubclass(cls, kl.KeyLedgerError)


def test_seeded_state_survived_all_bad_input(seeded):
    """Run last in the module: the shared home still holds exactly what the fixture made."""
    df = seeded.led.list_keys().set_index("name")
    assert df["state"].to_dict() == {"gone": "destroyed", "k": "active", "m": "active",
                                     "pend": "pending-deletion", "s": "active"}
    assert set(df["latest_version"]) == {1}
    assert seeded.led.decrypt(seeded.blob, context={"t": "1"}) == b"payload"
    assert seeded.led.verify("s", b"payload", seeded.sig)
    failed = seeded.led.audit(outcome="failed")
    assert len(failed) >= len(CASES)
    assert failed["error"].notna().all()
