"""keyledger's errors as AWS KMS exceptions (the one seam between the two error trees).

Every ``KeyLedgerError`` reaching ``dispatch`` was already audited by the ledger call that
raised it; a refusal the KMS layer makes itself is audited once by ``dispatch`` unless it is a
``Recorded`` one (its record was written with the call, e.g. a Verify that did not verify).
"""

from __future__ import annotations

import re

from ...errors import (
    AccessDenied,
    InvalidCiphertext,
    InvalidInput,
    KeyExists,
    KeyLedgerError,
    KeyNotFound,
    KeyStateError,
    PolicyViolation,
    UnsupportedMechanism,
)
from ..errors import ApiError


class Recorded(ApiError):
    """An ``ApiError`` whose call is already in the audit ledger (``dispatch`` adds none)."""


def validation(message: str) -> ApiError:
    return ApiError("ValidationException", message, 400)


def unsupported(message: str) -> ApiError:
    return ApiError("UnsupportedOperationException", message, 400)


def not_found(message: str) -> ApiError:
    return ApiError("NotFoundException", message, 400)


def usage(message: str) -> ApiError:
    return ApiError("InvalidKeyUsageException", message, 400)


_STATE = re.compile(r"\bit is ([a-z-]+)")
_USAGE_HINTS = ("this operation needs a",)


def _state_error(exc: KeyStateError) -> ApiError:
    """A disabled (suspended or not yet activated) key is AWS's DisabledException; every other
    state refusal is KMSInvalidStateException."""
    m = _STATE.search(str(exc))
    if m and m.group(1) in ("suspended", "pre-activation"):
        return ApiError("DisabledException", str(exc), 400)
    return ApiError("KMSInvalidStateException", str(exc), 400)


def _policy_error(exc: PolicyViolation) -> ApiError:
    text = str(exc)
    if any(hint in text for hint in _USAGE_HINTS):
        return usage(text)
    if "has no public key" in text:  # GetPublicKey of a symmetric key, as AWS answers it
        return unsupported(text)
    if "usage limit" in text:
        return ApiError("LimitExceededException", text, 400)
    if "distinct admins" in text:  # the quorum gate: keyledger's request/approve
        return ApiError("AccessDeniedException", text, 400)
    return validation(text)


def to_api_error(exc: KeyLedgerError) -> ApiError:
    """The AWS exception a KMS client gets for a keyledger refusal or failure."""
    text = str(exc)
    if isinstance(exc, KeyNotFound):
        return not_found(text)
    if isinstance(exc, AccessDenied):
        return ApiError("AccessDeniedException", text, 400)
    if isinstance(exc, InvalidInput):
        return validation(text)
    if isinstance(exc, KeyExists):
        return ApiError("AlreadyExistsException", text, 400)
    if isinstance(exc, InvalidCiphertext):
        return ApiError("InvalidCiphertextException", text, 400)
    if isinstance(exc, KeyStateError):
        return _state_error(exc)
    if isinstance(exc, PolicyViolation):
        return _policy_error(exc)
    if isinstance(exc, UnsupportedMechanism):
        return unsupported(text)
    # HsmError, StoreError (StoreBusy: SDKs retry a 500), ConfigError, AuditError
    return ApiError("KMSInternalException", f"{type(exc).__name__}: {text}", 500)


__all__ = ["Recorded", "not_found", "to_api_error", "unsupported", "usage", "validation"]
