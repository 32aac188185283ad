"""The small interface keyledger needs from an HSM. Key versions are addressed by CKA_ID."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..model import KeySpec


class DecryptFailed(Exception):
    """Internal signal: authentication of AES-GCM data failed (wrong key, AAD or tampering)."""


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
    def capabilities(self) -> Capabilities: ...
    def generate(self, spec: KeySpec, handle: bytes, label: str, *, exportable: bool) -> None: ...
    def exists(self, handle: bytes) -> bool: ...
    def destroy(self, handle: bytes) -> int: ...
    def attributes(self, handle: bytes) -> KeyAttributes: ...
    def encrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes: ...
    def decrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, data: bytes) -> bytes: ...
    def sign(self, spec: KeySpec, handle: bytes, message: bytes) -> bytes: ...
    def verify(self, spec: KeySpec, handle: bytes, message: bytes, signature: bytes) -> bool: ...
    def mac(self, handle: bytes, message: bytes) -> bytes: ...
    def verify_mac(self, handle: bytes, message: bytes, tag: bytes) -> bool: ...
    def public_key_der(self, spec: KeySpec, handle: bytes) -> bytes: ...
    def put_data(self, label: str, value: bytes) -> None: ...
    def get_data(self, label: str) -> list[bytes]: ...
    def close(self) -> None: ...
