"""Quorum requests, their approvals, and custodian acknowledgements."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from .db import Tx

if TYPE_CHECKING:
    import pandas as pd


def add(tx: Tx, *, request_id: str, action: str, key_id: str, reason: str, params: str,
        requested_by: str, now: datetime, expires_at: datetime, quorum: int,
        admins: str) -> None:
    """File a pending request (``admins``: JSON list of who held admin when it was filed)."""
    tx.execute("INSERT INTO requests (request_id, action, key_id, reason, params, requested_by, "
               "requested_at, expires_at, quorum, status, executed_at, executed_by, admins) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL, NULL, ?)",
               [request_id, action, key_id, reason, params, requested_by, now, expires_at,
                quorum, admins])


def approve(tx: Tx, request_id: str, principal: str, now: datetime) -> None:
    """Record an approval; a second one by the same principal changes nothing."""
    tx.execute("INSERT INTO approvals (request_id, principal, time) VALUES (?, ?, ?) "
               "ON CONFLICT DO NOTHING", [request_id, principal, now])


def approvers(tx: Tx, request_id: str) -> list[str]:
    """Who approved, in order."""
    return [r[0] for r in tx.execute("SELECT principal FROM approvals WHERE request_id = ? "
                                     "ORDER BY time", [request_id]).fetchall()]


def for_approval(tx: Tx, request_id: str) -> tuple | None:
    """(action, key_id, status, expires_at, quorum, admins) of a request, or None."""
    return tx.execute("SELECT action, key_id, status, expires_at, quorum, admins FROM requests "
                      "WHERE request_id = ?", [request_id]).fetchone()


def for_execution(tx: Tx, request_id: str) -> tuple | None:
    """(action, key_id, reason, params, status, quorum, admins) of a request, or None."""
    return tx.execute("SELECT action, key_id, reason, params, status, quorum, admins "
                      "FROM requests WHERE request_id = ?", [request_id]).fetchone()


def set_status(tx: Tx, request_id: str, status: str) -> None:
    tx.execute("UPDATE requests SET status = ? WHERE request_id = ?", [status, request_id])


def executed(tx: Tx, request_id: str, by: str, now: datetime) -> None:
    tx.execute("UPDATE requests SET status = 'executed', executed_at = ?, executed_by = ? "
               "WHERE request_id = ?", [now, by, request_id])


def frame(tx: Tx, status: str | None = None) -> pd.DataFrame:
    """Requests (optionally of one status) with their approvers, oldest first."""
    sql = """SELECT r.request_id, r.action, coalesce(k.name, CASE WHEN r.key_id LIKE
                'new:%' THEN r.key_id[5:] ELSE '*' END) AS key, r.reason,
                r.requested_by,
                r.requested_at, r.expires_at, r.quorum, r.status, r.executed_at,
                r.executed_by, list(a.principal ORDER BY a.time) AS approvers
             FROM requests r LEFT JOIN keys k USING (key_id)
             LEFT JOIN approvals a USING (request_id)"""
    args: list[object] = []
    if status is not None:
        sql += " WHERE r.status = ?"
        args.append(status)
    sql += " GROUP BY ALL ORDER BY r.requested_at"
    return tx.execute(sql, args).df()


def acknowledge(tx: Tx, principal: str, now: datetime, statement: str) -> None:
    tx.execute("INSERT INTO acknowledgements (principal, time, statement) VALUES (?, ?, ?)",
               [principal, now, statement])
