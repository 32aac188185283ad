"""The keyledger error tree.

Every failure a caller can see is a ``KeyLedgerError``; raw ``pkcs11`` and ``duckdb`` exceptions
are mapped at one seam each (``hsm/errors.py`` and ``store/db.py``)::

    KeyLedgerError
    ├── ConfigError          home, HSM module, token or PIN misconfigured
    ├── InvalidInput         a malformed argument (empty name, unknown spec, wrong type, ...)
    ├── KeyNotFound          no key by that name, alias or id
    ├── KeyExists            a key with that name already exists
    ├── KeyStateError        the key (or version) is in a state that forbids the operation
    ├── AccessDenied         the principal lacks the permission
    ├── PolicyViolation      the operation breaks a policy (deletion window, quorum, ...)
    ├── InvalidCiphertext    tampered, truncated, foreign or wrong-context ciphertext (opaque)
    ├── HsmError             the HSM failed or lacks a capability
    │   └── UnsupportedMechanism
    ├── StoreError           the DuckDB store failed
    │   └── StoreBusy        another process held the store beyond the bounded wait
    ├── AuditError           the audit journal could not be written or read
    └── ServiceError         keyledger serve could not be reached, refused the credentials,
        │                    or answered something a client cannot read (kl.connect)
        └── NotRemote        the method cannot work over kl.connect (it needs the home's files)

Messages say what happened and what to do. They never contain PINs, key material or plaintext.
"""

from __future__ import annotations


class KeyLedgerError(Exception):
    """Base class of every error keyledger raises."""


class ConfigError(KeyLedgerError):
    """The home, HSM module, token label or PIN source is misconfigured."""


class InvalidInput(KeyLedgerError, ValueError):
    """An argument is malformed; nothing was changed."""


class KeyNotFound(KeyLedgerError, LookupError):
    """No key matches the given name, alias or id."""


class KeyExists(KeyLedgerError):
    """A key with that name already exists."""


class KeyStateError(KeyLedgerError):
    """The key or version is in a state that forbids the requested operation."""


class AccessDenied(KeyLedgerError, PermissionError):
    """The principal lacks the permission the operation needs."""


class PolicyViolation(KeyLedgerError):
    """The operation would break a key or home policy."""


class InvalidCiphertext(KeyLedgerError):
    """The ciphertext cannot be decrypted: tampered, truncated, foreign or wrong context.

    Deliberately opaque to the caller (like pyca/cryptography's ``InvalidTag``); the precise
    reason is recorded in the audit ledger.
    """


class HsmError(KeyLedgerError):
    """The HSM reported a failure."""


class UnsupportedMechanism(HsmError):
    """The PKCS#11 module lacks a mechanism keyledger needs for this operation."""


class StoreError(KeyLedgerError):
    """The DuckDB store failed."""


class StoreBusy(StoreError):
    """Another process held the store for longer than the bounded wait."""


class AuditError(KeyLedgerError):
    """The audit journal could not be written or read."""


class ServiceError(KeyLedgerError):
    """``keyledger serve`` was unreachable, refused the request's credentials or signature,
    or failed in a way its client cannot map onto another keyledger error."""


class NotRemote(ServiceError):
    """The method cannot work through ``kl.connect``: it needs the home's files or process."""


__all__ = [
    "AccessDenied",
    "AuditError",
    "ConfigError",
    "HsmError",
    "InvalidCiphertext",
    "InvalidInput",
    "KeyExists",
    "KeyLedgerError",
    "KeyNotFound",
    "KeyStateError",
    "NotRemote",
    "PolicyViolation",
    "ServiceError",
    "StoreBusy",
    "StoreError",
    "UnsupportedMechanism",
]
