"""Import tokens (BYOK): one row per ``import_parameters`` call, used once by ``import_key``."""

from __future__ import annotations

from datetime import datetime

from .db import Tx


def token(tx: Tx, token_id: str) -> tuple | None:
    """(name, wrapping key handle hex, oaep hash, expires_at, used_at) of a token, or None."""
    return tx.execute("SELECT name, handle, oaep_hash, expires_at, used_at FROM import_tokens "
                      "WHERE token = ?", [token_id]).fetchone()


def use(tx: Tx, token_id: str, *, now: datetime, by: str, key_id: str) -> None:
    tx.execute("UPDATE import_tokens SET used_at = ?, used_by = ?, key_id = ? WHERE token = ?",
               [now, by, key_id, token_id])


def release(tx: Tx, key_id: str) -> None:
    """The import of ``key_id`` did not happen: its token is usable again."""
    tx.execute("UPDATE import_tokens SET used_at = NULL, used_by = NULL, key_id = NULL "
               "WHERE key_id = ?", [key_id])
