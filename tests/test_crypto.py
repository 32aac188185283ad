"""Must show: crypto behaviour users rely on, on a real SoftHSM2 token.

Signatures are checked by two independent verifiers (the `openssl` CLI and pyca/cryptography)
from the exported PEM; ciphertext context binding, rewrap, data keys, envelopes, minimum
decryption version, compromise handling, purpose enforcement and capability reporting.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

import keyledger as kl
from keyledger import ciphertext as ct
from keyledger.hsm.gcm_params import AAD_MAX

OPENSSL = shutil.which("openssl")
CTX = {"tenant": "acme", "table": "orders"}


def ciphertext_version(blob: bytes) -> int:
    assert blob[:2] == b"KL"
    return struct.unpack(">I", blob[20:24])[0]


# -- 3. signatures verify outside keyledger -------------------------------------------------------
def openssl_verify(spec: str, pem: Path, sig: Path, msg: Path) -> subprocess.CompletedProcess:
    if spec.startswith("RSA"):
        cmd = [OPENSSL, "dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss",
               "-sigopt", "rsa_pss_saltlen:32", "-verify", pem, "-signature", sig, msg]
    elif spec == "ED25519":
        cmd = [OPENSSL, "pkeyutl", "-verify", "-pubin", "-inkey", pem, "-rawin", "-in", msg,
               "-sigfile", sig]
    else:
        digest = "-sha384" if spec == "EC_P384" else "-sha256"
        cmd = [OPENSSL, "dgst", digest, "-verify", pem, "-signature", sig, msg]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)


def cryptography_verifies(spec: str, pem: str, sig: bytes, msg: bytes) -> bool:
    pub = serialization.load_pem_public_key(pem.encode())
    try:
        if spec.startswith("RSA"):
            assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == int(spec[4:])
            pub.verify(sig, msg, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                       hashes.SHA256())
        elif spec == "ED25519":
            assert isinstance(pub, ed25519.Ed25519PublicKey)
            pub.verify(sig, msg)
        else:
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            curve, digest = ((ec.SECP384R1, hashes.SHA384()) if spec == "EC_P384"
                             else (ec.SECP256R1, hashes.SHA256()))
            assert isinstance(pub.curve, curve)
            pub.verify(sig, msg, ec.ECDSA(digest))
    except InvalidSignature:
        return False
    return True


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl CLI")
@pytest.mark.parametrize("spec", ["RSA_2048", "RSA_3072", "EC_P256", "EC_P384", "ED25519"])
def test_signatures_verify_with_openssl_and_cryptography(ledger, tmp_path, spec):
    ledger.create_key("signer", spec=spec)
    message = b"invoice 2026-0042: pay 1,337.00 EUR to ACME\n" * 50
    signature = ledger.sign("signer", message)
    pem = ledger.public_key_pem("signer")
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    if spec.startswith("EC"):
        assert signature[0] == 0x30  # DER SEQUENCE, not raw r||s
    if spec == "ED25519":
        assert len(signature) == 64

    pem_file, sig_file = tmp_path / "pub.pem", tmp_path / "sig.bin"
    msg_file, bad_file = tmp_path / "msg.bin", tmp_path / "bad.bin"
    pem_file.write_text(pem)
    sig_file.write_bytes(signature)
    msg_file.write_bytes(message)
    bad_file.write_bytes(message[:-1] + b"?")

    ok = openssl_verify(spec, pem_file, sig_file, msg_file)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Verified OK" in ok.stdout or "Signature Verified Successfully" in ok.stdout
    assert cryptography_verifies(spec, pem, signature, message)
    assert ledger.verify("signer", message, signature)

    bad = openssl_verify(spec, pem_file, sig_file, bad_file)
    assert bad.returncode != 0
    assert "Verified OK" not in bad.stdout and "Successfully" not in bad.stdout
    assert not cryptography_verifies(spec, pem, signature, message[:-1] + b"?")
    assert not ledger.verify("signer", message[:-1] + b"?", signature)


def test_public_key_pem_per_version(ledger):
    ledger.create_key("s", spec="EC_P256")
    sig1 = ledger.sign("s", b"m")
    pem1 = ledger.public_key_pem("s")
    ledger.rotate("s")
    sig2 = ledger.sign("s", b"m")
    pem2 = ledger.public_key_pem("s")
    assert pem1 != pem2
    assert ledger.public_key_pem("s", version=1) == pem1
    assert cryptography_verifies("EC_P256", pem1, sig1, b"m")
    assert cryptography_verifies("EC_P256", pem2, sig2, b"m")
    assert not cryptography_verifies("EC_P256", pem1, sig2, b"m")


def test_symmetric_key_has_no_public_key(ledger):
    ledger.create_key("k", spec="AES_256")
    with pytest.raises(kl.PolicyViolation, match="symmetric"):
        ledger.public_key_pem("k")


def test_hmac_matches_a_tag_only_the_key_makes(ledger):
    ledger.create_key("m", spec="HMAC_SHA256")
    tag = ledger.mac("m", b"payload")
    assert len(tag) == 32
    assert ledger.mac("m", b"payload") == tag  # deterministic
    assert ledger.verify_mac("m", b"payload", tag)
    assert not ledger.verify_mac("m", b"payload!", tag)
    assert not ledger.verify_mac("m", b"payload", bytes(32))


# -- 4. ciphertext ---------------------------------------------------------------------------------
@pytest.fixture
def aes(ledger):
    ledger.create_key("orders", spec="AES_256")
    return ledger


def test_ciphertext_is_self_describing_and_randomised(aes):
    a = aes.encrypt("orders", b"card 4111", context=CTX)
    b = aes.encrypt("orders", b"card 4111", context=CTX)
    assert a != b  # fresh nonce each time
    assert b"card 4111" not in a
    assert ciphertext_version(a) == 1
    assert len(a) == 36 + len(b"card 4111") + 16
    assert aes.decrypt(a, context=CTX) == aes.decrypt(b, context=CTX) == b"card 4111"


def test_context_binding(aes):
    blob = aes.encrypt("orders", b"secret", context=CTX)
    assert aes.decrypt(blob, context=dict(reversed(list(CTX.items())))) == b"secret"  # order-free
    for wrong in ({"tenant": "evil", "table": "orders"}, {"tenant": "acme"},
                  {**CTX, "extra": "x"}, None, {}):
        with pytest.raises(kl.InvalidCiphertext):
            aes.decrypt(blob, context=wrong)
    plain = aes.encrypt("orders", b"secret")
    assert aes.decrypt(plain) == b"secret"
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(plain, context=CTX)


def _sized_context(aad_len: int) -> dict[str, str]:
    """An encryption context whose AAD (the 36-byte header and the canonical context) is
    ``aad_len`` bytes long."""
    pad = aad_len - ct.HEADER_LEN - len(ct.canonical_context({"c": ""}))
    return {"c": "x" * pad}


@pytest.mark.parametrize("aad_len", [60, AAD_MAX, AAD_MAX + 1, 5000])
def test_the_hsm_gcm_parameter_of_any_aad_length_is_standard_aes_gcm(aes, aad_len):
    """Single calls hand the HSM a raw CK_GCM_PARAMS over the process's nonce and AAD buffers
    (hsm/gcm_params.py), an AAD longer than the buffer a GCMParams; batches build a GCMParams
    per item. Either way it is the same AES-GCM over header + context: what one path encrypts
    the other decrypts, and a context one byte different is refused."""
    ctx = _sized_context(aad_len)
    singles = [aes.encrypt("orders", bytes([i]) * 32, context=ctx) for i in range(3)]
    batch = aes.encrypt_many("orders", [bytes([i]) * 32 for i in range(3)], context=ctx)
    expected = [bytes([i]) * 32 for i in range(3)]
    assert aes.decrypt_many(singles, context=ctx) == expected
    assert [aes.decrypt(b, context=ctx) for b in batch + singles] == expected * 2
    wrong = {"c": ctx["c"][:-1] + "y"}
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(singles[0], context=wrong)
    assert aes.decrypt(singles[1], context=ctx) == expected[1]  # the buffers hold no stale AAD


def test_tampering_is_detected(aes):
    blob = aes.encrypt("orders", b"secret data", context=CTX)
    for i in (2, 3, 10, 23, 30, 40, len(blob) - 1):  # header, key id, version, nonce, body, tag
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(kl.InvalidCiphertext):
            aes.decrypt(bytes(bad), context=CTX)
    for cut in (blob[:-1], blob[:40], b"", b"KL"):
        with pytest.raises(kl.InvalidCiphertext):
            aes.decrypt(cut, context=CTX)


def test_version_field_moved_to_another_live_version_is_detected(aes):
    blob = aes.encrypt("orders", b"secret", context=CTX)
    aes.rotate("orders")
    moved = blob[:20] + struct.pack(">I", 2) + blob[24:]
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(moved, context=CTX)


def test_version_field_naming_unknown_version_is_invalid_ciphertext(aes):
    blob = aes.encrypt("orders", b"secret", context=CTX)
    tampered = blob[:20] + struct.pack(">I", 257) + blob[24:]
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(tampered, context=CTX)


def test_ciphertext_cannot_move_to_another_key(aes):
    aes.create_key("other", spec="AES_256")
    blob = aes.encrypt("orders", b"secret")
    other = aes.get_key("other")
    moved = blob[:4] + uuid.UUID(other.key_id).bytes + blob[20:]
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(moved)


def test_rewrap_moves_to_latest_version(aes):
    old = aes.encrypt("orders", b"ledger row", context=CTX)
    aes.rotate("orders")
    aes.rotate("orders")
    new = aes.rewrap(old, context=CTX)
    assert ciphertext_version(old) == 1 and ciphertext_version(new) == 3
    assert aes.decrypt(new, context=CTX) == b"ledger row"
    assert aes.decrypt(old, context=CTX) == b"ledger row"
    with pytest.raises(kl.InvalidCiphertext):
        aes.rewrap(old, context={"tenant": "evil"})
    # once rewrapped, old versions can be retired
    aes.set_policy("orders", min_decryption_version=3)
    assert aes.decrypt(new, context=CTX) == b"ledger row"
    with pytest.raises(kl.KeyStateError):
        aes.decrypt(old, context=CTX)


def test_generate_data_key(aes):
    dk = aes.generate_data_key("orders", context=CTX)
    assert isinstance(dk.plaintext, bytes) and len(dk.plaintext) == 32
    assert dk.key == "orders" and dk.version == 1
    assert ciphertext_version(dk.wrapped) == 1
    assert aes.decrypt(dk.wrapped, context=CTX) == dk.plaintext
    with pytest.raises(kl.InvalidCiphertext):
        aes.decrypt(dk.wrapped)
    for shown in (repr(dk), str(dk), f"{dk}"):
        assert dk.plaintext.hex() not in shown
        assert repr(dk.plaintext) not in shown
        assert "orders" in shown
    assert aes.generate_data_key("orders").plaintext != dk.plaintext


def test_envelope_5mb(aes):
    data = os.urandom(5 * 1024 * 1024)
    blob = aes.envelope_encrypt("orders", data, context=CTX)
    assert len(data) < len(blob) < len(data) + 256
    assert data[:4096] not in blob
    assert aes.envelope_decrypt(blob, context=CTX) == data
    with pytest.raises(kl.InvalidCiphertext):
        aes.envelope_decrypt(blob, context={"tenant": "evil", "table": "orders"})
    with pytest.raises(kl.InvalidCiphertext):
        aes.envelope_decrypt(blob)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x80
    with pytest.raises(kl.InvalidCiphertext):
        aes.envelope_decrypt(bytes(bad), context=CTX)
    # rotation does not break envelopes
    aes.rotate("orders")
    assert aes.envelope_decrypt(blob, context=CTX) == data


def test_min_decryption_version(aes):
    v1 = aes.encrypt("orders", b"one", context=CTX)
    aes.rotate("orders")
    v2 = aes.encrypt("orders", b"two", context=CTX)
    key = aes.set_policy("orders", min_decryption_version=2)
    assert key.min_decryption_version == 2
    with pytest.raises(kl.KeyStateError) as err:
        aes.decrypt(v1, context=CTX)
    assert "minimum decryption version" in str(err.value)
    assert aes.decrypt(v2, context=CTX) == b"two"
    with pytest.raises(kl.PolicyViolation):
        aes.set_policy("orders", min_decryption_version=3)  # above latest
    aes.set_policy("orders", min_decryption_version=1)
    assert aes.decrypt(v1, context=CTX) == b"one"
    assert aes.list_keys().set_index("name").loc["orders", "min_decryption_version"] == 1


def test_min_decryption_version_applies_to_signatures(ledger):
    ledger.create_key("s", spec="ED25519")
    sig1 = ledger.sign("s", b"m")
    ledger.rotate("s")
    sig2 = ledger.sign("s", b"m")
    ledger.set_policy("s", min_decryption_version=2)
    assert not ledger.verify("s", b"m", sig1)
    assert ledger.verify("s", b"m", sig2)
    ledger.set_policy("s", min_decryption_version=1)
    assert ledger.verify("s", b"m", sig1)


def test_mark_compromised(aes):
    old = aes.encrypt("orders", b"before", context=CTX)
    key = aes.mark_compromised("orders", reason="key file seen in a public bucket")
    assert key.state is kl.KeyState.COMPROMISED
    with pytest.raises(kl.KeyStateError) as err:
        aes.encrypt("orders", b"after", context=CTX)
    assert "compromised" in str(err.value) and "rotate" in str(err.value)
    with pytest.raises(kl.KeyStateError):
        aes.generate_data_key("orders")
    assert aes.decrypt(old, context=CTX) == b"before"
    key = aes.rotate("orders", reason="compromise recovery")
    assert key.state is kl.KeyState.ACTIVE and key.latest_version == 2
    assert key.versions[1].state == "compromised"
    new = aes.encrypt("orders", b"after", context=CTX)
    assert ciphertext_version(new) == 2
    assert aes.decrypt(new, context=CTX) == b"after"
    assert aes.decrypt(old, context=CTX) == b"before"


def test_mark_compromised_signing_key(ledger):
    ledger.create_key("s", spec="EC_P384")
    sig = ledger.sign("s", b"m")
    ledger.mark_compromised("s", reason="HSM backup lost")
    with pytest.raises(kl.KeyStateError, match="compromised"):
        ledger.sign("s", b"m")
    assert ledger.verify("s", b"m", sig)
    ledger.rotate("s")
    assert ledger.verify("s", b"m", ledger.sign("s", b"m"), version=2)


def test_purpose_is_enforced(ledger):
    ledger.create_key("s", spec="EC_P256")
    ledger.create_key("m", spec="HMAC_SHA256")
    ledger.create_key("e", spec="AES_256")
    cases = [
        (lambda: ledger.encrypt("s", b"x"), "'s'"),
        (lambda: ledger.generate_data_key("s"), "'s'"),
        (lambda: ledger.envelope_encrypt("s", b"x"), "'s'"),
        (lambda: ledger.encrypt("m", b"x"), "'m'"),
        (lambda: ledger.sign("e", b"x"), "'e'"),
        (lambda: ledger.mac("e", b"x"), "'e'"),
        (lambda: ledger.sign("m", b"x"), "'m'"),
        (lambda: ledger.mac("s", b"x"), "'s'"),
    ]
    for call, name in cases:
        with pytest.raises(kl.PolicyViolation) as err:
            call()
        assert name in str(err.value) and "key" in str(err.value)


def test_sign_purpose_key_refuses_encrypt_message(ledger):
    ledger.create_key("s", spec="RSA_2048", purpose="sign")
    with pytest.raises(kl.PolicyViolation) as err:
        ledger.encrypt("s", b"x")
    msg = str(err.value)
    assert "sign key" in msg and "encrypt" in msg


def _softhsm_version() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        return ""
    return subprocess.run([util, "--version"], capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(_softhsm_version() != "2.6.1", reason="facts measured on SoftHSM 2.6.1")
def test_capabilities_report_softhsm_gaps(ledger):
    caps = ledger.capabilities()
    assert caps.supports["RSA_OAEP_SHA256"] is False
    assert caps.supports["ECDSA_SHA256"] is False
    for ok in ("AES_GCM", "AES_KEY_WRAP_PAD", "SHA256_HMAC", "RSA_PSS_SHA256", "ECDSA", "EDDSA"):
        assert caps.supports[ok] is True, ok
    assert "SoftHSM" in caps.manufacturer
    text = str(caps)
    assert "lacks" in text and "RSA_OAEP_SHA256" in text.split("lacks", 1)[1]
    # probing left the logged-in session usable
    assert ledger.capabilities() == caps
    ledger.create_key("after", spec="AES_256")
    assert ledger.decrypt(ledger.encrypt("after", b"ok")) == b"ok"
