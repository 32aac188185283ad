"""Grants: who holds which role on which scope (a key id, or ``*`` for the whole home)."""

from __future__ import annotations

from datetime import datetime

from .db import Tx


def add(tx: Tx, *, scope: str, principal: str, role: str, granted_by: str,
        now: datetime) -> None:
    """Grant a role; granting one already held changes nothing."""
    tx.execute("INSERT INTO grants (scope, principal, role, granted_by, granted_at) "
               "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
               [scope, principal, role, granted_by, now])


def count(tx: Tx) -> int:
    return int(tx.execute("SELECT count(*) FROM grants").fetchone()[0])
