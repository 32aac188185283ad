"""The meta table: the home's settings kept in the store (ids, HSM handles, mode, home policy)
and leases (one process at a time for periodic work)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from .db import Tx

HOME_POLICY = "home_policy"


def get(tx: Tx, name: str) -> str | None:
    row = tx.execute("SELECT value FROM meta WHERE name = ?", [name]).fetchone()
    return row[0] if row else None


def get_many(tx: Tx, names: tuple[str, ...]) -> dict[str, str]:
    """The stored values of ``names`` (absent ones left out), in one statement."""
    return dict(tx.execute("SELECT name, value FROM meta WHERE list_contains(?, name)",
                           [list(names)]).fetchall())


def put(tx: Tx, name: str, value: str) -> None:
    """Set a value (insert or replace)."""
    tx.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT DO UPDATE "
               "SET value = excluded.value", [name, value])


def get_or_make(tx: Tx, name: str, make: Callable[[], str],
                known: dict[str, str] | None = None) -> str:
    """The stored value, or ``make()``'s, stored now. ``known``: values just read with
    ``get_many`` (a name it lacks is not stored)."""
    value = get(tx, name) if known is None else known.get(name)
    if value is None:
        value = make()
        tx.execute("INSERT INTO meta (name, value) VALUES (?, ?)", [name, value])
    return value


def set_home_policy(tx: Tx, policy: dict) -> None:
    put(tx, HOME_POLICY, json.dumps(policy, sort_keys=True))


def take_lease(tx: Tx, name: str, seconds: float, alive: Callable[[int], bool]) -> int | None:
    """Take lease ``name`` for ``seconds``; None on success, else the pid of the live holder."""
    now = time.time()
    held = get(tx, f"lease:{name}")
    if held is not None:
        lease = json.loads(held)
        if lease["until"] > now and lease["pid"] != os.getpid() and alive(lease["pid"]):
            return int(lease["pid"])
    put(tx, f"lease:{name}", json.dumps({"pid": os.getpid(), "until": now + seconds}))
    return None


def release_lease(tx: Tx, name: str) -> None:
    tx.execute("DELETE FROM meta WHERE name = ?", [f"lease:{name}"])
