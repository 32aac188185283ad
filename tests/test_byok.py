"""Key import (BYOK) and wrapped export, on a real SoftHSM2 token.

The client side is exactly the code printed in docs/byok.md, and keyledger's ciphertexts are
decrypted with exactly the recipe printed in docs/ciphertext.md (section 4): if either page
drifts from the implementation, these tests fail.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import keyledger as kl
from keyledger.byok import IMPORT_TTL, WrappedKey

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _doc_code(page: str, marker: str) -> dict:
    """Run the ```python block of docs/<page> that contains ``marker``; return its names."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    code = next(b for b in blocks if marker in b)
    scope: dict = {}
    exec(textwrap.dedent(code), scope)  # the documented code, as printed
    return scope


@pytest.fixture(scope="module")
def client() -> dict:
    """What a customer runs: docs/byok.md for wrapping, docs/ciphertext.md for decrypting."""
    return {**_doc_code("byok.md", "def wrap_for_import"),
            **_doc_code("byok.md", "def unwrap_export"),
            "decrypt": _doc_code("ciphertext.md", "def decrypt(raw_key")["decrypt"]}


@pytest.fixture(scope="module")
def recipient() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _pem(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_import_round_trip_with_the_documented_client_code(ledger, client, clock):
    params = ledger.import_parameters("byok")
    assert params["oaep_hash"] in ("sha1", "sha256")
    assert params["expires_at"] == clock.now + IMPORT_TTL
    assert "AES_256" in params["specs"]
    material = AESGCM.generate_key(bit_length=256)  # generated on the customer's side
    wrapped = client["wrap_for_import"](params, material)
    assert len(wrapped) == 424

    key = ledger.import_key("byok", spec="AES_256", wrapped=wrapped, token=params["token"],
                            owner="payments", tags={"origin": "customer"})
    assert (key.spec.name, key.latest_version, key.exportable) == ("AES_256", 1, False)
    assert key.owner == "payments" and key.tags == {"origin": "customer"}
    assert key.policy.get("auto_rotate") is False

    attrs = ledger.key_attributes("byok")
    assert attrs.sensitive is True and attrs.extractable is False

    # keyledger's ciphertexts open with the customer's material and docs/ciphertext.md only
    for context in ({"tenant": "acme", "ünï": "cödé"}, None):
        blob = ledger.encrypt("byok", b"card 4111 1111", context=context)
        assert client["decrypt"](material, blob, context) == b"card 4111 1111"
    # and the other way: a ciphertext made outside keyledger with that material decrypts inside
    header = blob[:36]
    nonce = os.urandom(12)
    mine = header[:24] + nonce
    mine += AESGCM(material).encrypt(nonce, b"made outside", mine)
    assert ledger.decrypt(mine) == b"made outside"

    audit = ledger.audit(key="byok")
    assert audit["action"].tolist()[:2] == ["import_parameters", "import_key"]
    assert set(audit["outcome"]) == {"ok"}
    with ledger._rt.db.read() as tx:
        actions = tx.execute("SELECT t.action FROM transitions t JOIN keys k USING (key_id) "
                             "WHERE k.name = 'byok'").fetchall()
        tokens = tx.execute("SELECT used_by, destroyed_at IS NOT NULL FROM import_tokens "
                            "WHERE token = ?", [params["token"]]).fetchall()
    assert actions == [("import",)]
    assert tokens == [("alice", True)]  # used once, its HSM wrapping key destroyed


def test_import_token_rules(ledger, client, clock, recipient):
    params = ledger.import_parameters("byok")
    material = os.urandom(32)
    wrapped = client["wrap_for_import"](params, material)
    token = params["token"]

    with pytest.raises(kl.InvalidInput, match="424 bytes"):
        ledger.import_key("byok", spec="AES_256", wrapped=wrapped[:-8], token=token)
    with pytest.raises(kl.InvalidInput, match="AES_256 and AES_128"):
        ledger.import_key("byok", spec="HMAC_SHA256", wrapped=wrapped, token=token)
    with pytest.raises(kl.InvalidInput, match="unknown import token"):
        ledger.import_key("byok", spec="AES_256", wrapped=wrapped, token="0" * 32)
    with pytest.raises(kl.PolicyViolation, match="issued for key 'byok'"):
        ledger.import_key("other", spec="AES_256", wrapped=wrapped, token=token)
    tampered = bytearray(wrapped)
    tampered[-3] ^= 0x01
    with pytest.raises(kl.InvalidCiphertext, match="could not be unwrapped"):
        ledger.import_key("byok", spec="AES_256", wrapped=bytes(tampered), token=token)
    stranger = recipient  # an RSA-3072 key that is not the token's: the module's escrow key
    foreign = client["wrap_for_import"]({**params, "public_key_pem": _pem(stranger)}, material)
    with pytest.raises(kl.InvalidCiphertext):
        ledger.import_key("byok", spec="AES_256", wrapped=foreign, token=token)
    with pytest.raises(kl.KeyNotFound):  # none of the failures left a key behind
        ledger.get_key("byok")
    assert ledger.reconcile().clean  # ... nor an intent or an orphan

    ledger.import_key("byok", spec="AES_256", wrapped=wrapped, token=token)  # still usable
    with pytest.raises(kl.KeyExists):
        ledger.import_key("byok", spec="AES_256", wrapped=wrapped, token=token)
    with pytest.raises(kl.KeyExists):
        ledger.import_parameters("byok")

    late = ledger.import_parameters("late")
    clock.advance(hours=25)
    with pytest.raises(kl.PolicyViolation, match="expired"):
        ledger.import_key("late", spec="AES_256",
                          wrapped=client["wrap_for_import"](late, material), token=late["token"])


def test_import_of_a_short_key_as_aes256_is_refused(ledger, client):
    """SoftHSM would take any length as "AES": the size is enforced."""
    params = ledger.import_parameters("weak")
    wrapped = client["wrap_for_import"](params, os.urandom(25))  # wraps to the AES-256 length
    assert len(wrapped) == 424
    with pytest.raises(kl.InvalidInput, match="not a valid AES key"):
        ledger.import_key("weak", spec="AES_256", wrapped=wrapped, token=params["token"])
    ok = ledger.import_key("weak", spec="AES_128", token=params["token"],
                           wrapped=client["wrap_for_import"](params, os.urandom(16)))
    assert ok.spec.name == "AES_128"


def test_export_of_a_non_exportable_key_is_refused(ledger, recipient):
    ledger.create_key("locked", spec="AES_256")
    with pytest.raises(kl.PolicyViolation, match="not exportable"):
        ledger.export_key("locked", _pem(recipient))
    params = ledger.import_parameters("imported")  # imported keys are not exportable either
    wrapped = _doc_code("byok.md", "def wrap_for_import")["wrap_for_import"](params, os.urandom(32))
    ledger.import_key("imported", spec="AES_256", wrapped=wrapped, token=params["token"])
    with pytest.raises(kl.PolicyViolation, match="not exportable"):
        ledger.export_key("imported", _pem(recipient))
    records = ledger.audit(action="export_key")
    assert records[["outcome", "error"]].values.tolist() == [["failed", "PolicyViolation"]] * 2


def test_export_unwraps_client_side_to_material_that_decrypts(ledger, client, recipient):
    ledger.create_key("escrowed", spec="AES_256", exportable=True)
    ctx = {"tenant": "acme"}
    old = ledger.encrypt("escrowed", b"version one", context=ctx)
    ledger.rotate("escrowed")
    new = ledger.encrypt("escrowed", b"version two", context=ctx)

    latest = ledger.export_key("escrowed", _pem(recipient))
    assert isinstance(latest, WrappedKey) and latest.version == 2 and latest.format == "raw"
    assert "escrowed" in repr(latest) and latest.wrapped.hex() not in repr(latest)
    material = client["unwrap_export"](recipient, latest)
    assert len(material) == 32
    assert client["decrypt"](material, new, ctx) == b"version two"

    first = ledger.export_key("escrowed", _pem(recipient).encode(), version=1)
    as_json = first.to_dict()  # what travels to the escrow holder
    assert WrappedKey.from_dict(as_json) == first
    assert client["decrypt"](client["unwrap_export"](recipient, as_json), old, ctx) == \
        b"version one"
    detail = ledger.audit(action="export_key")["detail"].tolist()
    assert detail[0].startswith("v2 wrapped for RSA-3072")
    assert all(latest.wrapping_key_sha256[:16] in d for d in detail)


def test_export_of_private_keys_gives_pkcs8(ledger, client, recipient):
    for spec in ("RSA_2048", "EC_P256"):
        ledger.create_key(f"sig-{spec}", spec=spec, exportable=True)
        w = ledger.export_key(f"sig-{spec}", _pem(recipient))
        assert w.format == "pkcs8"
        private = serialization.load_der_private_key(client["unwrap_export"](recipient, w), None)
        public = serialization.load_pem_public_key(ledger.public_key_pem(f"sig-{spec}").encode())
        assert private.public_key().public_numbers() == public.public_numbers()


def test_export_argument_checks_and_roles(ledger, recipient, clock):
    ledger.create_key("escrowed", spec="AES_256", exportable=True)
    with pytest.raises(kl.InvalidInput, match="PEM"):
        ledger.export_key("escrowed", "not a key")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(kl.InvalidInput, match="at least 2048"):
        ledger.export_key("escrowed", _pem(small))
    with pytest.raises(kl.InvalidInput, match="RSA"):
        ledger.export_key("escrowed", _pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(kl.KeyStateError):
        ledger.export_key("escrowed", _pem(recipient), version=7)
    ledger.disable("escrowed")
    with pytest.raises(kl.KeyStateError, match="suspended"):
        ledger.export_key("escrowed", _pem(recipient))
    ledger.enable("escrowed")

    ledger.grant("escrowed", "bob", "user")
    with kl.open(ledger.home, principal="bob", clock=clock) as bob:
        with pytest.raises(kl.AccessDenied):
            bob.export_key("escrowed", _pem(recipient))
        with pytest.raises(kl.AccessDenied):
            bob.import_parameters("bobs")


def test_export_under_quorum_runs_after_approval_and_is_delivered_once(ledger, client,
                                                                       recipient, clock):
    ledger.create_key("escrowed", spec="AES_256", exportable=True)
    blob = ledger.encrypt("escrowed", b"escrow me")
    ledger.grant("*", "bob", "admin")
    ledger.set_policy("escrowed", quorum=2)
    pem = _pem(recipient)
    with pytest.raises(kl.PolicyViolation, match="2 distinct admins"):
        ledger.export_key("escrowed", pem)
    request_id = ledger.request("export_key", "escrowed", "escrow copy for the vault",
                                wrapping_key_pem=pem)
    with kl.open(ledger.home, principal="bob", clock=clock) as bob:
        assert bob.approve(request_id)["executed"] is True
    w = ledger.export_key("escrowed", pem)  # the approved result, for the requester
    assert client["decrypt"](client["unwrap_export"](recipient, w), blob, None) == b"escrow me"
    with pytest.raises(kl.PolicyViolation):  # delivered once; a new export needs a new approval
        ledger.export_key("escrowed", pem)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    request_id = ledger.request("export_key", "escrowed", "second copy",
                                wrapping_key_pem=_pem(other))
    with kl.open(ledger.home, principal="bob", clock=clock) as bob:
        bob.approve(request_id)
    with pytest.raises(kl.PolicyViolation):  # held for the key it was approved for only
        ledger.export_key("escrowed", pem)
    assert client["unwrap_export"](other, ledger.export_key("escrowed", _pem(other)))


def test_import_needs_the_quorum(ledger, client):
    ledger.grant("*", "bob", "admin")
    ledger.set_policy("*", quorum=2)
    params = ledger.import_parameters("byok")
    wrapped = client["wrap_for_import"](params, os.urandom(32))
    with pytest.raises(kl.PolicyViolation, match="2 distinct admins"):
        ledger.import_key("byok", spec="AES_256", wrapped=wrapped, token=params["token"])


def test_import_under_quorum_runs_after_approval(ledger, client, clock):
    ledger.grant("*", "bob", "admin")
    ledger.set_policy("*", quorum=2)
    params = ledger.import_parameters("byok")
    material = os.urandom(32)
    wrapped = client["wrap_for_import"](params, material)
    request_id = ledger.request("import_key", "byok", "customer key for payments",
                                spec="AES_256", wrapped=wrapped.hex(), token=params["token"])
    with kl.open(ledger.home, principal="bob", clock=clock) as bob:
        assert bob.approve(request_id)["executed"] is True
        # the approval that met the quorum ran the import: bob is its creator (and user)
        assert client["decrypt"](material, bob.encrypt("byok", b"x"), None) == b"x"
    assert ledger.requests()[["key", "status"]].values.tolist() == [["byok", "executed"]]
