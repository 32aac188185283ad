"""Quorum cannot be bypassed by one admin.

With a quorum above 1, who is admin decides who may approve: granting or revoking admin (on the
home or on a key) and lowering a quorum are themselves requests that need the quorum. When a
request executes, only approvals of principals who held admin on its scope when it was filed,
and still do, count; short of the quorum it stays pending.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FakeClock

import keyledger as kl


@pytest.fixture
def admins(home: Path, clock: FakeClock):
    """alice, bea, cal: admins of the home; home quorum 2; a key "z" past its deletion window."""
    alice = kl.open(home, principal="alice", clock=clock)
    leds = {"alice": alice}
    try:
        alice.grant("*", "bea", "admin")
        alice.grant("*", "cal", "admin")
        alice.set_policy("*", quorum=2)
        for who in ("bea", "cal", "alice-2", "dave"):
            leds[who] = kl.open(home, principal=who, clock=clock)
        alice.create_key("z", spec="AES_256")
        alice.schedule_deletion("z", 7)
        clock.advance(days=8)
        yield leds
    finally:
        for led in leds.values():
            led.close()


def state(led: kl.KeyLedger, name: str = "z") -> str:
    return led.get_key(name).state.value


def status(led: kl.KeyLedger, rid: str) -> str:
    df = led.requests()
    return df.loc[df["request_id"] == rid, "status"].iloc[0]


def pass_request(leds: dict[str, kl.KeyLedger], action: str, name: str, by: str, approver: str,
                 **params: object) -> str:
    """File a request as ``by`` and have ``approver`` approve it; it must execute."""
    rid = leds[by].request(action, name, "team change", **params)
    assert leds[approver].approve(rid)["executed"]
    return rid


def test_one_admin_cannot_grant_a_second_name_admin(admins, clock: FakeClock) -> None:
    """The issue's case: alice made alice-2 admin and approved her own destroy with it."""
    alice, alice2 = admins["alice"], admins["alice-2"]
    rid = alice.request("destroy", "z", "done")
    for scope in ("*", "z"):
        with pytest.raises(kl.PolicyViolation, match="request") as err:
            alice.grant(scope, "alice-2", "admin")
        assert "principal='alice-2'" in str(err.value) and "2 distinct admins" in str(err.value)
    with pytest.raises(kl.AccessDenied):
        alice2.approve(rid)
    assert state(alice) == "pending-deletion" and status(alice, rid) == "pending"
    assert not (alice.grants()["principal"] == "alice-2").any()
    refused = alice.audit(action="grant", outcome="failed")
    assert len(refused) == 2 and set(refused["error"]) == {"PolicyViolation"}
    alice.grant("z", "alice-2", "user")  # other roles are not guarded
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.set_policy("*", quorum=1)  # nor can she lower the quorum alone


def test_granting_admin_through_a_request_needs_a_second_admin(admins) -> None:
    alice, bea, dave = admins["alice"], admins["bea"], admins["dave"]
    rid = alice.request("grant", "z", "dave runs team z now", principal="dave", role="admin")
    assert status(alice, rid) == "pending"
    assert not (alice.grants("z")["principal"] == "dave").any()
    assert bea.approve(rid)["executed"]
    grants = alice.grants("z")
    row = grants[(grants["key"] == "z") & (grants["principal"] == "dave")]
    assert row["role"].tolist() == ["admin"] and row["granted_by"].tolist() == ["bea"]
    assert "admin" in set(dave.grants("z")["role"])
    for bad in ({"principal": "dave", "role": "boss"}, {"principal": "", "role": "admin"},
                {"role": "admin"}, {"principal": "dave", "role": "admin", "scope": "*"}):
        with pytest.raises(kl.InvalidInput):
            alice.request("grant", "*", "typo", **bad)


def test_revoking_admin_needs_the_quorum(admins) -> None:
    alice, bea = admins["alice"], admins["bea"]
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.revoke("*", "bea", "admin")
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.revoke("*", "bea")  # all roles, admin among them
    assert "admin" in set(alice.grants().query("principal == 'bea'")["role"])
    alice.grant("*", "bea", "user")
    assert alice.revoke("*", "bea", "user") == 1  # not admin: not guarded
    pass_request(admins, "revoke", "*", "alice", "cal", principal="bea", role="admin")
    assert not (alice.grants()["principal"] == "bea").any()
    with pytest.raises(kl.AccessDenied):
        bea.request("destroy", "z", "no longer admin")


def test_approval_of_a_revoked_admin_does_not_count(admins) -> None:
    """bea files the destroy (her approval), loses admin, then alice approves: 1 of 2."""
    alice, bea, cal = admins["alice"], admins["bea"], admins["cal"]
    rid = bea.request("destroy", "z", "vendor contract ended")
    pass_request(admins, "revoke", "*", "alice", "cal", principal="bea", role="admin")
    out = alice.approve(rid)
    assert out == {"request_id": rid, "approvals": 1, "quorum": 2, "executed": False}
    assert state(alice) == "pending-deletion" and status(alice, rid) == "pending"
    detail = alice.audit(action="approve", key="z")["detail"].iloc[-1]
    assert "not counted: bea" in detail
    assert cal.approve(rid)["executed"]  # two admins who still are: it runs
    assert state(alice) == "destroyed"


def test_admin_made_after_the_request_was_filed_does_not_count(admins) -> None:
    alice, cal, dave = admins["alice"], admins["cal"], admins["dave"]
    rid = alice.request("destroy", "z", "decommissioned")
    pass_request(admins, "grant", "*", "alice", "bea", principal="dave", role="admin")
    out = dave.approve(rid)
    assert out["approvals"] == 1 and not out["executed"]
    assert state(alice) == "pending-deletion" and status(alice, rid) == "pending"
    assert cal.approve(rid)["executed"]  # an admin from before the request
    assert state(alice) == "destroyed"


def test_lowering_the_quorum_of_a_key_needs_approval(admins) -> None:
    alice, bea = admins["alice"], admins["bea"]
    alice.create_key("k", spec="AES_256")
    alice.set_policy("k", quorum=3)
    with pytest.raises(kl.PolicyViolation, match="request"):
        alice.set_policy("k", quorum=1)
    rid = alice.request("set_policy", "k", "team shrank", quorum=2)
    assert not bea.approve(rid)["executed"]  # the key's quorum (3) applies to lowering it
    assert admins["cal"].approve(rid)["executed"]
    assert alice.get_key("k").policy["quorum"] == 2


def test_with_quorum_one_grants_stay_direct(home: Path, clock: FakeClock) -> None:
    with kl.open(home, principal="alice", clock=clock) as alice:
        alice.grant("*", "bea", "admin")
        assert alice.revoke("*", "bea", "admin") == 1
        rid = alice.request("grant", "*", "one admin is enough here", principal="bea",
                            role="admin")
        assert status(alice, rid) == "executed"
        assert "admin" in set(alice.grants().query("principal == 'bea'")["role"])
