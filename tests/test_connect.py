"""``kl.connect``: keyledger's own API through ``keyledger serve`` (a real server subprocess on
a SoftHSM2 home), signed with SigV4 by botocore: the same methods, results and errors as a
local ledger, run and audited as the access key's principal; credentials from arguments,
environment or a private file; the CLI's ``--url``; widgets and analytics over a client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from serve_support import audit, new_home, start

import keyledger as kl
from keyledger.remote import api
from keyledger.remote.client import RemoteLedger
from keyledger.server import native


@pytest.fixture(scope="module")
def estate(tmp_path_factory, simulation_template):
    """A served home: ``admin`` (admin everywhere), ``app1`` a user of ``orders``, ``app2``
    with no role; an access key for each."""
    home, keys = new_home(tmp_path_factory.mktemp("connect"), simulation_template)
    with kl.open(home, principal="admin") as led:
        keys["admin"] = led.create_access_key("admin").as_aws()
        led.create_key("orders", spec="AES_256", owner="payments", tags={"env": "prod"})
        led.create_key("signer", spec="EC_P256")
        led.create_key("macs", spec="HMAC_SHA256")
        led.grant("orders", "app1", "user")
    server = start(home)
    yield server, keys
    assert server.stop() == 0, server.log.read_text()


def connect(server, key: dict[str, str]) -> RemoteLedger:
    return kl.connect(server.url, access_key_id=key["AccessKeyId"],
                      secret_access_key=key["SecretAccessKey"])


@pytest.fixture(scope="module")
def admin(estate):
    server, keys = estate
    with connect(server, keys["admin"]) as led:
        yield led


def local(server, principal: str = "admin") -> kl.KeyLedger:
    return kl.open(server.home, principal=principal)


def records(server, principal: str, action: str) -> pd.DataFrame:
    df = audit(server.home, principal=principal, action=action, limit=None)
    return df[["principal", "action", "key", "outcome", "error"]]


# -- lifecycle and crypto ---------------------------------------------------------------------------
def test_lifecycle_round_trip_returns_the_same_classes(estate, admin):
    server, _ = estate
    assert admin.principal == "admin" and admin.simulation
    key = admin.create_key("remote-life", spec="AES_256", owner="ops", tags={"t": "1"},
                           rotation_period="30d")
    assert isinstance(key, kl.Key) and key.spec is kl.SPECS["AES_256"]
    assert key.state is kl.KeyState.ACTIVE and key.rotation_period == timedelta(days=30)
    assert admin.rotate("remote-life").latest_version == 2
    assert admin.set_alias("remote-life", "life-alias").aliases == ("life-alias",)
    assert admin.set_tags("remote-life", {"t": "2"}).tags == {"t": "2"}
    assert admin.set_policy("remote-life", min_decryption_version=1).min_decryption_version == 1
    assert admin.disable("remote-life").state is kl.KeyState.SUSPENDED
    assert admin.enable("remote-life").state is kl.KeyState.ACTIVE
    due = admin.schedule_deletion("remote-life", 7)
    assert due.state is kl.KeyState.PENDING_DELETION and due.deletion_due is not None
    assert admin.cancel_deletion("remote-life").state is kl.KeyState.ACTIVE
    with local(server) as led:
        assert admin.get_key("remote-life") == led.get_key("remote-life")
    assert list(records(server, "admin", "rotate")["key"]) == ["remote-life"]


def test_crypto_round_trip(estate, admin):
    blob = admin.encrypt("orders", b"card 4111", context={"tenant": "acme"})
    assert admin.decrypt(blob, context={"tenant": "acme"}) == b"card 4111"
    with local(estate[0], "app1") as led:  # the same ciphertext format as a local ledger's
        assert led.decrypt(blob, context={"tenant": "acme"}) == b"card 4111"
    dk = admin.generate_data_key("orders")
    assert isinstance(dk, kl.DataKey) and len(dk.plaintext) == 32
    assert admin.decrypt(dk.wrapped) == dk.plaintext
    sig = admin.sign("signer", b"msg")
    assert admin.verify("signer", b"msg", sig) and not admin.verify("signer", b"other", sig)
    pub = load_pem_public_key(admin.public_key_pem("signer").encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"msg", ec.ECDSA(hashes.SHA256()))
    tag = admin.mac("macs", b"msg")
    assert admin.verify_mac("macs", b"msg", tag) and not admin.verify_mac("macs", b"x", tag)
    env = admin.envelope_encrypt("orders", b"x" * 10_000)
    assert admin.envelope_decrypt(env) == b"x" * 10_000
    assert admin.capabilities() == local_capabilities(estate[0])


# -- errors ---------------------------------------------------------------------------------------
def test_errors_raise_the_same_classes(estate, admin):
    server, keys = estate
    with pytest.raises(kl.KeyNotFound, match="no-such"):
        admin.get_key("no-such")
    with pytest.raises(kl.InvalidCiphertext):
        admin.decrypt(b"KL" + b"\0" * 60)
    with pytest.raises(kl.PolicyViolation):
        admin.schedule_deletion("orders", 3)
    with connect(server, keys["app1"]) as app1, pytest.raises(kl.AccessDenied):
        app1.rotate("orders")
    with pytest.raises(kl.InvalidInput):
        admin.create_key("bad name!", spec="AES_256")


def local_capabilities(server):
    with local(server) as led:
        return led.capabilities()
