"""An in-memory HSM backend: the whole ``HsmBackend`` protocol done with ``cryptography``.

For simulations and tests that need no token: AES-GCM, HMAC-SHA256, ECDSA (P-256/P-384),
Ed25519 and RSA-PSS, the BYOK wrap/unwrap format of docs/byok.md, data objects and random
handles, all held in this process's memory. **Keys vanish when the process exits**, and key
material sits in ordinary Python memory, not in a device: a home on this backend is refused
unless it is a new simulation home (``kl.open(new_home, clock=...)``), and cannot be reopened
by another process or backed up.

Select it explicitly for a new, empty home, before the first open::

    from keyledger.hsm.memory import init_home
    init_home(path)                                   # writes [hsm] backend = "memory"
    ledger = keyledger.open(path, clock=my_clock)     # a simulation home

The home's ``keyledger.toml`` then says ``[hsm] backend = "memory"``; the default backend stays
SoftHSM2 (``backend = "pkcs11"``).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from ..config import CONFIG_NAME, write_config
from ..errors import ConfigError, HsmError, InvalidInput, KeyStateError
from ..model import Family, KeySpec
from .backend import Capabilities, DecryptFailed, KeyAttributes, TokenFile, UnwrapFailed

MEMORY = "memory"
_CURVES = {"secp256r1": (ec.SECP256R1, hashes.SHA256), "secp384r1": (ec.SECP384R1, hashes.SHA384)}
_OAEP_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
NO_BACKUP = ("a home on the in-memory HSM backend cannot be backed up: its keys exist only in "
             "the memory of the process that made them")
_MISSING = ("the key material for this version is missing from the HSM; run `keyledger init` "
            "to reconcile the catalog with the HSM")


@dataclass
class _Key:
    """One key (a key pair counts as one, as two PKCS#11 objects with one CKA_ID)."""

    family: Family | None  # None: an unwrap-only RSA key pair (BYOK import)
    secret: bytes | None
    private: Any
    exportable: bool
    generated: bool  # made here (always sensitive, never extractable unless exportable)


class MemoryBackend:
    """The ``HsmBackend`` protocol in this process's memory (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._keys: dict[bytes, _Key] = {}
        self._data: dict[str, list[bytes]] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<MemoryBackend {self._name!r}: {len(self._keys)} keys, gone at process exit>"

    # -- lookups -------------------------------------------------------------------------------
    def _key(self, handle: bytes, doing: str, *families: Family | None) -> _Key:
        with self._lock:
            key = self._keys.get(handle)
        if key is None:
            raise KeyStateError(_MISSING)
        if key.family not in families:
            raise HsmError(f"{doing}: the HSM reported KeyTypeInconsistent (this key is not "
                           "of a kind the operation uses)")
        return key

    def _secret(self, handle: bytes, doing: str, family: Family) -> bytes:
        """The material of a secret key (AES or HMAC; a key pair has none)."""
        secret = self._key(handle, doing, family).secret
        if secret is None:
            raise HsmError(f"{doing}: the HSM reported KeyTypeInconsistent (this key is not "
                           "of a kind the operation uses)")
        return secret

    # -- capabilities and lifecycle --------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        supports = dict.fromkeys(("AES_GCM", "AES_KEY_WRAP_PAD", "SHA256_HMAC", "RSA_PSS_SHA256",
                                  "ECDSA", "ECDSA_SHA256", "EDDSA", "RSA_OAEP_SHA256"), True)
        return Capabilities(MEMORY, "keyledger in-memory backend (keys vanish at exit)",
                            frozenset(supports), supports)

    def generate(self, spec: KeySpec, handle: bytes, label: str, *, exportable: bool) -> None:
        secret: bytes | None = None
        private: PrivateKeyTypes | None = None
        if spec.family in (Family.AES, Family.HMAC):
            secret = os.urandom(spec.bits // 8)
        elif spec.family is Family.RSA:
            private = rsa.generate_private_key(public_exponent=65537, key_size=spec.bits)
        elif spec.family is Family.EDDSA:
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            private = ec.generate_private_key(_CURVES[str(spec.curve)][0]())
        self._store(handle, _Key(spec.family, secret, private, bool(exportable), True))

    def _store(self, handle: bytes, key: _Key) -> None:
        with self._lock:
            if handle in self._keys:
                raise HsmError("an object with this handle already exists in the HSM")
            self._keys[handle] = key

    def exists(self, handle: bytes) -> bool:
        with self._lock:
            return handle in self._keys

    def destroy(self, handle: bytes) -> int:
        """How many PKCS#11 objects this was (a key pair is two), as the token backend says."""
        with self._lock:
            key = self._keys.pop(handle, None)
        return 0 if key is None else 1 if key.secret is not None else 2

    def attributes(self, handle: bytes) -> KeyAttributes:
        with self._lock:
            key = self._keys.get(handle)
        if key is None:
            raise KeyStateError("the key material for this version is missing from the HSM")
        return KeyAttributes(True, key.exportable, key.generated,
                             key.generated and not key.exportable)

    # -- symmetric -------------------------------------------------------------------------------
    def encrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        secret = self._secret(handle, "encrypting in the HSM", Family.AES)
        return AESGCM(secret).encrypt(nonce, plaintext, aad)

    def decrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, data: bytes) -> bytes:
        secret = self._secret(handle, "decrypting in the HSM", Family.AES)
        try:
            return AESGCM(secret).decrypt(nonce, data, aad)
        except (InvalidTag, ValueError):
            raise DecryptFailed("InvalidTag") from None

    def encrypt_gcm_many(self, handle: bytes,
                         items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        aead = AESGCM(self._secret(handle, "encrypting in the HSM", Family.AES))
        return [aead.encrypt(nonce, data, aad) for nonce, aad, data in items]

    def decrypt_gcm_many(self, handle: bytes,
                         items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes | None]:
        aead = AESGCM(self._secret(handle, "decrypting in the HSM", Family.AES))
        out: list[bytes | None] = []
        for nonce, aad, data in items:
            try:
                out.append(aead.decrypt(nonce, data, aad))
            except (InvalidTag, ValueError):
                out.append(None)
        return out

    def mac(self, handle: bytes, message: bytes) -> bytes:
        secret = self._secret(handle, "computing a MAC in the HSM", Family.HMAC)
        return hmac.new(secret, message, sha256).digest()

    def verify_mac(self, handle: bytes, message: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(handle, message), tag)

    # -- asymmetric ------------------------------------------------------------------------------
    def sign(self, spec: KeySpec, handle: bytes, message: bytes) -> bytes:
        key = self._key(handle, f"signing with a {spec.name} key in the HSM", spec.family)
        if spec.family is Family.RSA:
            return key.private.sign(message, _PSS, hashes.SHA256())
        if spec.family is Family.EDDSA:
            return key.private.sign(message)
        return key.private.sign(message, ec.ECDSA(_CURVES[str(spec.curve)][1]()))

    def verify(self, spec: KeySpec, handle: bytes, message: bytes, signature: bytes) -> bool:
        key = self._key(handle, f"verifying with a {spec.name} key in the HSM", spec.family)
        pub = key.private.public_key()
        try:
            if spec.family is Family.RSA:
                pub.verify(signature, message, _PSS, hashes.SHA256())
            elif spec.family is Family.EDDSA:
                pub.verify(signature, message)
            else:
                pub.verify(signature, message, ec.ECDSA(_CURVES[str(spec.curve)][1]()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def public_key_der(self, spec: KeySpec, handle: bytes) -> bytes:
        key = self._key(handle, "reading a public key from the HSM", spec.family)
        return key.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    # -- data objects ------------------------------------------------------------------------------
    def put_data(self, label: str, value: bytes) -> None:
        with self._lock:
            self._data[label] = [bytes(value)]

    def get_data(self, label: str) -> list[bytes]:
        with self._lock:
            return list(self._data.get(label, []))

    def close(self) -> None:
        """Nothing to close: the keys stay until the process exits (``release`` keeps them)."""

    # -- key transport (docs/byok.md) ------------------------------------------------------------
    def wrap_out(self, spec: KeySpec, handle: bytes, wrapping_key: rsa.RSAPublicKey,
                 oaep_hash: str) -> bytes:
        doing = f"wrapping a {spec.name} key for export"
        key = self._key(handle, doing, spec.family)
        if not key.exportable:
            raise KeyStateError(f"{doing}: the key is not extractable; it cannot leave the HSM")
        if key.secret is not None:
            material = key.secret
        else:
            material = key.private.private_bytes(serialization.Encoding.DER,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())
        ephemeral = os.urandom(32)
        algorithm = _OAEP_HASH[oaep_hash]()
        head = wrapping_key.encrypt(ephemeral, padding.OAEP(padding.MGF1(algorithm), algorithm,
                                                            None))
        return head + aes_key_wrap_with_padding(ephemeral, material)

    def new_unwrap_key(self, handle: bytes, label: str, bits: int) -> bytes:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self._store(handle, _Key(None, None, private, False, True))
        return private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def unwrap_in(self, unwrap_handle: bytes, oaep_hash: str, blob: bytes, spec: KeySpec,
                  handle: bytes, label: str) -> None:
        private = self._key(unwrap_handle, "finding the import wrapping key", None).private
        n_len = private.key_size // 8
        algorithm = _OAEP_HASH[oaep_hash]()
        try:
            ephemeral = private.decrypt(blob[:n_len], padding.OAEP(padding.MGF1(algorithm),
                                                                   algorithm, None))
            material = aes_key_unwrap_with_padding(ephemeral, blob[n_len:])
        except (ValueError, InvalidUnwrap):
            raise UnwrapFailed("the wrapped key does not unwrap") from None
        if spec.family is not Family.AES or len(material) != spec.bits // 8:
            raise InvalidInput("the unwrapped material is not a valid AES key of the "
                               "declared size")
        self._store(handle, _Key(Family.AES, material, None, False, False))

    # -- process-wide exclusion and backup ---------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            yield

    def snapshot_token(self) -> list[TokenFile]:
        raise ConfigError(NO_BACKUP)


# -- one backend per home and process -------------------------------------------------------------
_tokens: dict[Path, MemoryBackend] = {}
_tokens_lock = threading.Lock()


def connect(home: Path, *, new_home: bool, simulate: bool) -> MemoryBackend:
    """This process's in-memory token of ``home``: made for a new simulation home, found again
    for a home this process made; refused otherwise (``ConfigError``), since its keys are gone."""
    with _tokens_lock:
        backend = _tokens.get(home)
        if backend is not None:
            return backend
        if not new_home:
            raise ConfigError(
                f"{home} uses the in-memory HSM backend, whose keys vanished when the process "
                "that created them ended; create a new home (the store alone is not enough)")
        if not simulate:
            raise ConfigError(
                "the in-memory HSM backend keeps keys only until the process exits, so it serves "
                "simulation homes only: open the new home with clock=... , or use the default "
                "SoftHSM2 backend for real keys")
        backend = _tokens[home] = MemoryBackend(str(home))
        return backend


def init_home(home: str | os.PathLike) -> Path:
    """Make an empty folder a home on the in-memory backend (``[hsm] backend = "memory"``);
    open it next with ``keyledger.open(home, clock=...)``."""
    path = Path(home).expanduser().absolute()
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{path} is not empty; choose a new, empty folder for a memory home")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_config(path, {"hsm": {"backend": MEMORY}})
    return path / CONFIG_NAME
