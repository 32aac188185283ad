"""The AWS KMS JSON 1.1 API (``TrentService.<Operation>``) over a ``KeyLedger``.

``dispatch(ledger, operation, body)`` runs one operation for the ledger's principal and
returns the response as a JSON-ready dict, or raises ``ApiError`` with AWS's exception name.
Operations register in ``OPERATIONS`` (name -> handler); unknown ones are refused.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ApiError

if TYPE_CHECKING:
    from ...service import KeyLedger

Handler = Callable[["KeyLedger", dict[str, Any]], dict[str, Any]]
TARGET_PREFIX = "TrentService."


def _generate_random(ledger: KeyLedger, body: dict[str, Any]) -> dict[str, Any]:
    """Placeholder until the KMS operations land: random bytes from the OS (not audited)."""
    import os

    n = body.get("NumberOfBytes")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ApiError("ValidationException", "NumberOfBytes must be a whole number from 1 to 1024")
    return {"Plaintext": base64.b64encode(os.urandom(n)).decode()}


OPERATIONS: dict[str, Handler] = {"GenerateRandom": _generate_random}


def dispatch(ledger: KeyLedger, operation: str, body: dict[str, Any]) -> dict[str, Any]:
    """Run ``operation`` (e.g. ``"Encrypt"``, without the ``TrentService.`` prefix)."""
    handler = OPERATIONS.get(operation)
    if handler is None:
        raise ApiError("UnsupportedOperationException",
                       f"keyledger does not implement the KMS operation {operation[:80]!r}")
    return handler(ledger, body)


__all__ = ["OPERATIONS", "TARGET_PREFIX", "Handler", "dispatch"]
