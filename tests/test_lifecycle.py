"""Must show: the full lifecycle of every key spec on a real SoftHSM2 token, checked from both
sides (the service, and the token itself through `pkcs11-tool` in another process)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
from pathlib import Path

import pandas as pd
import pytest
from conftest import hsm_objects as token_objects

import keyledger as kl
from keyledger.model import Family

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PKCS11_TOOL = shutil.which("pkcs11-tool")
CTX = {"tenant": "acme", "purpose": "lifecycle-test"}
MSG = b"the quick brown fox pays 42 EUR"

pytestmark = pytest.mark.skipif(PKCS11_TOOL is None or not os.path.exists(MODULE),
                                reason="needs SoftHSM2 and pkcs11-tool (opensc)")


# -- the token as another process sees it ----------------------------------------------------------
def hsm_objects(home: Path) -> list[dict[str, str]]:
    """Every object on the home's token, as another process (pkcs11-tool) sees it."""
    return token_objects(home)


def key_objects(home: Path) -> list[tuple[str, str, str, str]]:
    """The keyledger key objects (labels "kl:<name>:v<n>") as sorted (label, id, type, access).

    Audit-head data objects are left out: the background ingester replaces them at any time."""
    return sorted((o["label"], o.get("id", ""), o["type"], o.get("access", ""))
                  for o in hsm_objects(home) if o.get("label", "").startswith("kl:"))


def objects_labelled(home: Path, label: str) -> list[dict[str, str]]:
    return [o for o in hsm_objects(home) if o.get("label") == label]


def access_flags(obj: dict[str, str]) -> set[str]:
    return {a.strip() for a in obj.get("access", "").split(",") if a.strip()}


def is_secret_object(obj: dict[str, str]) -> bool:
    return obj["type"].startswith(("Private Key Object", "Secret Key Object"))


# -- using a key whatever its family ---------------------------------------------------------------
def family(spec: str) -> Family:
    return kl.SPECS[spec].family


def protect_action(spec: str) -> str:
    return {Family.AES: "encrypt", Family.HMAC: "mac"}.get(family(spec), "sign")


def protect(led: kl.KeyLedger, name: str, spec: str, msg: bytes = MSG) -> bytes:
    """Apply protection: encrypt (AES), mac (HMAC) or sign (asymmetric)."""
    fam = family(spec)
    if fam is Family.AES:
        return led.encrypt(name, msg, context=CTX)
    if fam is Family.HMAC:
        return led.mac(name, msg)
    return led.sign(name, msg)


def process(led: kl.KeyLedger, name: str, spec: str, out: bytes, msg: bytes = MSG,
            version: int | None = None) -> bool:
    """Check protection: decrypt (AES) or verify. True when the output checks out."""
    fam = family(spec)
    if fam is Family.AES:
        return led.decrypt(out, context=CTX) == msg
    if fam is Family.HMAC:
        return led.verify_mac(name, msg, out, version=version)
    return led.verify(name, msg, out, version=version)


def ciphertext_version(blob: bytes) -> int:
    """The key version named in a keyledger ciphertext header (bytes 20..24, big-endian)."""
    assert blob[:2] == b"KL"
    return struct.unpack(">I", blob[20:24])[0]


def assert_use_refused(led, name, spec, outputs, state: str) -> None:
    with pytest.raises(kl.KeyStateError) as err:
        protect(led, name, spec)
    assert state in str(err.value) and repr(name) in str(err.value)
    for out in outputs:
        with pytest.raises(kl.KeyStateError, match=state):
            process(led, name, spec, out)


def assert_usable(led, name, spec, outputs) -> bytes:
    for out in outputs:
        assert process(led, name, spec, out)
    fresh = protect(led, name, spec)
    assert process(led, name, spec, fresh)
    return fresh


# -- 1. every spec, from creation to destruction -------------------------------------------------------
@pytest.mark.parametrize("spec", list(kl.SPECS))
def test_full_lifecycle(ledger, clock, spec):
    home = ledger.home
    name = f"life-{spec.lower()}"
    key = ledger.create_key(name, spec=spec)
    assert (key.state, key.latest_version, key.spec.name) == (kl.KeyState.ACTIVE, 1, spec)

    # use v1
    out1 = protect(ledger, name, spec)
    assert process(ledger, name, spec, out1)
    if family(spec) is Family.AES:
        assert ciphertext_version(out1) == 1
    else:
        assert not process(ledger, name, spec, out1, msg=b"another message")

    # rotate: old output still checks out, new output is made by version 2
    clock.advance(days=30)
    key = ledger.rotate(name)
    assert key.latest_version == 2 and key.state is kl.KeyState.ACTIVE
    assert process(ledger, name, spec, out1)
    out2 = protect(ledger, name, spec)
    assert process(ledger, name, spec, out2)
    assert ledger.audit(key=name, action=protect_action(spec))["version"].tolist() == [1, 2]
    if family(spec) is Family.AES:
        assert ciphertext_version(out2) == 2
    else:
        assert process(ledger, name, spec, out2, version=2)
        assert not process(ledger, name, spec, out2, version=1)
        assert process(ledger, name, spec, out1, version=1)
    outputs = [out1, out2]

    # disable / enable
    assert ledger.disable(name).state is kl.KeyState.SUSPENDED
    assert_use_refused(ledger, name, spec, outputs, "suspended")
    assert ledger.enable(name).state is kl.KeyState.ACTIVE
    assert_usable(ledger, name, spec, outputs)

    # schedule deletion, cancel it, schedule again
    key = ledger.schedule_deletion(name, 7)
    assert key.state is kl.KeyState.PENDING_DELETION
    assert_use_refused(ledger, name, spec, outputs, "pending-deletion")
    key = ledger.cancel_deletion(name)
    assert key.state is kl.KeyState.ACTIVE and key.deletion_due is None
    assert_usable(ledger, name, spec, outputs)
    ledger.schedule_deletion(name, 7)

    # the token holds both versions, sensitive and never extractable (checked from outside)
    labels = [f"kl:{name}:v1", f"kl:{name}:v2"]
    per_version = 1 if kl.SPECS[spec].symmetric else 2  # secret key, or private + public
    objects = hsm_objects(home)
    for label in labels:
        mine = [o for o in objects if o.get("label") == label]
        assert len(mine) == per_version, (label, mine)
        secret = [o for o in mine if is_secret_object(o)]
        assert len(secret) == 1
        flags = access_flags(secret[0])
        assert {"sensitive", "always sensitive", "never extractable"} <= flags, flags
        assert "extractable" not in flags
    for v in (1, 2):
        attrs = ledger.key_attributes(name, version=v)
        assert attrs.sensitive and not attrs.extractable
        assert attrs.always_sensitive and attrs.never_extractable

    # destroy inside the waiting period: refused, nothing changed anywhere
    clock.advance(days=6, hours=23)
    before_df, before_hsm = ledger.list_keys(), key_objects(home)
    with pytest.raises(kl.PolicyViolation) as err:
        ledger.destroy(name)
    assert "waiting period" in str(err.value) and "cancel the deletion" in str(err.value)
    pd.testing.assert_frame_equal(before_df, ledger.list_keys())
    assert key_objects(home) == before_hsm
    assert ledger.get_key(name).state is kl.KeyState.PENDING_DELETION

    # past the window: destroyed; metadata kept; material gone; no further use
    clock.advance(hours=1, minutes=1)
    key = ledger.destroy(name)
    assert key.state is kl.KeyState.DESTROYED
    assert all(v.state == "destroyed" for v in key.versions.values())
    row = ledger.list_keys().set_index("name").loc[name]
    assert (row["state"], row["spec"], row["latest_version"]) == ("destroyed", spec, 2)
    assert ledger.get_key(name).state is kl.KeyState.DESTROYED
    assert_use_refused(ledger, name, spec, outputs, "destroyed")
    for action in (ledger.enable, ledger.rotate, ledger.disable, ledger.cancel_deletion):
        with pytest.raises(kl.KeyStateError, match="destroyed"):
            action(name)
    if not kl.SPECS[spec].symmetric:
        with pytest.raises(kl.KeyStateError):
            ledger.public_key_pem(name)
    after = hsm_objects(home)
    assert [o for o in after if o.get("label") in labels] == []
    gone_ids = {o["id"] for o in objects if o.get("label") in labels}
    assert not gone_ids & {o.get("id") for o in after}
    # the audit signing key on the same token is untouched
    audit_keys = [o for o in objects if o.get("label", "").startswith("keyledger-audit:")]
    assert len(audit_keys) == 2
    assert all(o in after for o in audit_keys)


def test_cancel_deletion_restores_suspended_state(ledger):
    ledger.create_key("k", spec="AES_256")
    blob = ledger.encrypt("k", b"x")
    ledger.disable("k")
    assert ledger.schedule_deletion("k", days=30).state is kl.KeyState.PENDING_DELETION
    key = ledger.cancel_deletion("k")
    assert key.state is kl.KeyState.SUSPENDED  # not silently re-activated
    with pytest.raises(kl.KeyStateError, match="suspended"):
        ledger.decrypt(blob)
    ledger.enable("k")
    assert ledger.decrypt(blob) == b"x"


def test_a_returned_key_is_a_snapshot_that_cannot_change_the_catalog(ledger):
    """get_key hands out a copy: a caller editing it (or its tags) changes nothing the ledger
    sees, and reassigning a field is refused outright."""
    ledger.create_key("k", spec="AES_256", tags={"team": "pay"})
    key = ledger.get_key("k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.state = kl.KeyState.DESTROYED
    key.tags["team"] = "mallory"
    key.versions.clear()
    again = ledger.get_key("k")
    assert again.tags == {"team": "pay"} and list(again.versions) == [1]
    assert ledger.list_keys().set_index("name").loc["k", "tags"] == {"team": "pay"}
    assert ledger.decrypt(ledger.encrypt("k", b"x")) == b"x"


def test_deletion_due_follows_the_injected_clock(ledger, clock):
    ledger.create_key("k", spec="HMAC_SHA256")
    key = ledger.schedule_deletion("k", days=10)
    assert key.deletion_due.replace(tzinfo=None) == (clock.now + pd.Timedelta(days=10)).replace(
        tzinfo=None)
    row = ledger.list_keys().set_index("name").loc["k"]
    assert row["deletion_due"] == pd.Timestamp(clock.now) + pd.Timedelta(days=10)
    clock.advance(days=10)
    assert ledger.destroy("k").state is kl.KeyState.DESTROYED


def test_destroyed_name_cannot_be_reused(ledger, clock):
    ledger.create_key("k", spec="AES_128")
    ledger.schedule_deletion("k", 7)
    clock.advance(days=8)
    ledger.destroy("k")
    with pytest.raises(kl.KeyExists):
        ledger.create_key("k", spec="AES_128")


# -- 2. key material attributes ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["AES_256", "HMAC_SHA256", "EC_P256", "ED25519"])
def test_exportable_keys_are_sensitive_but_extractable(ledger, spec):
    ledger.create_key("exp", spec=spec, exportable=True)
    ledger.create_key("locked", spec=spec)
    ledger.rotate("exp")
    for v in (1, 2):
        attrs = ledger.key_attributes("exp", version=v)
        assert attrs.sensitive and attrs.extractable and not attrs.never_extractable
    attrs = ledger.key_attributes("locked")
    assert attrs.sensitive and not attrs.extractable and attrs.never_extractable

    objects = hsm_objects(ledger.home)
    for label, extractable in (("kl:exp:v1", True), ("kl:exp:v2", True), ("kl:locked:v1", False)):
        secret = [o for o in objects if o.get("label") == label and is_secret_object(o)]
        assert len(secret) == 1, label
        flags = access_flags(secret[0])
        assert "sensitive" in flags
        if extractable:
            assert "extractable" in flags and "never extractable" not in flags, flags
        else:
            assert "never extractable" in flags and "extractable" not in flags, flags


def test_rsa_private_keys_are_sensitive_and_public_keys_readable(ledger):
    ledger.create_key("r", spec="RSA_2048")
    mine = objects_labelled(ledger.home, "kl:r:v1")
    types = sorted(o["type"].split(";")[0] for o in mine)
    assert types == ["Private Key Object", "Public Key Object"]
    private = next(o for o in mine if is_secret_object(o))
    assert {"sensitive", "never extractable"} <= access_flags(private)
    assert "BEGIN PUBLIC KEY" in ledger.public_key_pem("r")
