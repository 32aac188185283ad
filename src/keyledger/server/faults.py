"""The fallback mapping of keyledger's errors to AWS KMS errors on the wire.

``kms.dispatch`` maps what it knows per operation; a ``KeyLedgerError`` that still escapes is
mapped here by its class. Anything else is a 500 ``KMSInternalException`` with a generic
message: the details go to the server's log (type and traceback, never the message, which
could quote an input).
"""

from __future__ import annotations

from .. import errors as e
from .errors import ApiError

INTERNAL = "KMSInternalException"
INTERNAL_MESSAGE = "keyledger could not complete the request; the server's log has the details"

# most specific class first: the first match wins
_BY_CLASS: tuple[tuple[type[e.KeyLedgerError], str, int], ...] = (
    (e.AccessDenied, "AccessDeniedException", 400),
    (e.KeyNotFound, "NotFoundException", 400),
    (e.KeyExists, "AlreadyExistsException", 400),
    (e.InvalidInput, "ValidationException", 400),
    (e.KeyStateError, "KMSInvalidStateException", 400),
    (e.PolicyViolation, "KMSInvalidStateException", 400),
    (e.InvalidCiphertext, "InvalidCiphertextException", 400),
    (e.UnsupportedMechanism, "UnsupportedOperationException", 400),
    (e.StoreBusy, "DependencyTimeoutException", 503),
)


def api_error(exc: e.KeyLedgerError) -> ApiError:
    """The AWS error a ``KeyLedgerError`` answers as. Client-side classes keep their message
    (keyledger's messages hold no secrets); server-side ones get a generic one."""
    for cls, code, status in _BY_CLASS:
        if isinstance(exc, cls):
            message = str(exc) if status < 500 else (
                "the key store is busy; retry in a moment")
            return ApiError(code, message[:1000], status)
    return ApiError(INTERNAL, INTERNAL_MESSAGE, 500)


def internal_error() -> ApiError:
    return ApiError(INTERNAL, INTERNAL_MESSAGE, 500)


__all__ = ["INTERNAL", "api_error", "internal_error"]
