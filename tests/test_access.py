"""Access control: roles, grants, quorum approvals and custodian acknowledgement.

Must show (issue "access control"):
- a permission matrix (admin only / user only / auditor only / no role x every action): allowed,
  or refused with ``AccessDenied`` that names the missing role and the key, and is audited;
- refusal happens before the HSM is touched (checked with ``pkcs11-tool`` in another process);
- no escalation (self-grants, per-key admins, the last admin, revocation, wildcard grants);
- the creator is a user of its key unless the home policy says otherwise;
- M-of-N approvals for destroy and weakening policy changes, executed exactly once;
- custodian acknowledgements land in the store.

Several ``KeyLedger`` objects with different principals are open on one home in this process;
they share the PKCS#11 login and the catalog cache. The cross-process revocation case is in
``test_access_multiprocess.py``.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from conftest import FakeClock, hsm_labels

import keyledger as kl
from keyledger.governance import CUSTODIAN_STATEMENT

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_TOOL = shutil.which("pkcs11-tool")
CTX = {"tenant": "acme", "app": "access-test"}
MSG = b"pay 42 EUR to bob"
needs_pkcs11_tool = pytest.mark.skipif(PKCS11_TOOL is None or not os.path.exists(MODULE),
                                       reason="needs SoftHSM2 and pkcs11-tool (opensc)")


# -- helpers -----------------------------------------------------------------------------------------
def records(led: kl.KeyLedger, **filters: str) -> pd.DataFrame:
    """Audit records matching ``filters`` (read by ``led``, which must be admin or auditor)."""
    return led.audit(**filters)


def assert_denied(exc: BaseException, principal: str, roles: set[str], key: str | None) -> None:
    """The message names the principal, the role(s) that would allow it, and the key."""
    msg = str(exc)
    assert repr(principal) in msg, msg
    assert "needs" in msg, msg
    clause = msg.split("needs", 1)[1].split(";", 1)[0]
    for role in ("admin", "user", "auditor"):
        assert (role in clause) == (role in roles), (role, msg)
    if key is None:
        assert "this home" in msg, msg
    else:
        assert f"key {key!r}" in msg, msg


def open_as(home: Path, clock: FakeClock, *principals: str) -> dict[str, kl.KeyLedger]:
    return {p: kl.open(home, principal=p, clock=clock) for p in principals}


def close_all(leds: dict[str, kl.KeyLedger]) -> None:
    """Close every ledger (so the next test may open another home), then report a failure."""
    errors = []
    for led in leds.values():
        try:
            led.close()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others closed
            errors.append(exc)
    if errors:
        raise errors[0]


def grant_rows(led: kl.KeyLedger) -> set[tuple[str, str, str]]:
    return {(r.key, r.principal, r.role) for r in led.grants().itertuples()}


# -- 1. the permission matrix -------------------------------------------------------------------------
# Subjects: one principal per role group, each holding exactly that role on every key ("*").
SUBJECT = {"admin": "adm", "user": "usr", "auditor": "aud", "none": "nobody"}
ADMIN, USER, AUDIT, ANY = {"admin"}, {"user"}, {"admin", "auditor"}, {"admin", "user", "auditor"}


@dataclass
class Case:
    allowed: set[str]  # roles that may do it
    prep: Callable[[dict], None]  # run by "root" (admin + user of its keys) to set the stage
    run: Callable[[kl.KeyLedger, dict], object]  # the action under test, by the subject
    check: Callable[[object, dict], None] = lambda result, ctx: None  # when allowed
    keyed: bool = True  # the action names a key (the message and the audit record name it)


def _key(spec: str = "AES_256") -> Callable[[dict], None]:
    def prep(ctx: dict) -> None:
        ctx["root"].create_key(ctx["key"], spec=spec)
    return prep


def _then(*steps: Callable[[dict], None]) -> Callable[[dict], None]:
    def prep(ctx: dict) -> None:
        for step in steps:
            step(ctx)
    return prep


def _ciphertext(ctx: dict) -> None:
    ctx["ct"] = ctx["root"].encrypt(ctx["key"], MSG, context=CTX)


def _signature(ctx: dict) -> None:
    ctx["sig"] = ctx["root"].sign(ctx["key"], MSG)


def _scheduled(ctx: dict) -> None:
    ctx["root"].schedule_deletion(ctx["key"], days=7)


def _window_passed(ctx: dict) -> None:
    ctx["clock"].advance(days=8)


def _pending_request(ctx: dict) -> None:
    root = ctx["root"]
    root.set_policy(ctx["key"], quorum=2)  # raising the quorum is allowed directly
    ctx["rid"] = root.request("set_policy", ctx["key"], "tighten rotation", rotation_period="30d")


def _state(expected: str) -> Callable[[object, dict], None]:
    def check(result: object, ctx: dict) -> None:
        assert ctx["root"].get_key(ctx["key"]).state.value == expected
    return check


def _rotated_30d(result: object, ctx: dict) -> None:
    assert ctx["root"].get_key(ctx["key"]).rotation_period == timedelta(days=30)


CASES: dict[str, Case] = {
    "create_key": Case(ADMIN, lambda ctx: None,
                       lambda led, ctx: led.create_key(ctx["key"], spec="AES_256"),
                       lambda res, ctx: ctx["root"].get_key(ctx["key"]), keyed=False),
    "rotate": Case(ADMIN, _key(), lambda led, ctx: led.rotate(ctx["key"]),
                   lambda res, ctx: ctx["root"].get_key(ctx["key"]).latest_version == 2),
    "enable": Case(ADMIN, _then(_key(), lambda ctx: ctx["root"].disable(ctx["key"])),
                   lambda led, ctx: led.enable(ctx["key"]), _state("active")),
    "disable": Case(ADMIN, _key(), lambda led, ctx: led.disable(ctx["key"]), _state("suspended")),
    "schedule_deletion": Case(ADMIN, _key(),
                              lambda led, ctx: led.schedule_deletion(ctx["key"], days=7),
                              _state("pending-deletion")),
    "cancel_deletion": Case(ADMIN, _then(_key(), _scheduled),
                            lambda led, ctx: led.cancel_deletion(ctx["key"]), _state("active")),
    "destroy": Case(ADMIN, _then(_key(), _scheduled, _window_passed),
                    lambda led, ctx: led.destroy(ctx["key"]), _state("destroyed")),
    "set_tags": Case(ADMIN, _key(), lambda led, ctx: led.set_tags(ctx["key"], {"team": "pay"}),
                     lambda res, ctx: ctx["root"].get_key(ctx["key"]).tags == {"team": "pay"}),
    "set_policy": Case(ADMIN, _key(),
                       lambda led, ctx: led.set_policy(ctx["key"], rotation_period="30d"),
                       _rotated_30d),
    "grant": Case(ADMIN, _key(), lambda led, ctx: led.grant(ctx["key"], "zed", "user"),
                  lambda res, ctx: (ctx["key"], "zed", "user") in grant_rows(ctx["root"])),
    "revoke": Case(ADMIN, _key(), lambda led, ctx: led.revoke(ctx["key"], "root", "user"),
                   lambda res, ctx: (ctx["key"], "root", "user") not in grant_rows(ctx["root"])),
    "encrypt": Case(USER, _key(), lambda led, ctx: led.encrypt(ctx["key"], MSG, context=CTX),
                    lambda res, ctx: ctx["root"].decrypt(res, context=CTX) == MSG),
    "decrypt": Case(USER, _then(_key(), _ciphertext),
                    lambda led, ctx: led.decrypt(ctx["ct"], context=CTX),
                    lambda res, ctx: res == MSG),
    "sign": Case(USER, _key("EC_P256"), lambda led, ctx: led.sign(ctx["key"], MSG),
                 lambda res, ctx: ctx["root"].verify(ctx["key"], MSG, res)),
    "verify": Case(USER, _then(_key("EC_P256"), _signature),
                   lambda led, ctx: led.verify(ctx["key"], MSG, ctx["sig"]),
                   lambda res, ctx: res is True),
    "mac": Case(USER, _key("HMAC_SHA256"), lambda led, ctx: led.mac(ctx["key"], MSG),
                lambda res, ctx: ctx["root"].verify_mac(ctx["key"], MSG, res)),
    "generate_data_key": Case(USER, _key(), lambda led, ctx: led.generate_data_key(ctx["key"]),
                              lambda res, ctx: ctx["root"].decrypt(res.wrapped) == res.plaintext),
    "rewrap": Case(USER, _then(_key(), _ciphertext),
                   lambda led, ctx: led.rewrap(ctx["ct"], context=CTX),
                   lambda res, ctx: ctx["root"].decrypt(res, context=CTX) == MSG),
    "get_key": Case(ANY, _key(), lambda led, ctx: led.get_key(ctx["key"]),
                    lambda res, ctx: res.name == ctx["key"]),
    "list_keys": Case(ANY, _key(), lambda led, ctx: led.list_keys(),
                      lambda res, ctx: ctx["key"] in set(res["name"]), keyed=False),
    "audit": Case(AUDIT, lambda ctx: None, lambda led, ctx: led.audit(limit=5),
                  lambda res, ctx: len(res) == 5, keyed=False),
    "verify_audit": Case(AUDIT, lambda ctx: None, lambda led, ctx: led.verify_audit(),
                         lambda res, ctx: res.ok, keyed=False),
    "export_audit": Case(AUDIT, lambda ctx: None,
                         lambda led, ctx: led.export_audit(ctx["tmp"] / f"{ctx['key']}.jsonl",
                                                           format="jsonl"),
                         lambda res, ctx: res.stat().st_size > 0, keyed=False),
    "request": Case(ADMIN, _key(),
                    lambda led, ctx: led.request("set_policy", ctx["key"], "tighten rotation",
                                                 rotation_period="30d"),
                    _rotated_30d),  # home quorum 1: the request runs at once
    "approve": Case(ADMIN, _then(_key(), _pending_request),
                    lambda led, ctx: led.approve(ctx["rid"]),
                    lambda res, ctx: res["executed"] and _rotated_30d(res, ctx) is None),
}
MATRIX = [(role, action) for role in SUBJECT for action in CASES]


@dataclass
class World:
    home: Path
    tmp: Path
    clock: FakeClock
    leds: dict[str, kl.KeyLedger] = field(default_factory=dict)


@pytest.fixture(scope="class")
def world(tmp_path_factory: pytest.TempPathFactory):
    """One home for the whole matrix: root (first admin) plus one principal per role group.

    The store is kept open for the whole matrix (``keep_store_open``, as a bulk script would):
    every principal here shares this process's runtime, nothing else uses the home, and the
    matrix is about who may do what and what is audited, not how the store is opened; opening
    and closing the file for each transaction was a third of the matrix's CPU."""
    tmp = tmp_path_factory.mktemp("matrix")
    clock = FakeClock()
    home = tmp / "home"
    root = kl.open(home, principal="root", clock=clock)
    w = World(home, tmp, clock, {"root": root})
    try:
        with root.keep_store_open():
            for role, who in SUBJECT.items():
                if role != "none":
                    root.grant("*", who, role)
            w.leds.update(open_as(home, clock, *SUBJECT.values()))
            yield w
    finally:
        close_all(w.leds)


class TestPermissionMatrix:
    @pytest.mark.parametrize(("role", "action"), MATRIX, ids=[f"{r}-{a}" for r, a in MATRIX])
    def test_allowed_or_denied_and_audited(self, world: World, role: str, action: str) -> None:
        case = CASES[action]
        who = SUBJECT[role]
        root, led = world.leds["root"], world.leds[who]
        ctx = {"root": root, "clock": world.clock, "tmp": world.tmp,
               "key": f"{role}-{action.replace('_', '-')}"}
        case.prep(ctx)
        audited_key = ctx["key"] if case.keyed or action == "create_key" else None
        if role in case.allowed:
            result = case.run(led, ctx)
            verdict = case.check(result, ctx)
            assert verdict is None or bool(verdict), f"{action} by {who} did not take effect"
            ok = records(root, principal=who, action=action, outcome="ok")
            assert len(ok) >= 1
            return
        before = len(records(root, principal=who, action=action, outcome="denied"))
        with pytest.raises(kl.AccessDenied) as err:
            case.run(led, ctx)
        assert_denied(err.value, who, case.allowed, ctx["key"] if case.keyed else None)
        denied = records(root, principal=who, action=action, outcome="denied")
        assert len(denied) == before + 1, "every refusal leaves exactly one audit record"
        last = denied.iloc[-1]
        assert last["error"] == "AccessDenied"
        assert last["principal"] == who and last["action"] == action
        if audited_key is not None:
            assert last["key"] == audited_key
        if action == "create_key":  # a refused create leaves no catalog entry
            with pytest.raises(kl.KeyNotFound):
                root.get_key(ctx["key"])


# -- 2. the auditor reads, and changes nothing ----------------------------------------------------------
@needs_pkcs11_tool
def test_auditor_changes_nothing_but_reads_and_verifies_audit(home: Path, clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    alice = leds["alice"]
    try:
        alice.grant("*", "aud", "auditor")
        leds.update(open_as(home, clock, "aud"))
        aud = leds["aud"]
        alice.create_key("k", spec="AES_256")
        alice.create_key("s", spec="EC_P256")
        alice.schedule_deletion("s", days=7)
        blob = alice.encrypt("k", MSG, context=CTX)
        clock.advance(days=8)
        catalog = alice.list_keys()
        grants = grant_rows(alice)
        labels = hsm_labels(home)
        attempts: dict[str, Callable[[], object]] = {
            "create_key": lambda: aud.create_key("new", spec="AES_256"),
            "rotate": lambda: aud.rotate("k"),
            "disable": lambda: aud.disable("k"),
            "enable": lambda: aud.enable("k"),
            "mark_compromised": lambda: aud.mark_compromised("k", "suspected"),
            "schedule_deletion": lambda: aud.schedule_deletion("k", days=7),
            "cancel_deletion": lambda: aud.cancel_deletion("s"),
            "destroy": lambda: aud.destroy("s"),
            "set_alias": lambda: aud.set_alias("k", "k-alias"),
            "set_tags": lambda: aud.set_tags("k", {"x": "y"}),
            "set_policy": lambda: aud.set_policy("k", rotation_period="30d"),
            "grant": lambda: aud.grant("k", "aud", "user"),
            "revoke": lambda: aud.revoke("k", "alice"),
            "request": lambda: aud.request("destroy", "s", "cleanup"),
            "encrypt": lambda: aud.encrypt("k", MSG),
            "decrypt": lambda: aud.decrypt(blob, context=CTX),
            "rewrap": lambda: aud.rewrap(blob, context=CTX),
            "generate_data_key": lambda: aud.generate_data_key("k"),
            "acknowledge_custody": lambda: aud.acknowledge_custody(),
        }
        for action, attempt in attempts.items():
            with pytest.raises(kl.AccessDenied) as err:
                attempt()
            assert "'aud' may not" in str(err.value), action
        with pytest.raises(kl.AccessDenied):
            aud.grant("*", "aud", "admin")
        with pytest.raises(kl.AccessDenied):
            aud.set_policy("*", quorum=1)
        pd.testing.assert_frame_equal(alice.list_keys(), catalog)
        assert grant_rows(alice) == grants
        assert hsm_labels(home) == labels, "a refused call must not touch the HSM"
        # ... but reads the audit trail, including its own refusals, and verifies it
        mine = aud.audit(principal="aud", outcome="denied")
        assert set(attempts) <= set(mine["action"])
        assert (mine["error"] == "AccessDenied").all()
        assert aud.verify_audit().ok
        assert set(aud.list_keys()["name"]) == {"k", "s"}
    finally:
        close_all(leds)


# -- 3. refusal comes before the HSM ---------------------------------------------------------------------
@needs_pkcs11_tool
def test_denied_rotate_and_create_touch_no_hsm_object(home: Path, clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.grant("*", "usr", "user")
        alice.grant("*", "aud", "auditor")
        alice.create_key("k", spec="AES_256")
        leds.update(open_as(home, clock, "usr", "aud", "nobody"))
        assert hsm_labels(home) == ["kl:k:v1"]
        for who in ("usr", "aud", "nobody"):
            with pytest.raises(kl.AccessDenied):
                leds[who].rotate("k")
            with pytest.raises(kl.AccessDenied):
                leds[who].create_key(f"by-{who}", spec="AES_256")
        assert hsm_labels(home) == ["kl:k:v1"], "no kl:k:v2 and no kl:by-*:v1 objects"
        assert alice.get_key("k").latest_version == 1
        alice.rotate("k")  # the same check sees an allowed rotation
        assert hsm_labels(home) == ["kl:k:v1", "kl:k:v2"]
    finally:
        close_all(leds)


def _tampered(blob: bytes) -> dict[str, bytes]:
    version = struct.unpack(">I", blob[20:24])[0]
    return {
        "body": blob[:-1] + bytes([blob[-1] ^ 1]),
        "nonce": blob[:30] + bytes([blob[30] ^ 1]) + blob[31:],
        "unknown-version": blob[:20] + struct.pack(">I", version + 7) + blob[24:],
    }


def test_denied_decrypt_of_tampered_ciphertext_is_access_denied(home: Path,
                                                                clock: FakeClock) -> None:
    """No decryption oracle: a non-user learns nothing about whether the ciphertext is valid."""
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.grant("*", "adm", "admin")
        alice.grant("*", "aud", "auditor")
        alice.create_key("k", spec="AES_256")
        leds.update(open_as(home, clock, "adm", "aud", "nobody"))
        blob = alice.encrypt("k", MSG, context=CTX)
        for who in ("adm", "aud", "nobody"):  # adm is admin but not a user of k
            for how, bad in [("intact", blob), *_tampered(blob).items()]:
                with pytest.raises(kl.AccessDenied) as err:
                    leds[who].decrypt(bad, context=CTX)
                assert_denied(err.value, who, USER, "k")
                with pytest.raises(kl.AccessDenied) as err:
                    leds[who].rewrap(bad, context=CTX)
                assert "'k'" in str(err.value), (who, how)
        for how, bad in _tampered(blob).items():  # the user does see the real error
            with pytest.raises(kl.InvalidCiphertext) as err:
                alice.decrypt(bad, context=CTX)
            assert "AccessDenied" not in repr(err.value), how
        denied = alice.audit(action="decrypt", outcome="denied")
        assert len(denied) == 3 * 4
        assert set(denied["key"]) == {"k"} and set(denied["error"]) == {"AccessDenied"}
    finally:
        close_all(leds)


# -- 4. no escalation -------------------------------------------------------------------------------------
def test_user_cannot_grant_itself_more(home: Path, clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.create_key("mine", spec="AES_256")
        alice.create_key("theirs", spec="AES_256")
        alice.grant("mine", "bob", "user")
        leds.update(open_as(home, clock, "bob"))
        bob = leds["bob"]
        before = grant_rows(alice)
        bob.encrypt("mine", MSG)
        with pytest.raises(kl.AccessDenied) as err:
            bob.grant("mine", "bob", "admin")
        assert_denied(err.value, "bob", ADMIN, "mine")
        with pytest.raises(kl.AccessDenied):
            bob.grant("theirs", "bob", "user")
        with pytest.raises(kl.AccessDenied):
            bob.grant("*", "bob", "admin")
        with pytest.raises(kl.AccessDenied):
            bob.grant("mine", "*", "admin")
        with pytest.raises(kl.AccessDenied):
            bob.revoke("mine", "alice")
        assert grant_rows(alice) == before
        with pytest.raises(kl.AccessDenied):
            bob.encrypt("theirs", MSG)
        # list_keys shows only the keys bob holds a role on
        assert list(bob.list_keys()["name"]) == ["mine"]
        with pytest.raises(kl.AccessDenied) as err:
            bob.get_key("theirs")
        assert_denied(err.value, "bob", ANY, "theirs")
    finally:
        close_all(leds)


def test_per_key_admin_cannot_act_on_the_home(home: Path, clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.create_key("k", spec="AES_256")
        alice.create_key("other", spec="AES_256")
        alice.grant("k", "kadm", "admin")
        leds.update(open_as(home, clock, "kadm"))
        kadm = leds["kadm"]
        kadm.grant("k", "carol", "user")  # allowed: it administers k
        assert ("k", "carol", "user") in grant_rows(alice)
        before = grant_rows(alice)
        for attempt in (lambda: kadm.grant("*", "kadm", "admin"),
                        lambda: kadm.grant("*", "carol", "user"),
                        lambda: kadm.grant("other", "kadm", "admin"),
                        lambda: kadm.revoke("*", "alice", "admin"),
                        lambda: kadm.create_key("new", spec="AES_256"),
                        lambda: kadm.set_policy("*", quorum=1, creator_is_user=True)):
            with pytest.raises(kl.AccessDenied):
                attempt()
        assert grant_rows(alice) == before
        with pytest.raises(kl.AccessDenied) as err:
            kadm.grant("*", "kadm", "admin")
        assert_denied(err.value, "kadm", ADMIN, None)
        with pytest.raises(kl.AccessDenied):  # admin of k is not a user of k
            kadm.encrypt("k", MSG)
    finally:
        close_all(leds)


def test_last_global_admin_cannot_be_revoked(home: Path, clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        with pytest.raises(kl.PolicyViolation, match="admin"):
            alice.revoke("*", "alice", "admin")
        with pytest.raises(kl.PolicyViolation, match="admin"):
            alice.revoke("*", "alice")
        assert ("*", "alice", "admin") in grant_rows(alice)
        alice.create_key("still-admin", spec="AES_256")
        alice.grant("*", "bea", "admin")
        leds.update(open_as(home, clock, "bea"))
        bea = leds["bea"]
        assert bea.revoke("*", "alice", "admin") == 1  # two admins: one may go
        with pytest.raises(kl.AccessDenied):
            alice.create_key("no-longer", spec="AES_256")
        with pytest.raises(kl.PolicyViolation):
            bea.revoke("*", "bea")
        assert {(k, p, r) for k, p, r in grant_rows(bea) if r == "admin"} == {("*", "bea", "admin")}
        failed = bea.audit(action="revoke", outcome="failed")
        assert set(failed["error"]) == {"PolicyViolation"} and len(failed) == 3
    finally:
        close_all(leds)


def test_revoked_principal_is_refused_at_once_in_the_same_process(home: Path,
                                                                  clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.create_key("k", spec="AES_256")
        alice.grant("k", "bob", "user")
        leds.update(open_as(home, clock, "bob"))
        bob = leds["bob"]
        blob = bob.encrypt("k", MSG)
        assert alice.revoke("k", "bob", "user") == 1
        with pytest.raises(kl.AccessDenied):
            bob.encrypt("k", MSG)
        with pytest.raises(kl.AccessDenied):
            bob.decrypt(blob)
        alice.grant("k", "bob", "user")  # and a grant takes effect at once too
        assert bob.decrypt(blob) == MSG
    finally:
        close_all(leds)


def test_wildcard_grant_works_for_anyone_and_is_listed(home: Path, clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.create_key("shared", spec="AES_256")
        alice.create_key("private", spec="AES_256")
        leds.update(open_as(home, clock, "zed"))
        zed = leds["zed"]
        with pytest.raises(kl.AccessDenied):
            zed.encrypt("shared", MSG)
        alice.grant("shared", "*", "user")
        alice.grant("*", "*", "auditor")
        blob = zed.encrypt("shared", MSG)
        assert zed.decrypt(blob) == MSG
        with pytest.raises(kl.AccessDenied):
            zed.encrypt("private", MSG)
        with pytest.raises(kl.AccessDenied):
            zed.rotate("shared")
        assert len(zed.audit(principal="zed", action="encrypt", outcome="ok")) == 1
        rows = grant_rows(alice)
        assert ("shared", "*", "user") in rows
        assert ("*", "*", "auditor") in rows
        df = alice.grants("shared")
        assert {"key", "principal", "role", "granted_by", "granted_at"} <= set(df.columns)
        assert ((df["principal"] == "*") & (df["role"] == "user")).any()
        assert alice.revoke("shared", "*", "user") == 1
        with pytest.raises(kl.AccessDenied):
            zed.encrypt("shared", MSG)
    finally:
        close_all(leds)


def test_principal_without_role_cannot_read_grants_or_requests(home: Path,
                                                               clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice", "nobody")
    try:
        leds["alice"].create_key("secret-project", spec="AES_256")
        with pytest.raises(kl.AccessDenied):
            leds["nobody"].list_keys()
        with pytest.raises(kl.AccessDenied):
            leds["nobody"].grants()
        with pytest.raises(kl.AccessDenied):
            leds["nobody"].requests()
    finally:
        close_all(leds)


# -- 5. the creator ---------------------------------------------------------------------------------------
def test_creator_is_user_by_default_unless_home_policy_says_no(home: Path,
                                                              clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.grant("*", "bea", "admin")
        leds.update(open_as(home, clock, "bea"))
        bea = leds["bea"]
        bea.create_key("by-default", spec="AES_256")
        assert ("by-default", "bea", "user") in grant_rows(alice)
        assert bea.decrypt(bea.encrypt("by-default", MSG)) == MSG
        with pytest.raises(kl.AccessDenied):  # alice is admin, but not a user of bea's key
            alice.encrypt("by-default", MSG)

        alice.set_policy("*", creator_is_user=False)
        bea.create_key("separated", spec="AES_256")
        assert not [r for r in grant_rows(alice) if r[0] == "separated"]
        with pytest.raises(kl.AccessDenied) as err:
            bea.encrypt("separated", MSG)
        assert_denied(err.value, "bea", USER, "separated")
        bea.rotate("separated")  # still its admin
        alice.grant("separated", "bea", "user")
        assert bea.decrypt(bea.encrypt("separated", MSG)) == MSG
        assert "creator_is_user" in alice.audit(action="set_policy")["detail"].iloc[-1]
    finally:
        close_all(leds)


# -- 6. quorum (M-of-N) approvals -------------------------------------------------------------------------
@pytest.fixture
def quorum_home(home: Path, clock: FakeClock):
    """alice, bea, cal: global admins; usr: user of every key; home quorum 2."""
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.grant("*", "bea", "admin")
        alice.grant("*", "cal", "admin")
        alice.grant("*", "usr", "user")
        alice.set_policy("*", quorum=2)  # strengthening: allowed directly
        leds.update(open_as(home, clock, "bea", "cal", "usr"))
        yield leds
    finally:
        close_all(leds)


def _request_row(led: kl.KeyLedger, rid: str) -> pd.Series:
    df = led.requests()
    row = df[df["request_id"] == rid]
    assert len(row) == 1
    return row.iloc[0]


def _deletable(led: kl.KeyLedger, clock: FakeClock, name: str) -> None:
    led.create_key(name, spec="AES_256")
    led.schedule_deletion(name, days=7)
    clock.advance(days=8)


@needs_pkcs11_tool
def test_destroy_needs_two_admins_and_runs_once(quorum_home, home: Path,
                                                clock: FakeClock) -> None:
    alice, bea, cal, usr = (quorum_home[p] for p in ("alice", "bea", "cal", "usr"))
    _deletable(alice, clock, "old")
    with pytest.raises(kl.PolicyViolation, match="request") as err:
        alice.destroy("old")
    assert "2" in str(err.value)
    assert alice.get_key("old").state.value == "pending-deletion"

    rid = alice.request("destroy", "old", "decommissioned service")
    row = _request_row(alice, rid)
    assert (row["status"], row["action"], row["key"], row["requested_by"]) == \
        ("pending", "destroy", "old", "alice")
    assert list(row["approvers"]) == ["alice"] and row["quorum"] == 2

    clock.advance(minutes=1)
    again = alice.approve(rid)  # the requester's second approval does not count
    assert again["approvals"] == 1 and not again["executed"]
    assert _request_row(alice, rid)["status"] == "pending"
    assert alice.get_key("old").state.value == "pending-deletion"

    with pytest.raises(kl.AccessDenied) as err:
        usr.approve(rid)
    assert_denied(err.value, "usr", ADMIN, "old")
    assert _request_row(alice, rid)["status"] == "pending"

    clock.advance(minutes=1)
    done = bea.approve(rid)
    assert done == {"request_id": rid, "approvals": 2, "quorum": 2, "executed": True}
    assert alice.get_key("old").state.value == "destroyed"
    assert not [label for label in hsm_labels(home) if label.startswith("kl:old:")]
    row = _request_row(alice, rid)
    assert row["status"] == "executed" and row["executed_by"] == "bea"
    assert list(row["approvers"]) == ["alice", "bea"]
    assert row["executed_at"] is not None

    with pytest.raises(kl.KeyStateError):
        cal.approve(rid)
    with pytest.raises(kl.KeyStateError):
        bea.approve(rid)
    destroys = alice.audit(action="destroy", key="old")
    assert list(destroys["outcome"]) == ["failed", "ok"]  # the direct attempt, then the request
    assert destroys["principal"].iloc[-1] == "bea"
    req = alice.audit(action="request", key="old")
    assert len(req) == 1 and rid in req["detail"].iloc[0] and "1 of 2" in req["detail"].iloc[0]
    appr = alice.audit(action="approve", key="old")
    assert list(zip(appr["principal"], appr["outcome"], strict=True)) == [
        ("alice", "ok"), ("usr", "denied"), ("bea", "ok"), ("cal", "failed"), ("bea", "failed")]
    assert "2 of 2" in appr["detail"].iloc[2] and rid in appr["detail"].iloc[2]


def test_concurrent_approvals_execute_the_request_once(quorum_home, clock: FakeClock) -> None:
    alice, bea, cal = (quorum_home[p] for p in ("alice", "bea", "cal"))
    _deletable(alice, clock, "racy")
    rid = alice.request("destroy", "racy", "decommissioned")
    results: dict[str, object] = {}

    def approve(led: kl.KeyLedger) -> None:
        try:
            results[led.principal] = led.approve(rid)
        except kl.KeyLedgerError as exc:
            results[led.principal] = exc

    threads = [threading.Thread(target=approve, args=(led,)) for led in (bea, cal)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    executed = [r for r in results.values() if isinstance(r, dict) and r["executed"]]
    others = [r for r in results.values() if not (isinstance(r, dict) and r["executed"])]
    assert len(executed) == 1, results
    assert all(isinstance(r, dict | kl.KeyStateError) for r in others), results
    assert len(alice.audit(action="destroy", key="racy", outcome="ok")) == 1
    assert _request_row(alice, rid)["status"] == "executed"


def test_expired_request_cannot_execute(quorum_home, clock: FakeClock) -> None:
    alice, bea = quorum_home["alice"], quorum_home["bea"]
    _deletable(alice, clock, "stale")
    rid = alice.request("destroy", "stale", "decommissioned")
    clock.advance(hours=72, minutes=1)
    with pytest.raises(kl.PolicyViolation, match="expired"):
        bea.approve(rid)
    row = _request_row(alice, rid)
    assert row["status"] == "expired" and list(row["approvers"]) == ["alice"]
    assert alice.get_key("stale").state.value == "pending-deletion"
    with pytest.raises(kl.KeyStateError):
        quorum_home["cal"].approve(rid)
    assert alice.get_key("stale").state.value == "pending-deletion"
    failed = alice.audit(action="approve", key="stale")
    assert list(failed["error"]) == ["PolicyViolation", "KeyStateError"]


def test_request_before_the_deletion_window_goes_back_to_pending(quorum_home,
                                                                 clock: FakeClock) -> None:
    alice, bea, cal = (quorum_home[p] for p in ("alice", "bea", "cal"))
    alice.create_key("early", spec="AES_256")
    alice.schedule_deletion("early", days=7)
    clock.advance(days=5)
    rid = alice.request("destroy", "early", "decommissioned")
    clock.advance(hours=1)
    with pytest.raises(kl.PolicyViolation, match="waiting period"):
        bea.approve(rid)
    assert alice.get_key("early").state.value == "pending-deletion"
    row = _request_row(alice, rid)
    assert row["status"] == "pending" and pd.isna(row["executed_by"])  # <NA>: frames convention
    clock.advance(days=2)  # the window has passed, the request has not expired (49 h < 72 h)
    out = cal.approve(rid)
    assert out["executed"] and out["approvals"] == 3
    assert alice.get_key("early").state.value == "destroyed"
    row = _request_row(alice, rid)
    assert row["status"] == "executed" and row["executed_by"] == "cal"
    assert list(alice.audit(action="destroy", key="early")["outcome"]) == ["failed", "ok"]


def test_weakening_policy_needs_a_request_strengthening_does_not(quorum_home,
                                                                 clock: FakeClock) -> None:
    alice = quorum_home["alice"]
    alice.create_key("w", spec="AES_256")
    assert alice.get_key("w").rotation_period == timedelta(days=90)
    alice.set_policy("w", rotation_period="30d")  # shorter: stronger
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.set_policy("w", rotation_period="180d")
    alice.rotate("w")
    alice.set_policy("w", min_decryption_version=2)
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.set_policy("w", min_decryption_version=1)
    alice.set_policy("w", quorum=3)
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.set_policy("w", quorum=2)
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.set_policy("*", quorum=1)
    alice.set_policy("*", quorum=3)  # raising the home quorum is fine
    key = alice.get_key("w")
    assert key.rotation_period == timedelta(days=30)
    assert key.min_decryption_version == 2 and key.policy.get("quorum") == 3
    failed = alice.audit(action="set_policy", outcome="failed")
    assert len(failed) == 4 and set(failed["error"]) == {"PolicyViolation"}


def test_requested_policy_change_runs_after_the_second_approval(quorum_home,
                                                                clock: FakeClock) -> None:
    alice, bea = quorum_home["alice"], quorum_home["bea"]
    alice.create_key("p", spec="AES_256")
    alice.rotate("p")
    alice.set_policy("p", min_decryption_version=2)
    rid = alice.request("set_policy", "p", "batch job reads old data for 6 months",
                        rotation_period="180d", min_decryption_version=1)
    key = alice.get_key("p")
    assert key.rotation_period == timedelta(days=90) and key.min_decryption_version == 2
    clock.advance(minutes=5)
    assert bea.approve(rid)["executed"]
    key = alice.get_key("p")
    assert key.rotation_period == timedelta(days=180) and key.min_decryption_version == 1
    row = _request_row(alice, rid)
    assert row["status"] == "executed" and row["executed_by"] == "bea"
    assert list(row["approvers"]) == ["alice", "bea"]
    change = alice.audit(action="set_policy", key="p", outcome="ok").iloc[-1]
    assert change["principal"] == "bea" and "rotation_period_s=15552000" in change["detail"]


def test_home_quorum_can_be_lowered_with_approvals(quorum_home, clock: FakeClock) -> None:
    alice, bea = quorum_home["alice"], quorum_home["bea"]
    rid = alice.request("set_policy", "*", "team shrank", quorum=1)
    assert bea.approve(rid)["executed"]
    alice.create_key("solo", spec="AES_256")
    alice.schedule_deletion("solo", days=7)
    clock.advance(days=8)
    alice.destroy("solo")


def test_requested_policy_change_accepts_a_timedelta(quorum_home) -> None:
    alice, bea = quorum_home["alice"], quorum_home["bea"]
    alice.create_key("td", spec="AES_256")
    rid = alice.request("set_policy", "td", "longer", rotation_period=timedelta(days=180))
    assert bea.approve(rid)["executed"]
    assert alice.get_key("td").rotation_period == timedelta(days=180)


def test_request_with_unknown_params_is_refused_up_front(quorum_home) -> None:
    alice, bea = quorum_home["alice"], quorum_home["bea"]
    alice.create_key("typo", spec="AES_256")
    try:
        rid = alice.request("set_policy", "typo", "longer", rotation_perod="180d")
    except kl.InvalidInput:
        return
    bea.approve(rid)  # must fail with a KeyLedgerError, not a raw TypeError
    pytest.fail("an unknown parameter was accepted")


# -- 7. custodian acknowledgement -------------------------------------------------------------------------
def test_acknowledge_custody_is_stored_for_admins_only(home: Path, clock: FakeClock) -> None:
    leds = open_as(home, clock, "alice")
    try:
        alice = leds["alice"]
        alice.create_key("k", spec="AES_256")
        alice.grant("k", "kadm", "admin")
        alice.grant("*", "usr", "user")
        alice.grant("*", "aud", "auditor")
        leds.update(open_as(home, clock, "kadm", "usr", "aud", "nobody"))
        alice.acknowledge_custody()
        clock.advance(hours=1)
        leds["kadm"].acknowledge_custody("I protect key k.")  # an admin of one key is a custodian
        for who in ("usr", "aud", "nobody"):
            with pytest.raises(kl.AccessDenied) as err:
                leds[who].acknowledge_custody()
            assert repr(who) in str(err.value) and "admin" in str(err.value)
        with pytest.raises(kl.InvalidInput):
            alice.acknowledge_custody("   ")
        denied = alice.audit(action="acknowledge_custody", outcome="denied")
        assert sorted(denied["principal"]) == ["aud", "nobody", "usr"]
        assert len(alice.audit(action="acknowledge_custody", outcome="ok")) == 2
    finally:
        close_all(leds)
    con = duckdb.connect(str(home / "keyledger.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT principal, time, statement FROM acknowledgements "
                           "ORDER BY time").fetchall()
    finally:
        con.close()
    start = FakeClock().now.replace(tzinfo=None)
    assert rows == [("alice", start, CUSTODIAN_STATEMENT),
                    ("kadm", start + timedelta(hours=1), "I protect key k.")]


def test_user_sees_only_grants_of_keys_it_may_list(home: Path, clock: FakeClock) -> None:
    """A principal holding only `user` on one key sees that key's grants and its own home-wide
    ones, never the names of keys it cannot list (nor who administers them); home-wide admins
    and auditors see every grant."""
    leds = open_as(home, clock, "alice", "ursula", "audrey")
    try:
        alice = leds["alice"]
        for name in ("payments", "hr-salaries", "m-and-a-2027"):
            alice.create_key(name, spec="AES_256")
        alice.grant("payments", "ursula", "user")
        alice.grant("hr-salaries", "bob", "admin")
        alice.grant("*", "audrey", "auditor")
        seen = grant_rows(leds["ursula"])
        assert set(leds["ursula"].list_keys()["name"]) == {"payments"}
        assert {k for k, _, _ in seen} == {"payments"}, seen
        assert ("payments", "ursula", "user") in seen and ("payments", "alice", "user") in seen
        assert leds["ursula"].grants("hr-salaries").empty
        everything = grant_rows(alice)
        assert {"hr-salaries", "m-and-a-2027", "*"} <= {k for k, _, _ in everything}
        assert grant_rows(leds["audrey"]) == everything
    finally:
        close_all(leds)
