"""The few things the KMS layer needs from a ``KeyLedger`` beyond its public methods, in one
place: reading the catalog without a call of its own (a key id -> its name, a key's metadata
for a response), audit records of refusals the KMS layer makes itself, dry runs and random
bytes. Authorisation stays keyledger's: ``peek`` returns a key only to a principal that may
run the action on it, and every other decision is left to the ledger's own calls."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from ...access import check
from ...errors import AccessDenied, KeyLedgerError, KeyNotFound
from ...model import Key, is_valid_name
from ..errors import ApiError
from .faults import Recorded

if TYPE_CHECKING:
    from ...service import KeyLedger

RANDOM_SOURCE = "os.urandom"  # the HSM backend offers no random-number call (hsm/backend.py)


def name_of_id(ledger: KeyLedger, key_id: str) -> str | None:
    """The keyledger name of the key with this key id, or None."""
    key = ledger._rt.catalog.get_id(key_id)
    return key.name if key is not None else None


def peek(ledger: KeyLedger, name: str, action: str) -> Key | None:
    """The key ``name`` names if the principal may run ``action`` on it, else None (the caller
    then lets the ledger's own call refuse, so the refusal is audited as keyledger does)."""
    if not is_valid_name(name):
        return None
    try:
        key = ledger._rt.catalog.get(name)
        check(ledger._rt.catalog.grants_now(), ledger.principal, action, key.key_id, key.name)
    except (KeyNotFound, AccessDenied):
        return None
    return key


_REFUSALS: dict[str, type[KeyLedgerError]] = {}


def _refusal(code: str) -> type[KeyLedgerError]:
    """An error class named after the AWS code, so the record's ``error`` column says it."""
    cls = _REFUSALS.get(code)
    if cls is None:
        cls = _REFUSALS[code] = type(code, (KeyLedgerError,), {})
    return cls


def record_refusal(ledger: KeyLedger, operation: str, error: ApiError,
                   key: Key | None = None) -> None:
    """One audit record (action ``kms:<Operation>``, outcome ``failed``, error the AWS code)
    for a request the KMS layer refused before any ledger call: malformed fields, an ARN of
    another account, the wrong key for a ciphertext."""
    refusal = _refusal(error.code)
    with contextlib.suppress(refusal), ledger._audited(f"kms:{operation}", None) as rec:
        rec.key = key
        rec.detail = f"{error.code}: {error.message}"[:500]
        raise refusal(error.message)


def dry_run(ledger: KeyLedger, operation: str, name: str, action: str) -> Recorded:
    """A DryRun: check the principal may run ``action`` on the key and record the check
    (action ``dry_run``; AccessDenied is recorded ``denied``). Returns the
    DryRunOperationException AWS answers when the real call would have been allowed."""
    with ledger._audited("dry_run", name) as rec:
        rec.detail = f"{operation} ({action})"
        key = ledger._rt.catalog.get(name)
        rec.key = key
        check(ledger._rt.catalog.grants_now(), ledger.principal, action, key.key_id, key.name)
    return Recorded("DryRunOperationException",
                    f"the request would have succeeded, but DryRun is set ({operation})", 412)


def random_bytes(ledger: KeyLedger, n: int) -> bytes:
    """``n`` random bytes from the operating system, audited as ``generate_random`` (any
    authenticated principal may ask, as any AWS principal with kms:GenerateRandom may)."""
    with ledger._audited("generate_random", None) as rec:
        rec.detail = f"{n} bytes from {RANDOM_SOURCE}"
        data = os.urandom(n)
    return data


__all__ = ["RANDOM_SOURCE", "dry_run", "name_of_id", "peek", "random_bytes", "record_refusal"]
