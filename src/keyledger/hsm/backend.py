"""The small interface keyledger needs from an HSM. Key versions are addressed by CKA_ID."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import rsa

from ..model import KeySpec

# One file of an HSM's token directory, read for a backup: (path relative to the token
# directory, "." for the directory itself; content, None for a directory; mode; mtime).
TokenFile = tuple[str, bytes | None, int, float]


class DecryptFailed(Exception):
    """Internal signal: authentication of AES-GCM data failed (wrong key, AAD or tampering)."""


class UnwrapFailed(Exception):
    """Internal signal: wrapped key material did not unwrap (another wrapping key, or altered)."""


@dataclass(frozen=True)
class KeyAttributes:
    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool


@dataclass(frozen=True)
class Capabilities:
    """What the PKCS#11 module can do, probed once when the backend starts."""

    module: str
    manufacturer: str
    mechanisms: frozenset[str]
    supports: dict[str, bool] = field(default_factory=dict)

    def __str__(self) -> str:
        ok = ", ".join(k for k, v in sorted(self.supports.items()) if v)
        missing = ", ".join(k for k, v in sorted(self.supports.items()) if not v)
        return f"{self.manufacturer}: supports {ok}; lacks {missing or 'nothing'}"


class HsmBackend(Protocol):
    """What keyledger needs from an HSM. Key versions are addressed by a 16-byte handle (CKA_ID
    for PKCS#11). Implementations: ``pkcs11_backend.Pkcs11Backend`` (SoftHSM2 or another
    PKCS#11 module) and ``memory.MemoryBackend`` (in-process, for simulations and tests).

    Errors leave as ``KeyLedgerError`` subclasses (missing material: ``KeyStateError``), except
    the internal signals ``DecryptFailed`` and ``UnwrapFailed`` the caller turns into its own.
    """

    def capabilities(self) -> Capabilities: ...
    def generate(self, spec: KeySpec, handle: bytes, label: str, *, exportable: bool) -> None: ...
    def exists(self, handle: bytes) -> bool: ...
    def destroy(self, handle: bytes) -> int: ...
    def attributes(self, handle: bytes) -> KeyAttributes: ...
    def encrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes: ...
    def decrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, data: bytes) -> bytes: ...
    def encrypt_gcm_many(self, handle: bytes,
                         items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        """``encrypt_gcm`` of each ``(nonce, aad, plaintext)`` under one key (a batch: one
        lock and one key lookup for all); ciphertext||tag per item, in order."""
        ...

    def decrypt_gcm_many(self, handle: bytes,
                         items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes | None]:
        """``decrypt_gcm`` of each ``(nonce, aad, ciphertext||tag)`` under one key; None where
        an item fails authentication (the others go on), in order."""
        ...

    def sign(self, spec: KeySpec, handle: bytes, message: bytes) -> bytes: ...
    def verify(self, spec: KeySpec, handle: bytes, message: bytes, signature: bytes) -> bool: ...
    def mac(self, handle: bytes, message: bytes) -> bytes: ...
    def verify_mac(self, handle: bytes, message: bytes, tag: bytes) -> bool: ...
    def public_key_der(self, spec: KeySpec, handle: bytes) -> bytes: ...
    def put_data(self, label: str, value: bytes) -> None: ...
    def get_data(self, label: str) -> list[bytes]: ...
    def close(self) -> None: ...

    # -- key transport (byok.py; the wire format is in docs/byok.md) --------------------------
    def wrap_out(self, spec: KeySpec, handle: bytes, wrapping_key: rsa.RSAPublicKey,
                 oaep_hash: str) -> bytes:
        """RSA-OAEP(``oaep_hash``: "sha1"/"sha256") of an ephemeral AES-256 key, then AES-KWP
        (RFC 5649) of the key's material under it; refuses a non-extractable key."""
        ...

    def new_unwrap_key(self, handle: bytes, label: str, bits: int) -> bytes:
        """A stored RSA key pair whose private half can only unwrap; returns the public DER."""
        ...

    def unwrap_in(self, unwrap_handle: bytes, oaep_hash: str, blob: bytes, spec: KeySpec,
                  handle: bytes, label: str) -> None:
        """Unwrap a ``wrap_out``-format ``blob`` into a sensitive, non-extractable AES key
        ``handle``; ``UnwrapFailed`` when it does not unwrap, ``InvalidInput`` when it is no AES
        key of ``spec``'s size, ``KeyStateError`` when ``unwrap_handle`` is missing."""
        ...

    # -- process-wide exclusion and backup ---------------------------------------------------
    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """A block during which no other thread of this process calls this HSM."""
        ...

    def snapshot_token(self) -> list[TokenFile]:
        """The token's files, read inside ``exclusive()``; ``ConfigError`` when the HSM keeps
        no files a backup could hold."""
        ...
