"""The HsmBackend protocol, one contract for both backends: PKCS#11 on a real SoftHSM2 token
and the in-memory one; then the service on the in-memory backend, and where it is refused."""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_python
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

import keyledger as kl
from keyledger.hsm import memory, pkcs11_backend
from keyledger.hsm.backend import DecryptFailed, HsmBackend, UnwrapFailed
from keyledger.hsm.softhsm import provision_embedded
from keyledger.model import SPECS

AES, HMAC = SPECS["AES_256"], SPECS["HMAC_SHA256"]
SIGNING = ["RSA_2048", "EC_P256", "EC_P384", "ED25519"]


@pytest.fixture(scope="module")
def token_backend(tmp_path_factory) -> Iterator[HsmBackend]:
    cfg = provision_embedded(tmp_path_factory.mktemp("token") / "home")
    backend = pkcs11_backend.connect(cfg)
    try:
        yield backend
    finally:
        pkcs11_backend.release(backend)


@pytest.fixture(params=["pkcs11", "memory"])
def backend(request) -> HsmBackend:
    if request.param == "memory":
        return memory.MemoryBackend("contract test")
    return request.getfixturevalue("token_backend")


def _handle() -> bytes:
    return uuid.uuid4().bytes


def _oaep(backend: HsmBackend) -> str:
    return "sha256" if backend.capabilities().supports.get("RSA_OAEP_SHA256") else "sha1"


# -- the protocol contract ----------------------------------------------------------------------
@pytest.mark.parametrize("impl", [pkcs11_backend.Pkcs11Backend, memory.MemoryBackend])
def test_both_backends_implement_every_method_of_the_protocol(impl):
    wanted = {n: m for n, m in vars(HsmBackend).items()
              if callable(m) and not n.startswith("_")}
    assert {"wrap_out", "new_unwrap_key", "unwrap_in", "exclusive", "snapshot_token"} <= set(wanted)
    for name, method in wanted.items():
        ours = inspect.signature(getattr(impl, name)).parameters
        assert list(ours) == list(inspect.signature(method).parameters), name


def test_aes_gcm_round_trip_and_tampering_fails(backend):
    h = _handle()
    backend.generate(AES, h, "t", exportable=False)
    nonce = os.urandom(12)
    body = backend.encrypt_gcm(h, nonce, b"aad", b"secret text")
    assert backend.decrypt_gcm(h, nonce, b"aad", body) == b"secret text"
    flipped = bytes([body[0] ^ 1]) + body[1:]
    for bad_aad, bad_body in ((b"aad", flipped), (b"other", body), (b"aad", body[:-1])):
        with pytest.raises(DecryptFailed):
            backend.decrypt_gcm(h, nonce, bad_aad, bad_body)
    attrs = backend.attributes(h)
    assert (attrs.sensitive, attrs.extractable) == (True, False)


@pytest.mark.parametrize("spec_name", SIGNING)
def test_sign_verify_and_the_public_key_checks_it_outside(backend, spec_name):
    spec, h = SPECS[spec_name], _handle()
    backend.generate(spec, h, "t", exportable=False)
    sig = backend.sign(spec, h, b"message")
    assert backend.verify(spec, h, b"message", sig)
    assert not backend.verify(spec, h, b"messagE", sig)
    assert not backend.verify(spec, h, b"message", b"\x30\x02garbage")
    pub = serialization.load_der_public_key(backend.public_key_der(spec, h))
    if spec_name.startswith("RSA"):  # the wire formats the docs promise: PSS-SHA256, DER ECDSA
        pub.verify(sig, b"message", padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                   hashes.SHA256())
    elif spec_name.startswith("EC"):
        pub.verify(sig, b"message", ec.ECDSA(hashes.SHA384() if spec.bits == 384
                                             else hashes.SHA256()))
    else:
        pub.verify(sig, b"message")


def test_hmac(backend):
    h = _handle()
    backend.generate(HMAC, h, "t", exportable=False)
    tag = backend.mac(h, b"journal line")
    assert len(tag) == 32 and backend.mac(h, b"journal line") == tag
    assert backend.verify_mac(h, b"journal line", tag)
    assert not backend.verify_mac(h, b"journal linE", tag)


def test_wrap_out_unwrap_in_moves_material_between_keys(backend):
    oaep = _oaep(backend)
    source, unwrap_key, target = _handle(), _handle(), _handle()
    backend.generate(AES, source, "export me", exportable=True)
    pem = serialization.load_der_public_key(backend.new_unwrap_key(unwrap_key, "u", 3072))
    blob = backend.wrap_out(AES, source, pem, oaep)
    assert len(blob) == 3072 // 8 + 40
    backend.unwrap_in(unwrap_key, oaep, blob, AES, target, "imported")
    nonce = os.urandom(12)
    assert backend.decrypt_gcm(target, nonce, b"",
                               backend.encrypt_gcm(source, nonce, b"", b"same key")) == b"same key"
    assert backend.attributes(target).extractable is False
    with pytest.raises(UnwrapFailed):  # altered in transit
        backend.unwrap_in(unwrap_key, oaep, blob[:-1] + bytes([blob[-1] ^ 1]), AES, _handle(),
                          "x")


def test_wrap_out_is_readable_by_the_recipient_and_refused_for_kept_keys(backend):
    oaep = _oaep(backend)
    recipient = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    h, kept = _handle(), _handle()
    backend.generate(AES, h, "t", exportable=True)
    blob = backend.wrap_out(AES, h, recipient.public_key(), oaep)
    algo = hashes.SHA256() if oaep == "sha256" else hashes.SHA1()
    eph = recipient.decrypt(blob[:256], padding.OAEP(padding.MGF1(algo), algo, None))
    material = aes_key_unwrap_with_padding(eph, blob[256:])
    nonce = os.urandom(12)
    assert AESGCM(material).decrypt(nonce, backend.encrypt_gcm(h, nonce, b"", b"hi"), b"") == b"hi"
    backend.generate(AES, kept, "t", exportable=False)
    with pytest.raises(kl.KeyStateError, match="not extractable"):
        backend.wrap_out(AES, kept, recipient.public_key(), oaep)


def test_missing_material_is_a_key_state_error_and_destroy_counts(backend):
    gone = _handle()
    assert not backend.exists(gone) and backend.destroy(gone) == 0
    with pytest.raises(kl.KeyStateError, match="missing from the HSM"):
        backend.encrypt_gcm(gone, os.urandom(12), b"", b"x")
    with pytest.raises(kl.KeyStateError, match="missing from the HSM"):
        backend.mac(gone, b"x")
    h = _handle()
    backend.generate(SPECS["EC_P256"], h, "t", exportable=False)
    assert backend.exists(h) and backend.destroy(h) == 2  # a key pair: two objects
    assert not backend.exists(h)


def test_data_objects_replace_and_exclusive_nests(backend):
    label = f"test:{uuid.uuid4()}"
    assert backend.get_data(label) == []
    backend.put_data(label, b"one")
    backend.put_data(label, b"two")
    assert backend.get_data(label) == [b"two"]
    with backend.exclusive(), backend.exclusive():  # re-entrant: the backend's calls work inside
        assert backend.get_data(label) == [b"two"]


def test_token_snapshot(backend):
    if isinstance(backend, memory.MemoryBackend):
        with pytest.raises(kl.ConfigError, match="cannot be backed up"):
            backend.snapshot_token()
        return
    files = {name: data for name, data, _, _ in backend.snapshot_token()}
    assert files["."] is None and any(n.endswith("token.object") for n in files)


# -- the service on the in-memory backend ---------------------------------------------------------
@pytest.fixture
def memory_ledger(tmp_path: Path, clock) -> Iterator[kl.KeyLedger]:
    memory.init_home(tmp_path / "mem")
    led = kl.open(tmp_path / "mem", principal="alice", clock=clock)
    try:
        yield led
    finally:
        led.close()


def test_lifecycle_through_kl_open_without_a_token(memory_ledger, clock):
    led = memory_ledger
    assert led.capabilities().module == "memory"
    assert not (led.home / "tokens").exists() and not (led.home / "softhsm2.conf").exists()
    led.create_key("orders", spec="AES_256")
    old = led.encrypt("orders", b"card 4111", context={"tenant": "acme"})
    clock.advance(days=1)
    assert led.rotate("orders").latest_version == 2
    new = led.encrypt("orders", b"card 4222")
    assert led.decrypt(old, context={"tenant": "acme"}) == b"card 4111"
    assert led.decrypt(new) == b"card 4222"
    with pytest.raises(kl.InvalidCiphertext):
        led.decrypt(old[:-1] + bytes([old[-1] ^ 1]), context={"tenant": "acme"})
    led.create_key("signer", spec="ED25519")
    sig = led.sign("signer", b"release 1.0")
    assert led.verify("signer", b"release 1.0", sig)
    assert led.verify_audit().ok


def test_a_memory_home_reopens_in_its_process_only(memory_ledger, tmp_path, clock):
    memory_ledger.create_key("k", spec="AES_256")
    blob = memory_ledger.encrypt("k", b"kept while the process lives")
    memory_ledger.close()
    with kl.open(tmp_path / "mem", principal="alice", clock=clock) as again:
        assert again.decrypt(blob) == b"kept while the process lives"
    other = run_python(
        "import keyledger as kl\n"
        f"try:\n    kl.open({str(tmp_path / 'mem')!r}, principal='bob')\n"
        "except kl.ConfigError as exc:\n    print('refused:', exc)\n")
    assert "refused:" in other.stdout and "vanished" in other.stdout, other.stderr


def test_the_memory_backend_is_refused_for_a_real_home(tmp_path):
    memory.init_home(tmp_path / "real")
    with pytest.raises(kl.ConfigError, match="simulation homes only"):
        kl.open(tmp_path / "real", principal="alice")
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["keyledger.toml"]


def test_a_memory_home_refuses_backup_and_an_unknown_backend_is_named(memory_ledger, tmp_path):
    with pytest.raises(kl.ConfigError, match="cannot be backed up"):
        memory_ledger.backup(tmp_path / "b.klb", passphrase="long enough passphrase")
    assert memory_ledger.audit(action="backup")["outcome"].tolist() == ["failed"]
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "keyledger.toml").write_text('[hsm]\nbackend = "tpm"\n')
    with pytest.raises(kl.ConfigError, match="unknown \\[hsm\\] backend = 'tpm'"):
        kl.open(tmp_path / "odd", principal="alice")


def test_byok_import_and_export_through_kl_open_on_the_memory_backend(memory_ledger):
    """The docs/byok.md wire format, both ways, with no token."""
    led = memory_ledger
    params = led.import_parameters("byok")
    assert params["oaep_hash"] == "sha256"  # the memory backend has OAEP-SHA256
    material = os.urandom(32)
    public_key = serialization.load_pem_public_key(params["public_key_pem"].encode())
    h = hashes.SHA256()
    eph = os.urandom(32)
    wrapped = public_key.encrypt(eph, padding.OAEP(padding.MGF1(h), h, None))
    wrapped += aes_key_wrap_with_padding(eph, material)
    led.import_key("byok", spec="AES_256", wrapped=wrapped, token=params["token"])
    blob = led.encrypt("byok", b"imported")
    assert led.decrypt(blob) == b"imported"
    again = led.import_parameters("byok2")  # another token's key: the blob does not unwrap
    with pytest.raises(kl.InvalidCiphertext, match="could not be unwrapped"):
        led.import_key("byok2", spec="AES_256", wrapped=wrapped, token=again["token"])

    recipient = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    led.create_key("exp", spec="EC_P256", exportable=True)
    out = led.export_key("exp", recipient.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    n = recipient.key_size // 8
    eph = recipient.decrypt(out.wrapped[:n], padding.OAEP(padding.MGF1(h), h, None))
    private = serialization.load_der_private_key(
        aes_key_unwrap_with_padding(eph, out.wrapped[n:]), None)
    sig = private.sign(b"made outside", ec.ECDSA(hashes.SHA256()))
    assert led.verify("exp", b"made outside", sig)


def test_a_token_home_switched_to_memory_in_its_settings_is_refused(tmp_path, clock):
    """Someone who can write keyledger.toml cannot move a home off its token onto keys in
    memory: the existing store makes the memory backend refuse the open."""
    home = tmp_path / "token-home"
    made = run_python(  # another process: this one holds the contract tests' token
        "import keyledger as kl\n"
        f"with kl.open({str(home)!r}, principal='alice') as led:\n"
        "    led.create_key('k', spec='AES_256')\n", check=True)
    assert made.returncode == 0
    (home / "keyledger.toml").write_text('[hsm]\nbackend = "memory"\n')
    with pytest.raises(kl.ConfigError, match="vanished"):
        kl.open(home, principal="alice", clock=clock)
