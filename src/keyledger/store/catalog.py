"""The key catalog: SQL over keys/versions/aliases, and the per-process snapshot cache.

Crypto calls must not open DuckDB (one writer process at a time, ~16 ms to open). After every
committed catalog change the writer, still holding the file lock, writes ``catalog.json``
atomically; every process keeps it in memory and reloads it when the file changes (checked at
most every ``refresh_ms``). That bounds how long another process may act on a stale state.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from ..access import Grants, index_grants
from ..errors import KeyNotFound
from ..model import (
    Key,
    KeyState,
    KeyVersion,
    Purpose,
    parse_spec,
    resolve_rotation_period,
    usage_limit,
)
from .db import Connection

SNAPSHOT_NAME = "catalog.json"


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


KeyRows = tuple[tuple, tuple, tuple]  # a key's row, its version rows, its aliases


def _key_rows(con: Connection, key_id: str | None = None) -> list[KeyRows]:
    """The catalog rows of every key (or one), grouped per key."""
    where, args = ("WHERE key_id = ?", [key_id]) if key_id else ("", [])
    keys = con.execute(
        f"""SELECT key_id, name, spec, purpose, state, prior_state, owner, created_at, rotated_at,
                  rotation_period_s, exportable, latest_version, min_decryption_version,
                  min_encryption_version, deletion_due, tags, policy FROM keys {where}""",
        args).fetchall()
    versions: dict[str, list] = {}
    for row in con.execute(
            f"SELECT key_id, version, handle, state, created_at, destroyed_at FROM versions "
            f"{where} ORDER BY version", args).fetchall():
        versions.setdefault(row[0], []).append(row[1:])
    aliases: dict[str, list[str]] = {}
    for alias, kid in con.execute(
            f"SELECT alias, key_id FROM aliases {where} ORDER BY alias", args).fetchall():
        aliases.setdefault(kid, []).append(alias)
    return [(k, tuple(versions.get(k[0], ())), tuple(aliases.get(k[0], ()))) for k in keys]


def _key_doc(rows: KeyRows) -> dict:
    """One key as a plain document (the snapshot format)."""
    k, versions, aliases = rows
    return {"key_id": k[0], "name": k[1], "spec": k[2], "purpose": k[3], "state": k[4],
            "prior_state": k[5], "owner": k[6], "created_at": _ts(k[7]), "rotated_at": _ts(k[8]),
            "rotation_period_s": k[9], "exportable": k[10], "latest_version": k[11],
            "min_decryption_version": k[12], "min_encryption_version": k[13],
            "deletion_due": _ts(k[14]), "tags": json.loads(k[15]), "policy": json.loads(k[16]),
            "aliases": list(aliases),
            "versions": [[v, handle, state, _ts(created), _ts(destroyed)]
                         for v, handle, state, created, destroyed in versions]}


def key_docs(con: Connection, key_id: str | None = None) -> list[dict]:
    """Keys as plain documents (the snapshot format), all of them or one."""
    return [_key_doc(rows) for rows in _key_rows(con, key_id)]


_SEPARATORS = (",", ":")


class SnapshotExporter:
    """Writes catalog.json from the committed catalog (called with the store lock held).

    It remembers what it wrote last: a change touches a key or two, and re-encoding only those
    keeps an export at 1,000 keys from costing ~40 ms; a commit that changed no catalog row
    (say, a request or a process opening the home) leaves the file alone, so other processes
    do not reload it, unless another process replaced the file meanwhile."""

    def __init__(self, home: Path) -> None:
        self.path = home / SNAPSHOT_NAME
        self._keys: dict[str, tuple[KeyRows, str]] = {}  # key_id -> (its rows, their JSON)
        self._written: tuple[str, tuple[int, int, int] | None] | None = None  # (text, stamp)

    def __call__(self, con: Connection) -> None:
        keys, parts = {}, []
        for rows in _key_rows(con):
            kid = rows[0][0]
            done = self._keys.get(kid)
            if done is None or done[0] != rows:
                done = (rows, json.dumps(_key_doc(rows), separators=_SEPARATORS))
            keys[kid] = done
            parts.append(done[1])
        self._keys = keys
        grants = con.execute("SELECT scope, principal, role FROM grants ORDER BY ALL").fetchall()
        text = (f'{{"keys":[{",".join(parts)}],'
                f'"grants":{json.dumps([list(g) for g in grants], separators=_SEPARATORS)},'
                f'"home_policy":{json.dumps(read_home_policy(con), separators=_SEPARATORS)}}}')
        if self._written is not None and self._written == (text, file_stamp(self.path)):
            return
        tmp = self.path.with_name(f".{SNAPSHOT_NAME}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._written = (text, file_stamp(self.path))


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size): files replaced by rename always get a new one."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def read_home_policy(con: Connection) -> dict:
    rows = con.execute("SELECT value FROM meta WHERE name = 'home_policy'").fetchall()
    return json.loads(rows[0][0]) if rows else {}


def load_key(con: Connection, name: str) -> Key:
    """The authoritative key row, read inside a write transaction (never the cache)."""
    row = con.execute(
        "SELECT key_id FROM keys WHERE name = ? UNION SELECT key_id FROM aliases WHERE alias = ?",
        [name, name]).fetchone()
    if row is None:
        raise KeyNotFound(f"no key named {name!r}; list keys with `keyledger key list`")
    return _key_from_doc(key_docs(con, row[0])[0], read_home_policy(con))


def _key_from_doc(d: dict, home_policy: dict) -> Key:
    spec, purpose = parse_spec(d["spec"]), Purpose(d["purpose"])
    period, source = resolve_rotation_period(d["rotation_period_s"], spec, purpose, d["tags"],
                                             home_policy)
    key = Key(
        key_id=d["key_id"], name=d["name"], spec=spec,
        purpose=purpose, state=KeyState(d["state"]), owner=d["owner"],
        created_at=datetime.fromisoformat(d["created_at"]),
        rotated_at=datetime.fromisoformat(d["rotated_at"]),
        rotation_period=period, rotation_source=source,
        exportable=bool(d["exportable"]), latest_version=d["latest_version"],
        min_decryption_version=d["min_decryption_version"],
        min_encryption_version=d["min_encryption_version"],
        prior_state=KeyState(d["prior_state"]) if d["prior_state"] else None,
        deletion_due=_dt(d["deletion_due"]), aliases=tuple(d["aliases"]), tags=d["tags"],
        policy=d.get("policy", {}),
    )
    for version, handle, state, created, destroyed in d["versions"]:
        key.versions[version] = KeyVersion(version, bytes.fromhex(handle), state,
                                           datetime.fromisoformat(created), _dt(destroyed))
    return key


class _View(NamedTuple):
    """One load of catalog.json; a ``Key`` is built from its document on first use (a reload
    after each change would otherwise build every key: ~25 ms at 1,000 keys)."""

    docs: dict[str, dict]  # key_id -> document
    ids: dict[str, str]  # name or alias -> key_id (names win over aliases)
    built: dict[str, Key]  # key_id -> Key, filled on demand
    grants: Grants
    home_policy: dict
    limits: dict[str, int]  # key_id -> usage limit, filled on demand (every encryption asks)

    def key(self, key_id: str | None) -> Key | None:
        return self.doc_key(key_id) if key_id is not None and key_id in self.docs else None

    def doc_key(self, key_id: str) -> Key:
        """The key of one of this view's documents, built on first use."""
        key = self.built.get(key_id)
        if key is None:
            key = self.built[key_id] = _key_from_doc(self.docs[key_id], self.home_policy)
        return key


_EMPTY = _View({}, {}, {}, {}, {}, {})


class CatalogCache:
    """This process's view of the catalog; refreshed from catalog.json when it changes."""

    def __init__(self, home: Path, refresh_ms: int) -> None:
        self._path = home / SNAPSHOT_NAME
        self._refresh_s = refresh_ms / 1000
        self._checked = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._view = _EMPTY

    def refresh(self, force: bool = False) -> None:
        """Reload catalog.json if it changed; ``force`` checks now instead of at most every
        ``refresh_ms``. (Writers replace the file by rename, so a changed file always has a
        new stamp: an unchanged one is never parsed again.)"""
        now = time.monotonic()
        if not force and now - self._checked < self._refresh_s:
            return
        with self._lock:
            self._checked = now
            stamp = file_stamp(self._path)
            if stamp == self._stamp:
                return
            if stamp is None:
                self._view, self._stamp = _EMPTY, None
                return
            doc = json.loads(self._path.read_text())
            docs = {d["key_id"]: d for d in doc["keys"]}
            ids = {d["name"]: kid for kid, d in docs.items()}
            for kid, d in docs.items():
                for alias in d["aliases"]:
                    ids.setdefault(alias, kid)
            grants = index_grants(tuple(g) for g in doc.get("grants", []))
            self._view = _View(docs, ids, {}, grants, doc.get("home_policy", {}), {})
            self._stamp = stamp

    @property
    def grants(self) -> Grants:
        return self._view.grants

    def grants_now(self) -> Grants:
        self.refresh()
        return self._view.grants

    def home_policy(self) -> dict:
        self.refresh()
        return self._view.home_policy

    def get(self, name: str) -> Key:
        self.refresh()
        view = self._view
        key = view.key(view.ids.get(name))
        if key is None:
            raise KeyNotFound(f"no key named {name!r}; list keys with `keyledger key list`")
        return key

    def usage_limit(self, key: Key) -> int:
        """Encryptions one version of ``key`` may make, as this snapshot says (see
        ``model.usage_limit``); computed once per key and snapshot."""
        view = self._view
        limit = view.limits.get(key.key_id)
        if limit is None:
            current = view.key(key.key_id) or key
            limit = view.limits[key.key_id] = usage_limit(current.policy, view.home_policy)
        return limit

    def get_id(self, key_id: str) -> Key | None:
        self.refresh()
        return self._view.key(key_id)

    def all_keys(self) -> list[Key]:
        self.refresh()
        view = self._view
        return [view.doc_key(kid) for kid in view.docs]
