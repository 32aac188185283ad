"""Writes to the key catalog (keys, versions, aliases, transitions); reads are in catalog.py.

Every INSERT names its columns. Functions take the caller's transaction: a catalog change and
the intent it completes commit together.
"""

from __future__ import annotations

import json
from datetime import datetime

from .db import Tx

# a key's and a version's catalog columns, in the order the catalog's documents read them
# (``catalog.py``); inserts return the rows they wrote, in this order
KEY_COLUMNS = ("key_id, name, spec, purpose, state, prior_state, owner, created_at, rotated_at, "
               "rotation_period_s, exportable, latest_version, min_decryption_version, "
               "min_encryption_version, deletion_due, tags, policy")
VERSION_COLUMNS = "key_id, version, handle, state, created_at, destroyed_at"
# keys columns a caller may set with ``update``: never key_id or name
_UPDATABLE = frozenset({
    "state", "prior_state", "owner", "rotated_at", "rotation_period_s", "latest_version",
    "min_decryption_version", "min_encryption_version", "deletion_due", "tags", "policy"})


def name_taken(tx: Tx, name: str) -> bool:
    """Whether a key or an alias already has this name (UNION ALL: no duplicate removal to
    plan and run, ~1 ms of DuckDB's time per create at load)."""
    return tx.execute("SELECT 1 FROM keys WHERE name = $1 UNION ALL SELECT 1 FROM aliases "
                      "WHERE alias = $1", [name]).fetchone() is not None


def insert_key(tx: Tx, *, key_id: str, name: str, spec: str, purpose: str, state: str,
               owner: str | None, now: datetime, rotation_period_s: int | None,
               exportable: bool, tags: str, policy: dict) -> tuple:
    """A new key at version 1 (its version row comes from ``insert_version``); returns its row
    (``KEY_COLUMNS``) as the values bound, which DuckDB stores unchanged (no ``RETURNING``:
    ~0.5 ms per insert; ``tests/test_catalog_export.py`` compares them with a fresh read)."""
    bound = [key_id, name, spec, purpose, state, owner, now, now, rotation_period_s,
             exportable, tags, json.dumps(policy, sort_keys=True)]
    tx.execute(f"INSERT INTO keys ({KEY_COLUMNS}) VALUES "
               "(?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, 1, 1, 1, NULL, ?, ?)", bound)
    return (*bound[:5], None, *bound[5:10], 1, 1, 1, None, *bound[10:])


def insert_version(tx: Tx, key_id: str, version: int, handle: bytes, now: datetime) -> tuple:
    """A new active version; returns its row (``VERSION_COLUMNS``), as ``insert_key`` does."""
    bound = [key_id, version, handle.hex(), now]
    tx.execute(f"INSERT INTO versions ({VERSION_COLUMNS}) VALUES (?, ?, ?, 'active', ?, NULL)",
               bound)
    return (*bound[:3], "active", now, None)


def add_transition(tx: Tx, *, now: datetime, key_id: str, version: int | None, action: str,
                   from_state: str | None, to_state: str, actor: str,
                   reason: str | None) -> None:
    tx.execute("INSERT INTO transitions (time, key_id, version, action, from_state, to_state, "
               "actor, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               [now, key_id, version, action, from_state, to_state, actor, reason])


def update(tx: Tx, key_id: str, changes: dict[str, object], *,
           only_if: dict[str, object] | None = None) -> bool:
    """Set some columns of a key's row (names from a fixed list, values bound); ``only_if``:
    only while these columns still hold these values. Whether the row was changed.
    (No RETURNING here: DuckDB 2.0.1 turns an UPDATE ... RETURNING of an indexed table into a
    delete and insert, which moves the row to the end of the table's row order.)"""
    only_if = only_if or {}
    bad = (set(changes) | set(only_if)) - _UPDATABLE
    if bad:
        raise ValueError(f"not updatable key columns: {sorted(bad)}")
    sets = ", ".join(f"{c} = ?" for c in changes)
    checks = "".join(f" AND {c} = ?" for c in only_if)
    return tx.execute(f"UPDATE keys SET {sets} WHERE key_id = ?{checks}",
                      [*changes.values(), key_id, *only_if.values()]).one()[0] > 0


def retire_latest(tx: Tx, key_id: str, version: int, state: str) -> bool:
    """The previous latest version stops protecting (``retired`` or ``compromised``); False
    when it was no longer active (nothing changed)."""
    return tx.execute("UPDATE versions SET state = ? WHERE key_id = ? AND version = ? "
                      "AND state = 'active'", [state, key_id, version]).one()[0] > 0


def compromise_versions(tx: Tx, key_id: str) -> None:
    tx.execute("UPDATE versions SET state = 'compromised' WHERE key_id = ? "
               "AND state <> 'destroyed'", [key_id])


def destroy_versions(tx: Tx, key_id: str, now: datetime, *, below: int | None = None) -> None:
    """Mark versions destroyed (all, or those below ``below``)."""
    sql = ("UPDATE versions SET state = 'destroyed', destroyed_at = ? "
           "WHERE key_id = ? AND state <> 'destroyed'")
    args: list[object] = [now, key_id]
    if below is not None:
        sql += " AND version < ?"
        args.append(below)
    tx.execute(sql, args)


def raise_min_versions(tx: Tx, key_id: str, version: int) -> None:
    """Raise both minimum versions to at least ``version`` (never lower them)."""
    tx.execute("UPDATE keys SET min_decryption_version = greatest(min_decryption_version, ?), "
               "min_encryption_version = greatest(min_encryption_version, ?) WHERE key_id = ?",
               [version, version, key_id])


def state_of(tx: Tx, key_id: str) -> str | None:
    row = tx.execute("SELECT state FROM keys WHERE key_id = ?", [key_id]).fetchone()
    return row[0] if row else None


def handles_in_use(tx: Tx, handles: tuple[bytes, ...] | list[bytes]) -> set[bytes]:
    """Which of ``handles`` a version (not destroyed) of any key uses."""
    if not handles:
        return set()
    marks = ", ".join("?" for _ in handles)
    rows = tx.execute(f"SELECT handle FROM versions WHERE state <> 'destroyed' AND handle IN "
                      f"({marks})", [h.hex() for h in handles]).fetchall()
    return {bytes.fromhex(r[0]) for r in rows}


def version_handles(tx: Tx, key_id: str, *, below: int | None = None) -> list[bytes]:
    """The HSM handles of a key's versions (those below ``below``)."""
    sql = "SELECT handle FROM versions WHERE key_id = ?"
    args: list[object] = [key_id]
    if below is not None:
        sql += " AND version < ?"
        args.append(below)
    return [bytes.fromhex(r[0]) for r in tx.execute(sql, args).fetchall()]


def min_decryption_version(tx: Tx, key_id: str) -> int:
    row = tx.execute("SELECT min_decryption_version FROM keys WHERE key_id = ?",
                     [key_id]).fetchone()
    return int(row[0]) if row else 0


def add_alias(tx: Tx, alias: str, key_id: str) -> None:
    tx.execute("INSERT INTO aliases (alias, key_id) VALUES (?, ?)", [alias, key_id])


def remove_alias(tx: Tx, alias: str, key_id: str) -> None:
    tx.execute("DELETE FROM aliases WHERE alias = ? AND key_id = ?", [alias, key_id])


def live_versions(tx: Tx) -> list[tuple[str, str, int, str]]:
    """(key_id, name, version, handle hex) of every version not destroyed."""
    return tx.execute("SELECT v.key_id, k.name, v.version, v.handle FROM versions v "
                      "JOIN keys k USING (key_id) WHERE v.state <> 'destroyed'").fetchall()
