"""Access keys of ``keyledger serve``: which principal an AWS-style access key id signs for.

The secret is stored only sealed (AES-GCM under an HSM key, see services/accesskeys.py): the
store alone never reveals it. ``state`` is ``active`` or ``disabled``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from .db import Tx

if TYPE_CHECKING:
    import pandas as pd

ACTIVE, DISABLED = "active", "disabled"


class AccessKeyRow(NamedTuple):
    """What authentication needs of one access key (the secret still sealed)."""

    access_key_id: str
    principal: str
    secret_sealed: str
    state: str


def add(tx: Tx, *, access_key_id: str, principal: str, secret_sealed: str, created_by: str,
        now: datetime) -> None:
    tx.execute("INSERT INTO access_keys (access_key_id, principal, secret_sealed, state, "
               "created_at, created_by) VALUES (?, ?, ?, ?, ?, ?)",
               [access_key_id, principal, secret_sealed, ACTIVE, now, created_by])


def get(tx: Tx, access_key_id: str) -> AccessKeyRow | None:
    row = tx.execute("SELECT access_key_id, principal, secret_sealed, state FROM access_keys "
                     "WHERE access_key_id = ?", [access_key_id]).fetchone()
    return AccessKeyRow(*row) if row else None


def all_rows(tx: Tx) -> list[AccessKeyRow]:
    return [AccessKeyRow(*r) for r in tx.execute(
        "SELECT access_key_id, principal, secret_sealed, state FROM access_keys").fetchall()]


def set_state(tx: Tx, access_key_id: str, state: str, *, by: str, now: datetime) -> None:
    tx.execute("UPDATE access_keys SET state = ?, changed_at = ?, changed_by = ? "
               "WHERE access_key_id = ?", [state, now, by, access_key_id])


def delete(tx: Tx, access_key_id: str) -> None:
    tx.execute("DELETE FROM access_keys WHERE access_key_id = ?", [access_key_id])


def touch(tx: Tx, used: dict[str, datetime]) -> None:
    """Record when each access key last signed a request (never moves a time back)."""
    for access_key_id, when in used.items():
        tx.execute("UPDATE access_keys SET last_used_at = greatest(coalesce(last_used_at, ?), ?) "
                   "WHERE access_key_id = ?", [when, when, access_key_id])


def frame(tx: Tx) -> pd.DataFrame:
    """Every access key without its secret, oldest first."""
    return tx.execute(
        "SELECT access_key_id, principal, state, created_at, created_by, changed_at, "
        "changed_by, last_used_at FROM access_keys ORDER BY created_at, access_key_id").df()
