"""The AWS KMS JSON 1.1 API (``TrentService.<Operation>``) over a ``KeyLedger``.

``dispatch(ledger, operation, body, config=...)`` runs one operation for the ledger's
principal and returns the response as a JSON-ready dict, or raises ``ApiError`` with AWS's
exception name. Operations register in ``OPERATIONS`` (name -> handler of a ``Call``);
unknown ones are refused. See docs/kms-api.md for what maps onto what.

Modules: ``ids`` (KeyId forms), ``mapping`` (specs, usages, states, algorithms), ``fields``
(request validation), ``keys`` (key management), ``crypto`` (data operations), ``imports``
(BYOK), ``faults`` (KeyLedgerError -> ApiError), ``seam`` (what it reads of a KeyLedger
beyond its public methods).

Auditing: every ledger call an operation makes is audited by keyledger; a request refused
here before any ledger call (a malformed field, a foreign ARN, the wrong key) gets one record
of its own (action ``kms:<Operation>``), so the server need not audit ``ApiError``s again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import KeyLedgerError
from ..errors import ApiError
from . import crypto, imports, keys
from .call import Call
from .config import KmsConfig
from .faults import Recorded, to_api_error
from .fields import Body
from .seam import record_refusal

if TYPE_CHECKING:
    from ...service import KeyLedger

Handler = Callable[[Call], dict[str, Any]]
TARGET_PREFIX = "TrentService."
DEFAULT_CONFIG = KmsConfig()

OPERATIONS: dict[str, Handler] = {**keys.OPERATIONS, **crypto.OPERATIONS, **imports.OPERATIONS}


def dispatch(ledger: KeyLedger, operation: str, body: dict[str, Any], *,
             config: KmsConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Run ``operation`` (e.g. ``"Encrypt"``, without the ``TrentService.`` prefix)."""
    handler = OPERATIONS.get(operation)
    if handler is None:
        raise _recorded(ledger, "unknown", ApiError(
            "UnsupportedOperationException",
            f"keyledger does not implement the KMS operation {operation[:80]!r}"))
    try:
        return handler(Call(ledger, Body(body), config, operation))
    except KeyLedgerError as exc:  # the ledger call that raised it audited it
        raise to_api_error(exc) from None
    except Recorded:
        raise
    except ApiError as exc:
        raise _recorded(ledger, operation, exc) from None


def _recorded(ledger: KeyLedger, operation: str, error: ApiError) -> ApiError:
    """``error`` once its audit record is written; if the ledger cannot write it (closed,
    journal failing), the error saying so instead: no refusal goes unrecorded silently."""
    try:
        record_refusal(ledger, operation, error)
    except KeyLedgerError as exc:
        return to_api_error(exc)
    return error


__all__ = ["DEFAULT_CONFIG", "OPERATIONS", "TARGET_PREFIX", "Call", "Handler", "KmsConfig",
           "dispatch"]
