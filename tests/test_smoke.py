"""The quickstart works end to end on a real token and store."""

import pytest

import keyledger as kl


def test_quickstart_roundtrip_and_audit(ledger):
    ledger.create_key("orders", spec="AES_256", owner="payments")
    blob = ledger.encrypt("orders", b"card 4111", context={"tenant": "acme"})
    assert ledger.decrypt(blob, context={"tenant": "acme"}) == b"card 4111"
    ledger.rotate("orders")
    assert ledger.decrypt(blob, context={"tenant": "acme"}) == b"card 4111"
    actions = list(ledger.audit()["action"])
    assert actions.count("encrypt") == 1 and actions.count("decrypt") == 2
    assert ledger.verify_audit().ok


def test_reopen_sees_keys(home, clock):
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("k", spec="HMAC_SHA256")
        tag = led.mac("k", b"m")
        led.grant("k", "bob", "user")  # deny by default: bob needs a grant
    with kl.open(home, principal="bob", clock=clock) as led:
        assert led.verify_mac("k", b"m", tag)
        assert list(led.list_keys()["name"]) == ["k"]
        with pytest.raises(kl.AccessDenied):
            led.rotate("k")  # a user is not an admin
