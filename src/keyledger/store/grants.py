"""Grants: who holds which role on which scope (a key id, or ``*`` for the whole home)."""

from __future__ import annotations

from datetime import datetime

from .db import Tx


def add(tx: Tx, *, scope: str, principal: str, role: str, granted_by: str,
        now: datetime, new_scope: bool = False) -> None:
    """Grant a role; granting one already held changes nothing. ``new_scope``: the scope is a
    key made in this transaction, so nothing can conflict (DuckDB's ON CONFLICT costs ~2.5 ms)."""
    tx.execute("INSERT INTO grants (scope, principal, role, granted_by, granted_at) "
               f"VALUES (?, ?, ?, ?, ?){'' if new_scope else ' ON CONFLICT DO NOTHING'}",
               [scope, principal, role, granted_by, now])


def count(tx: Tx) -> int:
    return int(tx.execute("SELECT count(*) FROM grants").one()[0])


def remove(tx: Tx, scope: str, principal: str, role: str | None = None) -> int:
    """Remove a role (or every role) of ``principal`` on ``scope``; returns how many."""
    before = count(tx)
    sql = "DELETE FROM grants WHERE scope = ? AND principal = ?"
    args = [scope, principal]
    if role is not None:
        sql += " AND role = ?"
        args.append(role)
    tx.execute(sql, args)
    return before - count(tx)


def other_home_admins(tx: Tx, principal: str) -> int:
    """How many principals besides ``principal`` hold admin on the whole home."""
    return int(tx.execute("SELECT count(*) FROM grants WHERE scope = '*' AND role = 'admin' "
                          "AND principal <> ?", [principal]).one()[0])


def admins(tx: Tx, key_id: str | None) -> list[str]:
    """Principals (``*``: everyone) holding admin on the key, or on the home for None."""
    return [r[0] for r in tx.execute(
        "SELECT DISTINCT principal FROM grants WHERE role = 'admin' AND scope IN ('*', ?) "
        "ORDER BY 1", [key_id or "*"]).fetchall()]


def rows(tx: Tx) -> list[tuple[str, str, str]]:
    """(scope, principal, role) of every grant."""
    return tx.execute("SELECT scope, principal, role FROM grants").fetchall()


def frame(tx: Tx):
    """Every grant as a DataFrame: key name (``*`` home-wide), principal, role, granted_by,
    granted_at, scope."""
    return tx.execute(
        """SELECT coalesce(k.name, '*') AS key, g.principal, g.role, g.granted_by,
                  g.granted_at, g.scope FROM grants g
                  LEFT JOIN keys k ON k.key_id = g.scope
           ORDER BY 1, 2, 3""").df()
