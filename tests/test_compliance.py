"""Compliance engine: every shipped rule against a fleet that violates it and one that satisfies it.

Fleets are built through the public API with the injected clock. Exceptions (state that the API
cannot produce, by design) are marked "direct write" and say why. Also: exceptions with expiry,
history and trend, user rule files (new framework, same-id override, threshold override),
malformed rule files, access, and the rendered reports.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from conftest import FakeClock, run_python
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

import keyledger as kl
from keyledger.compliance import load_rules

PASS = "correct horse battery staple"
COVERED: set[str] = set()  # rule ids with a violating and a satisfying fleet below


def covers(*rule_ids: str):
    COVERED.update(rule_ids)
    return lambda fn: fn


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def open_as(ledger, home: Path, clock: FakeClock):
    """Open more principals on the same home (after alice, the first admin); closed at the end."""
    opened: list[kl.KeyLedger] = []

    def _open(principal: str, clk=None) -> kl.KeyLedger:
        led = kl.open(home, principal=principal, clock=clk or clock)
        opened.append(led)
        return led

    yield _open
    for led in reversed(opened):
        led.close()


def _frameworks_of(led: kl.KeyLedger, rule_ids: tuple[str, ...]) -> list[str] | None:
    """The frameworks whose rules include ``rule_ids``: the helpers below evaluate only those (a
    rule's findings do not depend on other frameworks' rules; a full evaluation costs ~5x more).
    None (all) for an id no framework has."""
    rules = load_rules(led.home).rules
    if not all(r in rules for r in rule_ids):
        return None
    return sorted({rules[r].framework for r in rule_ids})


def evaluated(led: kl.KeyLedger, *rule_ids: str, now=None) -> pd.DataFrame:
    """One evaluation of the frameworks of ``rule_ids``: pass it as ``df=`` to several
    ``found``/``one`` checks of the same state (each evaluation costs ~0.1 s of CPU)."""
    df = led.compliance(_frameworks_of(led, rule_ids), now=now)
    assert set(df.columns) >= {"rule_id", "framework", "control", "severity", "title", "key",
                               "version", "principal", "evidence", "remediation", "first_seen",
                               "status"}
    return df


def found(led: kl.KeyLedger, rule_id: str, now=None, df: pd.DataFrame | None = None
          ) -> pd.DataFrame:
    """The findings of ``rule_id``: from ``df`` (an ``evaluated`` frame) or a new evaluation."""
    if df is None:
        df = evaluated(led, rule_id, now=now)
    return df[df["rule_id"] == rule_id].reset_index(drop=True)


def one(led: kl.KeyLedger, rule_id: str, key: str | None = "*", now=None,
        df: pd.DataFrame | None = None) -> tuple[pd.Series, dict]:
    """The single finding of ``rule_id`` (on ``key`` unless "*") and its parsed evidence."""
    df = found(led, rule_id, now, df)
    if key != "*":
        df = df[df["key"].isna()] if key is None else df[df["key"] == key]
    assert len(df) == 1, f"expected one {rule_id} finding on {key}, got:\n{df}"
    row = df.iloc[0]
    return row, json.loads(row["evidence"])


def none_of(led: kl.KeyLedger, *rule_ids: str, now=None) -> None:
    df = led.compliance(_frameworks_of(led, rule_ids), now=now)
    hits = df[df["rule_id"].isin(rule_ids)]
    assert hits.empty, f"unexpected findings:\n{hits[['rule_id', 'key', 'evidence']]}"


def seqs(led: kl.KeyLedger, **filters) -> list[int]:
    return [int(s) for s in led.audit(**filters)["seq"]]


def pem(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def wrap_for_import(params: dict, material: bytes) -> bytes:
    """The client side of BYOK, as docs/byok.md prints it."""
    public_key = serialization.load_pem_public_key(params["public_key_pem"].encode())
    h = hashes.SHA256() if params["oaep_hash"] == "sha256" else hashes.SHA1()
    ephemeral = os.urandom(32)
    head = public_key.encrypt(ephemeral, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
    return head + aes_key_wrap_with_padding(ephemeral, material)


def user_rules(home: Path, name: str, text: str) -> Path:
    folder = home / "rules"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def recipient() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- NIST SP 800-57: cryptoperiods -----------------------------------------------------------
@covers("nist.rotation-overdue", "pci.rotation-overdue")
def test_rotation_overdue(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.create_key("short", spec="AES_256", rotation_period="30d")
    clock.advance(days=91)
    df = evaluated(ledger, "nist.rotation-overdue", "pci.rotation-overdue")
    row, ev = one(ledger, "nist.rotation-overdue", "k", df=df)
    assert (row["version"], row["severity"], row["framework"]) == (1, "high", "NIST SP 800-57")
    assert ev["rotation_period_days"] == 90 and ev["policy_source"] == "default"
    assert ev["days_overdue"] == 1.0 and ev["due_at"].startswith("2026-04-01")
    _, ev = one(ledger, "nist.rotation-overdue", "short", df=df)
    assert ev["policy_source"] == "key" and ev["days_overdue"] == 61.0
    row, _ = one(ledger, "pci.rotation-overdue", "k", df=df)
    assert row["control"] == "3.7.4"


@covers("nist.rotation-overdue", "pci.rotation-overdue")
def test_rotation_on_time_is_no_finding(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.create_key("signer", spec="EC_P256")  # signing keys: 1 year
    clock.advance(days=91)
    ledger.rotate("k")
    none_of(ledger, "nist.rotation-overdue", "pci.rotation-overdue")


@covers("nist.rotation-due-soon")
def test_rotation_due_soon(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    clock.advance(days=80)
    row, ev = one(ledger, "nist.rotation-due-soon", "k")
    assert row["severity"] == "info" and ev["days_left"] == 10.0


@covers("nist.rotation-due-soon")
def test_rotation_not_yet_due_soon(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    clock.advance(days=70)
    none_of(ledger, "nist.rotation-due-soon", "nist.rotation-overdue")


@covers("nist.encrypt-after-oup")
def test_encrypt_after_originator_usage_period(ledger, clock):
    ledger.create_key("k", spec="AES_256", rotation_period="5y")
    clock.advance(days=731)
    ledger.encrypt("k", b"late")
    row, ev = one(ledger, "nist.encrypt-after-oup", "k")
    assert (row["version"], row["principal"]) == (1, "alice")
    assert ev["events"] == 1 and ev["seqs"] == seqs(ledger, action="encrypt")
    assert ev["oup_ended"].startswith("2028-01-01")


@covers("nist.encrypt-after-oup")
def test_encrypt_with_fresh_version_after_oup(ledger, clock):
    ledger.create_key("k", spec="AES_256", rotation_period="5y")
    ledger.encrypt("k", b"in time")
    clock.advance(days=731)
    ledger.rotate("k")
    ledger.encrypt("k", b"new version")
    none_of(ledger, "nist.encrypt-after-oup")


@covers("nist.decrypt-after-rup")
def test_decrypt_after_recipient_usage_period(ledger, clock):
    ledger.create_key("k", spec="AES_256", rotation_period="10y")
    blob = ledger.encrypt("k", b"old data")
    clock.advance(days=730 + 1095 + 1)
    assert ledger.decrypt(blob) == b"old data"
    row, ev = one(ledger, "nist.decrypt-after-rup", "k")
    assert (row["version"], row["severity"]) == (1, "medium")
    assert ev["seqs"] == seqs(ledger, action="decrypt")


@covers("nist.decrypt-after-rup")
def test_decrypt_within_recipient_usage_period(ledger, clock):
    ledger.create_key("k", spec="AES_256", rotation_period="10y")
    blob = ledger.encrypt("k", b"old data")
    clock.advance(days=1800)
    ledger.decrypt(blob)
    none_of(ledger, "nist.decrypt-after-rup")


@covers("nist.usage-limit")
def test_usage_limit_reached(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("k", usage_limit=3)
    for _ in range(3):
        ledger.encrypt("k", b"x")
    row, ev = one(ledger, "nist.usage-limit", "k")
    assert (row["version"], row["severity"]) == (1, "critical")
    assert ev["encryptions"] == 3 and ev["limit"] == 3 and ev["limit_source"] == "key"
    assert ev["still_latest"] is True
    assert ev["last_seqs"] == seqs(ledger, action="encrypt")
    # a home-wide limit applies to keys without their own
    ledger.create_key("h", spec="AES_256")
    ledger.set_policy("*", usage_limit=2)
    ledger.generate_data_key("h")
    ledger.envelope_encrypt("h", b"y")
    _, ev = one(ledger, "nist.usage-limit", "h")
    assert ev["limit_source"] == "home" and ev["encryptions"] == 2


@covers("nist.usage-limit")
def test_usage_limit_rotated_by_run_due(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.set_policy("k", usage_limit=3)
    for _ in range(3):
        ledger.encrypt("k", b"x")
    ledger.create_key("busy", spec="AES_256")  # default limit 2**32: far away
    for _ in range(5):
        ledger.encrypt("busy", b"x")
    clock.advance(minutes=1)
    assert [d["key"] for d in ledger.run_due().done] == ["k"]
    none_of(ledger, "nist.usage-limit")


# -- NIST SP 800-57: key states ----------------------------------------------------------------
@covers("nist.protect-outside-active", "pci.protect-retired-or-compromised")
def test_protect_when_not_active(ledger, clock, open_as):
    """bob's host clock runs two days ahead: his encryptions, made before alice's changes, are
    stamped after them - exactly what an auditor sees when a caller acted on a stale state."""
    ledger.create_key("c", spec="AES_256")
    ledger.create_key("r", spec="AES_256")
    ledger.create_key("s", spec="EC_P256")
    for name in ("c", "r", "s"):
        ledger.grant(name, "bob", "user")
    bob = open_as("bob", lambda: clock.now + timedelta(days=2))
    bob.encrypt("c", b"x")
    bob.generate_data_key("r")
    bob.sign("s", b"m")
    clock.advance(days=1)
    ledger.mark_compromised("c", "key file found on a laptop")
    ledger.rotate("r")
    ledger.disable("s", reason="investigation")
    later = clock.now + timedelta(days=3)
    both = evaluated(ledger, "nist.protect-outside-active", "pci.protect-retired-or-compromised",
                     now=later)
    df = found(ledger, "nist.protect-outside-active", df=both).set_index("key")
    assert sorted(df.index) == ["c", "r", "s"]
    assert set(df["principal"]) == {"bob"} and set(df["version"]) == {1}
    c, r, s = (json.loads(df.loc[k, "evidence"]) for k in ("c", "r", "s"))
    assert c["why"] == ["key was compromised"] and c["actions"] == ["encrypt"]
    assert c["seqs"] == seqs(ledger, action="encrypt", principal="bob")
    assert r["why"][0].startswith("version replaced by v2")
    assert r["seqs"] == seqs(ledger, action="generate_data_key")
    assert s["why"] == ["key was suspended"] and s["actions"] == ["sign"]
    pci = found(ledger, "pci.protect-retired-or-compromised", df=both)
    assert sorted(pci["key"]) == ["c", "r", "s"] and set(pci["severity"]) == {"critical"}


@covers("nist.protect-outside-active", "pci.protect-retired-or-compromised")
def test_protect_only_while_active(ledger, clock):
    """Same instant throughout (a coarse clock): nothing at a transition's instant is flagged."""
    ledger.create_key("k", spec="AES_256")
    ledger.create_key("s", spec="ED25519")
    blob = ledger.encrypt("k", b"v1")
    ledger.rotate("k")
    ledger.encrypt("k", b"v2")
    ledger.decrypt(blob)  # processing with a replaced version is allowed
    ledger.sign("s", b"m")
    ledger.mark_compromised("k", "test")
    with pytest.raises(kl.KeyStateError):
        ledger.encrypt("k", b"refused")  # a refused attempt is not a use
    ledger.rotate("k")
    ledger.encrypt("k", b"v3")
    ledger.disable("s", reason="maintenance")
    ledger.enable("s", reason="back")
    ledger.sign("s", b"m")
    none_of(ledger, "nist.protect-outside-active", "pci.protect-retired-or-compromised",
            now=clock.now + timedelta(days=1))


@covers("nist.state-change-unattributed")
def test_state_change_without_reason(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.disable("k", reason="  ")
    row, ev = one(ledger, "nist.state-change-unattributed", "k")
    assert row["principal"] == "alice" and row["severity"] == "high"
    assert ev["missing"] == ["reason"] and ev["actions"] == ["disable"]
    assert ev["times"] == ["2026-01-01 09:00:00"]


@covers("nist.state-change-unattributed")
def test_state_changes_with_reasons(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.disable("k", reason="maintenance window 42")
    ledger.enable("k")  # the default reasons count
    ledger.rotate("k")
    none_of(ledger, "nist.state-change-unattributed")


@covers("nist.pre-activation-too-long")
def test_pre_activation_too_long(ledger, clock):
    ledger.create_key("p", spec="AES_256", activate=False)
    clock.advance(days=31)
    row, ev = one(ledger, "nist.pre-activation-too-long", "p")
    assert row["severity"] == "low" and ev["days"] == 31.0 and ev["state"] == "pre-activation"


@covers("nist.pre-activation-too-long")
def test_pre_activation_enabled_in_time(ledger, clock):
    ledger.create_key("p", spec="AES_256", activate=False)
    ledger.create_key("q", spec="AES_256", activate=False)
    clock.advance(days=5)
    ledger.enable("p")
    clock.advance(days=20)  # q waits 25 days: within 30
    none_of(ledger, "nist.pre-activation-too-long")


@covers("nist.compromised-not-replaced")
def test_compromised_not_replaced(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.mark_compromised("k", "leaked in a log")
    clock.advance(days=2)
    row, ev = one(ledger, "nist.compromised-not-replaced", "k")
    assert row["principal"] == "alice" and ev["reason"] == "leaked in a log" and ev["days"] == 2.0


@covers("nist.compromised-not-replaced")
def test_compromised_and_rotated(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.mark_compromised("k", "leaked in a log")
    clock.advance(hours=2)
    ledger.rotate("k")
    clock.advance(days=2)
    none_of(ledger, "nist.compromised-not-replaced")


# -- PCI DSS ---------------------------------------------------------------------------------
@covers("pci.key-extractable", "soc2.key-movement")
def test_exportable_key(ledger, clock, recipient):
    ledger.create_key("x", spec="AES_256", exportable=True)
    ledger.export_key("x", pem(recipient))
    df = evaluated(ledger, "pci.key-extractable", "soc2.key-movement")
    row, ev = one(ledger, "pci.key-extractable", "x", df=df)
    assert row["severity"] == "critical" and row["control"] == "3.6.1 / 3.6.1.2"
    assert ev["exportable"] is True and ev["exports"] == 1
    assert ev["export_seqs"] == seqs(ledger, action="export_key")
    row, _ = one(ledger, "soc2.key-movement", "x", df=df)
    assert (row["framework"], row["control"], row["severity"]) == ("SOC 2", "CC6.7", "high")


@covers("pci.key-extractable", "soc2.key-movement")
def test_non_exportable_keys(ledger, clock):
    ledger.create_key("x", spec="AES_256")
    ledger.create_key("s", spec="RSA_2048")
    none_of(ledger, "pci.key-extractable", "soc2.key-movement")


@covers("pci.dual-control")
def test_destroy_and_export_without_dual_control(ledger, clock, recipient):
    ledger.create_key("d", spec="AES_256")
    ledger.create_key("x", spec="AES_256", exportable=True)
    ledger.schedule_deletion("d", days=7)
    clock.advance(days=8)
    ledger.destroy("d")  # home quorum 1: one person alone
    ledger.export_key("x", pem(recipient))
    df = evaluated(ledger, "pci.dual-control")
    row, ev = one(ledger, "pci.dual-control", "d", df=df)
    assert (row["principal"], row["severity"], pd.isna(row["version"])) == ("alice", "high", True)
    [event] = ev["events"]
    assert event["action"] == "destroy" and event["approvers"] == 0
    assert event["seq"] == seqs(ledger, action="destroy")[0]
    row, ev = one(ledger, "pci.dual-control", "x", df=df)
    assert row["version"] == 1 and ev["events"][0]["action"] == "export"
    assert ev["events"][0]["seq"] == seqs(ledger, action="export_key")[0]
    assert ev["required_approvers"] == 2


@covers("pci.dual-control")
def test_destroy_and_export_with_two_approvers(ledger, clock, open_as, recipient):
    ledger.grant("*", "bea", "admin")
    ledger.set_policy("*", quorum=2)
    bea = open_as("bea")
    ledger.create_key("d", spec="AES_256")
    ledger.create_key("x", spec="AES_256", exportable=True)
    ledger.schedule_deletion("d", days=7)
    clock.advance(days=8)
    rid = ledger.request("destroy", "d", "service decommissioned")
    assert bea.approve(rid)["executed"]
    rid = ledger.request("export_key", "x", "escrow copy", wrapping_key_pem=pem(recipient))
    assert bea.approve(rid)["executed"]
    ledger.export_key("x", pem(recipient))  # delivery of the approved export
    assert ledger.get_key("d").state is kl.KeyState.DESTROYED
    none_of(ledger, "pci.dual-control")


def test_approved_export_with_a_long_reason_is_recognised(ledger, clock, open_as, recipient):
    ledger.grant("*", "bea", "admin")
    ledger.set_policy("*", quorum=2)
    bea = open_as("bea")
    ledger.create_key("x", spec="AES_256", exportable=True)
    reason = "escrow copy for the disaster-recovery vault, ticket DR-2026-0142; " * 5
    rid = ledger.request("export_key", "x", reason, wrapping_key_pem=pem(recipient))
    assert bea.approve(rid)["executed"]
    none_of(ledger, "pci.dual-control")


@covers("pci.unapproved-substitution")
def test_import_without_approved_request(ledger, clock):
    params = ledger.import_parameters("byok")
    ledger.import_key("byok", spec="AES_256", wrapped=wrap_for_import(params, os.urandom(32)),
                      token=params["token"])
    df = evaluated(ledger, "pci.unapproved-substitution", "pci.dual-control")
    row, ev = one(ledger, "pci.unapproved-substitution", "byok", df=df)
    assert (row["version"], row["principal"], row["control"]) == (1, "alice", "3.7.7")
    assert ev["request_id"] is None and ev["seq"] == seqs(ledger, action="import_key")[0]
    _, ev = one(ledger, "pci.dual-control", "byok", df=df)
    assert ev["events"][0]["action"] == "import"


@covers("pci.unapproved-substitution")
def test_import_through_an_approved_request_is_no_finding(ledger, clock, open_as):
    ledger.grant("*", "bea", "admin")
    ledger.set_policy("*", quorum=2)
    bea = open_as("bea")
    params = ledger.import_parameters("byok")
    wrapped = wrap_for_import(params, os.urandom(32))
    rid = ledger.request("import_key", "byok", "customer key ceremony", spec="AES_256",
                         wrapped=wrapped.hex(), token=params["token"])
    assert bea.approve(rid)["executed"]
    ledger.create_key("k", spec="AES_256")
    ledger.rotate("k")  # new HSM-generated material is not a substitution
    assert ledger.get_key("byok").latest_version == 1
    none_of(ledger, "pci.unapproved-substitution", "pci.dual-control")


@covers("pci.custodian-acknowledgement")
def test_custodian_without_acknowledgement(ledger, clock, open_as):
    ledger.create_key("k", spec="AES_256")
    ledger.grant("k", "kim", "admin")  # a per-key admin is a custodian too
    ledger.acknowledge_custody()
    row, ev = one(ledger, "pci.custodian-acknowledgement", None)
    assert row["principal"] == "kim" and ev["admin_of"] == ["k"]
    assert ev["last_acknowledgement"] is None
    clock.advance(days=366)  # acknowledgements are renewed yearly
    df = found(ledger, "pci.custodian-acknowledgement")
    assert sorted(df["principal"]) == ["alice", "kim"]
    alice = json.loads(df[df["principal"] == "alice"]["evidence"].iloc[0])
    assert alice["last_acknowledgement"] == "2026-01-01 09:00:00"


@covers("pci.custodian-acknowledgement")
def test_custodians_acknowledged(ledger, clock, open_as):
    ledger.create_key("k", spec="AES_256")
    ledger.grant("k", "kim", "admin")
    ledger.acknowledge_custody()
    open_as("kim").acknowledge_custody()
    none_of(ledger, "pci.custodian-acknowledgement")


# -- ISO/IEC 27001:2022 A.8.24 ------------------------------------------------------------------
@covers("iso.owner-missing")
def test_owner_missing(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    row, ev = one(ledger, "iso.owner-missing", "k")
    assert row["control"] == "A.8.24" and ev["spec"] == "AES_256"


@covers("iso.owner-missing")
def test_owner_set(ledger, clock):
    ledger.create_key("k", spec="AES_256", owner="payments")
    ledger.create_key("j", spec="AES_256")
    ledger.set_policy("j", owner="identity")
    none_of(ledger, "iso.owner-missing")


@covers("iso.purpose-missing")
def test_purpose_not_allowed(ledger, clock, home):
    """An empty or unknown purpose cannot be stored through the API (validated, NOT NULL); the
    organisation's list of allowed purposes is a parameter, so a disallowed one is the gap."""
    user_rules(home, "org.toml", """
        [overrides."iso.purpose-missing"]
        parameters = { purposes = ["encrypt", "sign", "mac"] }
    """)
    ledger.create_key("w", spec="AES_256", purpose="wrap")
    row, ev = one(ledger, "iso.purpose-missing", "w")
    assert ev["purpose"] == "wrap" and ev["allowed"] == ["encrypt", "sign", "mac"]


@covers("iso.purpose-missing")
def test_purposes_allowed(ledger, clock):
    for name, spec, purpose in (("e", "AES_256", None), ("w", "AES_256", "wrap"),
                                ("m", "HMAC_SHA256", None), ("s", "EC_P384", None)):
        ledger.create_key(name, spec=spec, purpose=purpose)
    none_of(ledger, "iso.purpose-missing")


@covers("iso.lifecycle-policy-missing")
def test_lifecycle_policy_missing(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    _, ev = one(ledger, "iso.lifecycle-policy-missing", "k")
    assert ev["policy_source"] == "default" and ev["rotation_period_days"] == 90


@covers("iso.lifecycle-policy-missing")
def test_lifecycle_policy_defined(ledger, clock):
    ledger.create_key("own", spec="AES_256", rotation_period="60d")
    ledger.create_key("tagged", spec="EC_P256", tags={"env": "prod"})
    ledger.create_key("home", spec="AES_256")
    ledger.set_policy("*", rotation_by_purpose={"encrypt": "60d"},
                      rotation_by_tag={"env=prod": "180d"})
    none_of(ledger, "iso.lifecycle-policy-missing")


@covers("iso.algorithm-not-approved")
def test_algorithm_not_on_the_approved_list(ledger, clock, home):
    user_rules(home, "crypto-policy.toml", """
        [overrides."iso.algorithm-not-approved"]
        parameters = { approved_specs = ["AES_256", "RSA_3072", "RSA_4096", "EC_P384"] }
    """)
    ledger.create_key("old-rsa", spec="RSA_2048")
    ledger.create_key("aes", spec="AES_256")
    row, ev = one(ledger, "iso.algorithm-not-approved", "old-rsa")
    assert ev["spec"] == "RSA_2048"
    assert "RSA_2048" not in ev["approved"]
    assert "overridden in" in load_rules(home).rules["iso.algorithm-not-approved"].source


@covers("iso.algorithm-not-approved")
def test_algorithms_on_the_default_list(ledger, clock):
    for spec in kl.SPECS:
        ledger.create_key(spec.lower().replace("_", "-"), spec=spec)
    none_of(ledger, "iso.algorithm-not-approved")


@covers("iso.lifecycle-event-not-audited")
def test_transition_without_audit_record(ledger, clock):
    """Direct write: every transition the API makes is audited (that is the point), so the gap
    - a crash between the two writes, or a change made outside keyledger - is simulated."""
    key = ledger.create_key("k", spec="AES_256")
    with ledger._rt.db.write() as tx:
        tx.execute("INSERT INTO transitions VALUES (?, ?, NULL, 'disable', 'active', 'suspended',"
                   " 'mallory', 'quietly')", [clock.now.replace(tzinfo=None), key.key_id])
    row, ev = one(ledger, "iso.lifecycle-event-not-audited", "k")
    assert row["principal"] == "mallory" and ev["transitions"] == 1
    assert ev["missing"][0]["action"] == "disable"


@covers("iso.lifecycle-event-not-audited")
def test_every_lifecycle_event_audited(ledger, clock, open_as):
    ledger.grant("*", "bea", "admin")
    bea = open_as("bea")
    ledger.create_key("k", spec="AES_256", activate=False)
    ledger.enable("k")
    ledger.disable("k")
    ledger.enable("k")
    ledger.rotate("k")
    ledger.deactivate("k")
    ledger.rotate("k")
    ledger.mark_compromised("k", "test")
    ledger.schedule_deletion("k", days=7)
    ledger.cancel_deletion("k")
    ledger.schedule_deletion("k", days=7)
    ledger.create_key("old", spec="AES_256", rotation_period="1d")
    params = ledger.import_parameters("byok")
    ledger.import_key("byok", spec="AES_256", wrapped=wrap_for_import(params, os.urandom(32)),
                      token=params["token"])
    clock.advance(days=8)
    ledger.set_policy("old", auto_rotate=True)
    ledger.run_due()  # rotates "old", destroys "k" (quorum 1)
    ledger.set_policy("*", quorum=2)
    ledger.create_key("q", spec="AES_256")
    ledger.schedule_deletion("q", days=7)
    clock.advance(days=8)
    assert bea.approve(ledger.request("destroy", "q", "done"))["executed"]
    assert ledger.get_key("k").state is kl.KeyState.DESTROYED
    none_of(ledger, "iso.lifecycle-event-not-audited")


@covers("iso.lifecycle-event-not-audited")
def test_destroy_completed_after_a_crash_is_audited_by_the_open(home, clock):
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("k", spec="AES_256")
        led.schedule_deletion("k", days=7)
    later = clock.advance(days=8)
    child = run_python(textwrap.dedent(f"""
        from datetime import datetime
        import keyledger as kl
        now = datetime.fromisoformat({later.isoformat()!r})
        kl.open({str(home)!r}, principal="alice", clock=lambda: now).destroy("k")
    """), env={"KEYLEDGER_FAULT": "destroy:after_first_object"})
    assert child.returncode != 0  # killed mid-destroy: no audit record of the destroy call
    clock.advance(seconds=30)
    with kl.open(home, principal="alice", clock=clock) as led:
        assert "interrupted destruction" in str(led.last_reconcile)
        assert led.get_key("k").state is kl.KeyState.DESTROYED
        none_of(led, "iso.lifecycle-event-not-audited")


# -- HIPAA ----------------------------------------------------------------------------------------
@covers("hipaa.phi-without-encryption")
def test_phi_asset_without_active_encryption_key(ledger, clock):
    ledger.create_key("ehr-data", spec="AES_256", tags={"data": "phi", "asset": "ehr"})
    ledger.create_key("ehr-audit", spec="EC_P256", tags={"asset": "ehr"})
    ledger.create_key("labs", spec="AES_256", tags={"phi": "true"})
    ledger.disable("ehr-data", reason="maintenance")
    ledger.mark_compromised("labs", "exposed")
    df = found(ledger, "hipaa.phi-without-encryption").set_index("key")
    assert sorted(df.index) == ["ehr-data", "labs"]  # the first phi key of each asset
    ehr = json.loads(df.loc["ehr-data", "evidence"])
    assert ehr["asset"] == "ehr"
    assert ehr["keys"] == [{"key": "ehr-audit", "state": "active", "purpose": "sign"},
                           {"key": "ehr-data", "state": "suspended", "purpose": "encrypt"}]
    assert json.loads(df.loc["labs", "evidence"])["asset"] == "labs"


@covers("hipaa.phi-without-encryption")
def test_phi_assets_encrypted(ledger, clock):
    ledger.create_key("ehr-data", spec="AES_256", tags={"data": "phi", "asset": "ehr"})
    ledger.create_key("ehr-next", spec="AES_256", tags={"asset": "ehr"})
    ledger.disable("ehr-data", reason="moved to ehr-next")
    ledger.create_key("no-phi", spec="AES_256", tags={"phi": "false"})
    ledger.disable("no-phi", reason="unused")
    ledger.create_key("gone", spec="AES_256", tags={"phi": "yes"})
    ledger.schedule_deletion("gone", days=7)  # crypto-shredded once destroyed
    clock.advance(days=8)
    ledger.destroy("gone")
    none_of(ledger, "hipaa.phi-without-encryption")


@covers("hipaa.addressable-unjustified")
def test_addressable_decision_without_justification(ledger, clock):
    ledger.create_key("fax", spec="HMAC_SHA256", tags={"phi": "true"})
    ledger.accept_finding("hipaa.phi-without-encryption", "fax", "n/a", "90d")
    none_of(ledger, "hipaa.phi-without-encryption")
    row, ev = one(ledger, "hipaa.addressable-unjustified", "fax")
    assert row["principal"] == "alice" and ev["reason"] == "n/a"
    assert ev["rule_id"] == "hipaa.phi-without-encryption"


@covers("hipaa.addressable-unjustified")
def test_addressable_decision_justified(ledger, clock):
    ledger.create_key("fax", spec="HMAC_SHA256", tags={"phi": "true"})
    ledger.accept_finding("hipaa.phi-without-encryption", "fax",
                          "fax gateway only authenticates; ePHI is encrypted by the gateway "
                          "vendor's HSM (contract 2026-17), reviewed quarterly", "90d")
    none_of(ledger, "hipaa.addressable-unjustified", "hipaa.phi-without-encryption")


# -- GDPR -----------------------------------------------------------------------------------------
@covers("gdpr.backup-missing", "gdpr.restore-test-missing")
def test_backup_and_restore_test_of_personal_data_keys(ledger, clock, tmp_path):
    ledger.create_key("pd", spec="AES_256", tags={"personal-data": "yes"})
    ledger.create_key("other", spec="AES_256")
    df = evaluated(ledger, "gdpr.backup-missing", "gdpr.restore-test-missing")
    row, ev = one(ledger, "gdpr.backup-missing", "pd", df=df)
    assert ev["why"] == "no successful backup recorded" and row["control"] == "Art. 32(1)(c)"
    _, ev = one(ledger, "gdpr.restore-test-missing", "pd", df=df)
    assert ev["last_restore_test"] is None
    clock.advance(hours=1)
    first = tmp_path / "first.klbk"
    ledger.backup(first, passphrase=PASS)
    none_of(ledger, "gdpr.backup-missing")
    clock.advance(days=1)
    ledger.rotate("pd")  # the new version is in no backup
    _, ev = one(ledger, "gdpr.backup-missing", "pd")
    assert ev["why"] == "the last backup predates the newest version"
    clock.advance(hours=1)
    second = tmp_path / "second.klbk"
    ledger.backup(second, passphrase=PASS)
    ledger.restore_test(first, passphrase=PASS)  # an old backup does not cover v2
    one(ledger, "gdpr.restore-test-missing", "pd")
    assert ledger.restore_test(second, passphrase=PASS).ok
    none_of(ledger, "gdpr.backup-missing", "gdpr.restore-test-missing")
    clock.advance(days=181)  # both outside the window again
    df = evaluated(ledger, "gdpr.backup-missing", "gdpr.restore-test-missing")
    _, ev = one(ledger, "gdpr.backup-missing", "pd", df=df)
    assert ev["why"] == "the last backup is older than the window"
    one(ledger, "gdpr.restore-test-missing", "pd", df=df)


@covers("gdpr.controls-not-evaluated")
def test_controls_not_evaluated(ledger, clock):
    ledger.create_key("pd", spec="AES_256", tags={"personal-data": "yes"})
    ledger.compliance(frameworks=["pci"])  # does not evaluate GDPR
    clock.advance(days=181)
    row, ev = one(ledger, "gdpr.controls-not-evaluated", None)
    assert row["severity"] == "medium" and ev["previous_evaluation"] is None
    assert ev["personal_data_keys"] == 1
    clock.advance(days=181)  # the evaluation just made is 181 days old now
    _, ev = one(ledger, "gdpr.controls-not-evaluated", None)
    assert ev["previous_evaluation"] == "2026-07-01 09:00:00"


@covers("gdpr.controls-not-evaluated")
def test_controls_evaluated_regularly(ledger, clock):
    ledger.create_key("pd", spec="AES_256", tags={"personal-data": "yes"})
    clock.advance(days=100)
    ledger.compliance(frameworks="GDPR")
    clock.advance(days=81)
    none_of(ledger, "gdpr.controls-not-evaluated")


# -- SOC 2 / CIS ----------------------------------------------------------------------------------
@covers("soc2.separation-of-duties", "cis.separation-of-duties")
def test_admin_who_is_also_user(ledger, clock):
    ledger.create_key("k", spec="AES_256")  # the creator becomes its user by default
    df = evaluated(ledger, "soc2.separation-of-duties", "cis.separation-of-duties")
    row, ev = one(ledger, "soc2.separation-of-duties", "k", df=df)
    assert row["principal"] == "alice"
    assert ev["key_grants"] == ["alice:user"] and ev["home_wide_grants"] == ["alice:admin"]
    row, _ = one(ledger, "cis.separation-of-duties", "k", df=df)
    assert row["control"] == "GCP 1.11"
    ledger.grant("*", "alice", "user")  # both home-wide: one finding for the whole home
    df = evaluated(ledger, "soc2.separation-of-duties")
    row, ev = one(ledger, "soc2.separation-of-duties", None, df=df)
    assert row["principal"] == "alice" and ev["home_wide_grants"] == ["alice:admin", "alice:user"]
    assert found(ledger, "soc2.separation-of-duties", df=df)["key"].isna().all()


@covers("soc2.separation-of-duties", "cis.separation-of-duties")
def test_separated_duties(ledger, clock):
    ledger.set_policy("*", creator_is_user=False)
    ledger.create_key("k", spec="AES_256")
    ledger.grant("k", "svc-payments", "user")
    ledger.grant("*", "aud", "auditor")
    none_of(ledger, "soc2.separation-of-duties", "cis.separation-of-duties")


@covers("soc2.wildcard-grant")
def test_wildcard_grants(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.grant("k", "*", "user")
    ledger.grant("*", "*", "auditor")
    df = found(ledger, "soc2.wildcard-grant")
    assert len(df) == 2 and set(df["principal"]) == {"*"}
    on_key = json.loads(df[df["key"] == "k"]["evidence"].iloc[0])
    assert on_key["role"] == "user" and on_key["granted_by"] == "alice"
    assert json.loads(df[df["key"].isna()]["evidence"].iloc[0])["role"] == "auditor"


@covers("soc2.wildcard-grant")
def test_named_grants_only(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.grant("k", "bob", "user")
    none_of(ledger, "soc2.wildcard-grant")


@covers("soc2.audit-verification", "cis.audit-log-validation")
def test_audit_verification_missing_or_failing(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    df = evaluated(ledger, "soc2.audit-verification", "cis.audit-log-validation")
    row, ev = one(ledger, "soc2.audit-verification", None, df=df)
    assert row["severity"] == "critical" and ev["last_verification"] is None
    one(ledger, "cis.audit-log-validation", None, df=df)
    assert ledger.verify_audit().ok
    clock.advance(days=8)  # stale
    _, ev = one(ledger, "soc2.audit-verification", None)
    assert ev["passed"] is True and ev["last_verification"] == "2026-01-01 09:00:00"
    ledger.flush_audit()
    with ledger._rt.db.write() as tx:  # direct write: tampering is not an API operation
        tx.execute("UPDATE audit_log SET principal = 'mallory' WHERE seq = 2")
    report = ledger.verify_audit()
    assert not report.ok
    _, ev = one(ledger, "soc2.audit-verification", None)
    assert ev["passed"] is False and ev["first_bad_seq"] == 2 and ev["problem"]


@covers("soc2.audit-verification", "cis.audit-log-validation")
def test_audit_verified_recently(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    clock.advance(days=30)
    assert ledger.verify_audit().ok
    clock.advance(days=6)
    none_of(ledger, "soc2.audit-verification", "cis.audit-log-validation")


@covers("cis.symmetric-rotation")
def test_symmetric_key_rotation_too_slow(ledger, clock):
    ledger.create_key("slow", spec="AES_256", rotation_period="180d")
    ledger.create_key("manual", spec="HMAC_SHA256")
    ledger.set_policy("manual", auto_rotate=False)
    df = found(ledger, "cis.symmetric-rotation").set_index("key")
    assert sorted(df.index) == ["manual", "slow"]
    assert json.loads(df.loc["slow", "evidence"])["rotation_period_days"] == 180
    assert json.loads(df.loc["manual", "evidence"])["auto_rotate"] is False


@covers("cis.symmetric-rotation")
def test_symmetric_keys_rotated_within_90_days(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    ledger.create_key("m", spec="HMAC_SHA256", rotation_period="30d")
    ledger.create_key("s", spec="RSA_3072")  # asymmetric: not in scope
    none_of(ledger, "cis.symmetric-rotation")


@covers("cis.stale-key")
def test_stale_key(ledger, clock):
    ledger.create_key("k", spec="AES_256", rotation_period="1y")
    ledger.encrypt("k", b"x")
    ledger.create_key("never", spec="EC_P256")
    clock.advance(days=181)
    df = found(ledger, "cis.stale-key").set_index("key")
    assert sorted(df.index) == ["k", "never"]
    k = json.loads(df.loc["k", "evidence"])
    assert k["last_used"] == "2026-01-01 09:00:00" and k["uses"] == 1 and k["days_unused"] == 181.0
    assert json.loads(df.loc["never", "evidence"])["uses"] == 0


@covers("cis.stale-key")
def test_keys_in_use(ledger, clock):
    ledger.create_key("k", spec="AES_256", rotation_period="1y")
    ledger.create_key("s", spec="EC_P256")
    clock.advance(days=170)
    ledger.encrypt("k", b"x")
    ledger.verify("s", b"m", ledger.sign("s", b"m"))
    ledger.create_key("off", spec="AES_256")
    ledger.disable("off", reason="kept for recovery")  # disabled keys are not stale-active
    clock.advance(days=11)
    none_of(ledger, "cis.stale-key")


def test_every_shipped_rule_has_fleets():
    assert set(load_rules().rules) == COVERED


# -- exceptions, history, trend ----------------------------------------------------------------
def test_accepted_exception_hides_until_expiry_and_is_reported(ledger, clock, tmp_path):
    ledger.create_key("k", spec="AES_256")
    ledger.create_key("j", spec="AES_256")
    exc = ledger.accept_finding("iso.owner-missing", "k", "owned by the platform team until the "
                                "CMDB import lands", "30d")
    assert exc["until"] == clock.now + timedelta(days=30) and exc["framework"] == \
        "ISO/IEC 27001:2022"
    df = ledger.compliance()
    assert df[df["rule_id"] == "iso.owner-missing"]["key"].tolist() == ["j"]
    hidden = ledger.compliance(include_accepted=True)
    mine = hidden[(hidden["rule_id"] == "iso.owner-missing") & (hidden["key"] == "k")]
    assert mine["status"].tolist() == ["accepted"]
    audit = ledger.audit(action="accept_finding")
    assert audit["outcome"].tolist() == ["ok"] and audit["key"].tolist() == ["k"]
    assert "iso.owner-missing" in audit["detail"].iloc[0]

    html = ledger.compliance_report(tmp_path / "r.html").read_text()
    section = re.search(r'<section id="exceptions".*?</section>', html, re.S).group(0)
    assert 'data-count="1"' in section and "CMDB import" in section
    assert re.search(r'data-status="active".*?<td class=\'n\'>1</td>', section, re.S)
    assert "2026-01-31 09:00 UTC" in section

    clock.advance(days=30)  # expired: the finding is back, the report says so
    df = ledger.compliance()
    assert sorted(df[df["rule_id"] == "iso.owner-missing"]["key"]) == ["j", "k"]
    assert not ledger.compliance_exceptions()["active"].any()
    html = ledger.compliance_report(tmp_path / "r2.html").read_text()
    assert 'data-status="expired"' in html


def test_accept_finding_is_checked_and_needs_admin(ledger, clock, open_as):
    ledger.create_key("k", spec="AES_256")
    with pytest.raises(kl.InvalidInput, match="unknown rule"):
        ledger.accept_finding("no.such-rule", "k", "because", "30d")
    with pytest.raises(kl.InvalidInput, match="reason"):
        ledger.accept_finding("iso.owner-missing", "k", " ", "30d")
    with pytest.raises(kl.PolicyViolation, match="at most 366 days"):
        ledger.accept_finding("iso.owner-missing", "k", "because", "2y")
    with pytest.raises(kl.InvalidInput, match="future"):
        ledger.accept_finding("iso.owner-missing", "k", "because", clock.now - timedelta(1))
    with pytest.raises(kl.KeyNotFound):
        ledger.accept_finding("iso.owner-missing", "nope", "because", "30d")
    ledger.grant("*", "aud", "auditor")
    aud = open_as("aud")
    with pytest.raises(kl.AccessDenied):
        aud.accept_finding("iso.owner-missing", "k", "because", "30d")
    assert not aud.compliance().empty  # auditors evaluate and read
    ledger.grant("k", "usr", "user")
    with pytest.raises(kl.AccessDenied):
        open_as("usr").compliance()
    audit = ledger.audit(action="accept_finding")
    assert audit["outcome"].tolist() == ["failed"] * 5 + ["denied"]
    assert ledger.audit(action="compliance", principal="usr")["outcome"].tolist() == ["denied"]
    assert ledger.compliance_exceptions().empty


def test_history_and_trend(ledger, clock):
    ledger.set_policy("*", rotation_by_purpose={"encrypt": "90d"})  # only owners are missing

    def owners_missing() -> pd.DataFrame:  # every framework evaluated: the trend counts them all
        df = ledger.compliance()
        return df[df["rule_id"] == "iso.owner-missing"].reset_index(drop=True)

    ledger.create_key("a", spec="AES_256")
    ledger.create_key("b", spec="AES_256")
    first = owners_missing()
    assert set(first["status"]) == {"new"} and len(first) == 2
    clock.advance(days=10)
    ledger.set_policy("a", owner="team-a")
    second = owners_missing()
    assert second["key"].tolist() == ["b"] and second["status"].tolist() == ["open"]
    assert second["first_seen"].iloc[0] == pd.Timestamp("2026-01-01 09:00", tz="UTC")
    clock.advance(days=5)
    ledger.create_key("c", spec="AES_256")
    owners_missing()
    ledger.accept_finding("iso.owner-missing", "c", "owner assigned in the next sprint", "14d")
    owners_missing()

    trend = ledger.compliance_trend(frameworks="iso")
    assert set(trend["framework"]) == {"ISO/IEC 27001:2022"}
    med = trend[trend["severity"] == "medium"].reset_index(drop=True)
    assert med["open"].tolist() == [2, 1, 2, 1]
    assert med["opened"].tolist() == [2, 0, 1, 0]
    assert med["resolved"].tolist() == [0, 1, 0, 0]
    assert med["accepted"].tolist() == [0, 0, 0, 1]
    assert med["max_open_days"].tolist() == [0.0, 10.0, 15.0, 15.0]
    assert med["mean_open_days"].tolist() == [0.0, 10.0, 7.5, 15.0]
    assert (med["time"].diff().dropna() >= pd.Timedelta(0)).all()
    everything = ledger.compliance_trend()
    assert len(everything) == 4 * 7 * 5  # runs x frameworks x severities, zeros kept
    with pytest.raises(kl.InvalidInput, match="unknown framework"):
        ledger.compliance_trend(frameworks="fips")


def test_frameworks_filter(ledger, clock):
    ledger.create_key("k", spec="AES_256")
    df = ledger.compliance(frameworks=["PCI DSS v4.0", "soc2"])
    assert set(df["framework"]) == {"PCI DSS v4.0", "SOC 2"}
    assert set(ledger.compliance(frameworks="nist")["framework"]) <= {"NIST SP 800-57"}
    with pytest.raises(kl.InvalidInput, match="unknown framework 'fips'.*PCI DSS"):
        ledger.compliance(frameworks=["pci", "fips"])
    with pytest.raises(kl.InvalidInput, match="timezone-aware"):
        ledger.compliance(now=clock.now.replace(tzinfo=None))


# -- rules as data -----------------------------------------------------------------------------
def test_user_rules_add_a_framework_and_override_rules(ledger, clock, home):
    user_rules(home, "acme.toml", """
        framework = "ACME key standard"
        aliases = ["acme"]
        description = "Internal standard KS-1."

        [[rule]]
        id = "acme.team-tag"
        control = "KS-1.4"
        severity = "low"
        title = "Key without a team tag"
        rationale = "Every key names the team that runs it."
        remediation = "set_tags(name, {'team': ...})"
        parameters = { tag = "team" }
        sql = \"\"\"
        SELECT name AS key, NULL AS version, NULL AS principal,
               {'tags': tags} AS evidence
        FROM keys WHERE state <> 'destroyed' AND kl_tag(tags, $tag) IS NULL
        \"\"\"

        [[rule]]
        id = "acme.rotation"
        control = "KS-2"
        severity = "medium"
        title = "Rotation beyond 30 days"
        rationale = "ACME rotates monthly."
        remediation = "Rotate."
        check_from = "nist.rotation-overdue"

        [overrides."nist.rotation-overdue"]
        parameters = { grace_days = 5 }
        severity = "critical"
    """)
    user_rules(home, "zz-replace.toml", """
        framework = "NIST SP 800-57"

        [[rule]]
        id = "nist.pre-activation-too-long"
        control = "local"
        severity = "medium"
        title = "Pre-activation over a week"
        rationale = "Stricter local rule."
        remediation = "Enable or delete."
        parameters = { max_days = 7 }
        sql = \"\"\"
        SELECT name AS key, NULL AS version, NULL AS principal, {'state': state} AS evidence
        FROM keys WHERE state = 'pre-activation' AND created_at < $now - to_days($max_days)
        \"\"\"
    """)
    ledger.create_key("k", spec="AES_256", tags={"team": "pay"})
    ledger.create_key("untagged", spec="AES_256", activate=False)
    clock.advance(days=93)
    df = ledger.compliance()
    assert df[df["rule_id"] == "acme.team-tag"]["key"].tolist() == ["untagged"]
    acme = df[df["framework"] == "ACME key standard"]
    assert set(acme["rule_id"]) == {"acme.team-tag"}  # 93 < 90 + 5 grace days
    row, _ = one(ledger, "nist.pre-activation-too-long", "untagged")
    assert (row["severity"], row["control"]) == ("medium", "local")
    clock.advance(days=3)
    df = evaluated(ledger, "nist.rotation-overdue", "acme.rotation")
    row, ev = one(ledger, "nist.rotation-overdue", "k", df=df)
    assert row["severity"] == "critical" and ev["days_overdue"] == 6.0
    row, _ = one(ledger, "acme.rotation", "k", df=df)  # reuses the check with its parameters
    assert row["severity"] == "medium"
    rules = ledger.compliance_rules().set_index("rule_id")
    assert rules.loc["acme.rotation", "check_from"] == "nist.rotation-overdue"
    assert rules.loc["nist.rotation-overdue", "parameters"] == {"grace_days": 5}
    assert rules.loc["nist.pre-activation-too-long", "source"].endswith("zz-replace.toml")
    assert set(ledger.compliance(frameworks="acme")["framework"]) == {"ACME key standard"}


GOOD_RULE = """
    [[rule]]
    id = "acme.x"
    control = "1"
    severity = "low"
    title = "t"
    rationale = "r"
    remediation = "m"
    sql = "SELECT name AS key, NULL AS version, NULL AS principal, '{}' AS evidence FROM keys"
"""


@pytest.mark.parametrize(("text", "message"), [
    ('framework = "A"\n[[rule]\nid = "x"', "not valid TOML"),
    ('framework = "A"\n' + GOOD_RULE.replace('severity = "low"', 'severity = "urgent"'),
     "severity must be one of"),
    ('framework = "A"\n' + GOOD_RULE.replace('title = "t"', ""), "title must be"),
    ('framework = "A"\n' + GOOD_RULE.replace('control = "1"', 'control = "1"\nserverity = 1'),
     "unknown setting.*serverity"),
    ('framework = "A"\n' + GOOD_RULE.replace("SELECT name", "DELETE FROM keys; SELECT name"),
     "exactly one SELECT"),
    ('framework = "A"\n' + GOOD_RULE.replace("FROM keys", "FROM keys WHERE 1 < $limit"),
     r"uses \$limit but the rule declares no such parameter"),
    ('framework = "A"\n' + GOOD_RULE.replace("SELECT name", "SELEKT name"), "does not parse"),
    ('framework = "A"\n' + GOOD_RULE + GOOD_RULE, "appears twice"),
    ('framework = "A"\n' + GOOD_RULE.replace("sql =", 'check_from = "nope"\nsql ='),
     "either sql"),
    ('framework = "A"\n' + GOOD_RULE.replace("sql =", "check_from = \"no.such\"\n#"),
     "check_from names 'no.such'"),
    ('[overrides."no.such-rule"]\nseverity = "low"', "no rule has that id"),
    ('[overrides."nist.usage-limit"]\nparameters = { default_limit = "big" }',
     "must stay a number"),
    ('[overrides."nist.usage-limit"]\nparameters = { limt = 5 }', "has no parameter 'limt'"),
    (GOOD_RULE, "set framework"),
])
def test_malformed_rule_file_names_the_file_and_the_rule(ledger, home, text, message):
    path = user_rules(home, "broken.toml", text)
    with pytest.raises(kl.ConfigError, match=message) as err:
        ledger.compliance()
    assert str(path) in str(err.value)
    if "[[rule]]" in text and "not valid TOML" not in message:
        assert "acme.x" in str(err.value) or "no.such" in str(err.value)
    if "overrides" in text:
        assert re.search(r"rule '(no\.such-rule|nist\.usage-limit)'", str(err.value))
    assert ledger.audit(action="compliance")["outcome"].tolist() == ["failed"]


def test_a_rule_file_that_is_not_utf8_is_a_config_error_and_a_fixed_one_loads(ledger, home):
    """Was a bare UnicodeDecodeError; and a file changed in place is read again (rule files
    are parsed once per content)."""
    path = user_rules(home, "latin1.toml", "")
    path.write_bytes('framework = "Café"\n'.encode("latin-1"))
    with pytest.raises(kl.ConfigError, match="not valid TOML.*UTF-8") as err:
        ledger.compliance()
    assert str(path) in str(err.value)
    path.write_bytes('framework = "Café"\n'.encode())
    ledger.compliance()  # evaluates again
    assert "Café" in load_rules(home).frameworks


def test_rule_with_wrong_output_is_a_config_error(ledger, home):
    user_rules(home, "bad-columns.toml", """
        framework = "A"
        [[rule]]
        id = "a.cols"
        control = "1"
        severity = "low"
        title = "t"
        rationale = "r"
        remediation = "m"
        sql = "SELECT name FROM keys"
    """)
    ledger.create_key("k", spec="AES_256")
    with pytest.raises(kl.ConfigError, match=r"rule 'a.cols'.*no column\(s\) key, version, "
                       "principal, evidence"):
        ledger.compliance()
    user_rules(home, "bad-columns.toml", """
        framework = "A"
        [[rule]]
        id = "a.cols"
        control = "1"
        severity = "low"
        title = "t"
        rationale = "r"
        remediation = "m"
        sql = "SELECT name AS key, 1 AS version, NULL AS principal, 'not json' AS evidence FROM nokeys"
    """)
    with pytest.raises(kl.ConfigError, match="rule 'a.cols' failed: Catalog Error"):
        ledger.compliance()


@pytest.mark.parametrize("ending", ["; ", "\n-- the end of the check", ";\n-- done\n"])
def test_a_rule_sql_ending_in_a_comment_or_semicolon_finds_what_it_should(ledger, home, ending):
    """The engine runs a rule's SQL inside its own statement: what the file's SQL ends with
    must not change what the rule finds."""
    user_rules(home, "ending.toml", f"""
        framework = "A"
        [[rule]]
        id = "a.end"
        control = "1"
        severity = "low"
        title = "t"
        rationale = "r"
        remediation = "m"
        sql = '''SELECT name AS key, NULL AS version, NULL AS principal,
                 {{'spec': spec}} AS evidence FROM keys WHERE spec = 'AES_256'{ending}'''
    """)
    ledger.create_key("found", spec="AES_256")
    ledger.create_key("not-found", spec="EC_P256")
    findings = ledger.compliance(frameworks=["A"])
    assert findings["key"].tolist() == ["found"]
    assert json.loads(findings["evidence"].iloc[0]) == {"spec": "AES_256"}


# -- reports -------------------------------------------------------------------------------------
def test_html_report_for_an_auditor(ledger, clock, tmp_path):
    ledger.create_key("orders", spec="AES_256", owner="payments",
                      tags={"personal-data": "yes"})
    ledger.create_key("signer", spec="EC_P256", owner="release")
    ledger.disable("signer", reason="")
    ledger.accept_finding("gdpr.restore-test-missing", "orders",
                          "restore drill scheduled for February <b>(ticket 7)</b>", "60d")
    clock.advance(days=1)
    out = ledger.compliance_report(tmp_path / "report.html")
    html = out.read_text()
    df = ledger.compliance(include_accepted=True)
    visible = df[df["status"] != "accepted"]
    for section in ("about", "summary", "findings", "exceptions", "rules", "method"):
        assert f'<section id="{section}"' in html
    assert "keyledger is a key-management toolkit" in html
    assert "Evaluation time: 2026-01-02 09:00 UTC" in html
    summary = re.search(r'<section id="summary".*?</section>', html, re.S).group(0)
    assert f'data-findings="{len(visible)}" data-accepted="1"' in summary
    assert "<svg" in summary and "<script" not in html.lower()
    bars = re.findall(r'data-framework="([^"]+)" data-severity="(\w+)" data-count="(\d+)"', summary)
    expected = visible.groupby(["framework", "severity"]).size()
    assert {(f, s): int(n) for f, s, n in bars} == {k: int(v) for k, v in expected.items()}
    total_row = re.search(r'data-framework="all">(.*?)</tr>', summary, re.S).group(1)
    assert f">{len(visible)}</th>" in total_row.split("</th>")[-2] + "</th>"
    findings = re.search(r'<section id="findings".*?</section>', html, re.S).group(0)
    assert findings.count(" class=\"finding\"") == len(visible)
    assert 'data-rule="nist.state-change-unattributed"' in findings
    assert "Remediation." in findings and "Why it matters." in findings
    assert re.search(r"<h3 data-framework=\"GDPR\">GDPR \(1\)</h3>", findings)
    assert "restore drill scheduled for February &lt;b&gt;(ticket 7)&lt;/b&gt;" in html
    rules = re.search(r'<section id="rules".*?</section>', html, re.S).group(0)
    assert rules.count("<tr data-rule=") == len(load_rules(ledger.home).rules)
    assert "Pre-Active" in html  # the KMIP state mapping
    assert ledger.audit(action="compliance_report")["outcome"].tolist() == ["ok"]


def test_markdown_report_and_bad_arguments(ledger, clock, tmp_path):
    ledger.create_key("k", spec="AES_256")
    md = ledger.compliance_report(tmp_path / "r.md", format="md").read_text()
    assert md.startswith("# Key-management compliance report")
    for heading in ("## About this report", "## Summary", "## Findings", "## Accepted exceptions",
                    "## Rules evaluated"):
        assert heading in md
    assert "| **all frameworks** |" in md and "iso.owner-missing" in md
    with pytest.raises(kl.InvalidInput, match="format"):
        ledger.compliance_report(tmp_path / "r.pdf", format="pdf")
    with pytest.raises(kl.InvalidInput, match="does not exist"):
        ledger.compliance_report(tmp_path / "no" / "r.html")
    with pytest.raises(kl.InvalidInput, match="directory"):
        ledger.compliance_report(tmp_path)


def test_report_with_no_findings(ledger, clock, tmp_path, home):
    user_rules(home, "only-one.toml", """
        framework = "Tiny"
        [[rule]]
        id = "tiny.none"
        control = "1"
        severity = "info"
        title = "never"
        rationale = "r"
        remediation = "m"
        sql = "SELECT name AS key, NULL AS version, NULL AS principal, '{}' AS evidence FROM keys WHERE false"
    """)
    html = ledger.compliance_report(tmp_path / "r.html", frameworks="Tiny").read_text()
    assert "No open findings" in html and 'data-findings="0"' in html
    assert "No exceptions have been accepted." in html


def test_report_lists_many_findings_of_one_rule_as_table_rows(ledger, clock, tmp_path):
    from keyledger.compliance.report import CARD_LIMIT

    for i in range(CARD_LIMIT + 1):
        ledger.create_key(f"k{i:02d}", spec="AES_256")
    html = ledger.compliance_report(tmp_path / "r.html", frameworks="iso").read_text()
    block = re.search(r'<div class="rule-findings" data-rule="iso.owner-missing" '
                      r'data-count="(\d+)".*?</div>', html, re.S)
    assert int(block.group(1)) == CARD_LIMIT + 1
    assert block.group(0).count('<tr class="finding"') == CARD_LIMIT + 1
    assert "<article" not in block.group(0) and "k25" in block.group(0)


def test_docs_list_every_rule_and_their_example_rule_file_works(ledger, home, clock):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "compliance.md").read_text()
    for rule_id in load_rules().rules:
        assert f"`{rule_id}`" in doc, f"docs/compliance.md does not list {rule_id}"
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    user_rules(home, "acme.toml", example)
    ledger.create_key("k", spec="AES_256")
    row, ev = one(ledger, "acme.team-tag", "k")
    assert row["framework"] == "ACME key standard" and ev == {"tags": {}}
