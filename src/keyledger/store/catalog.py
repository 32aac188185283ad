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
from collections.abc import Callable
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


def _key_rows(con: Connection, key_ids: list[str] | None = None) -> list[KeyRows]:
    """The catalog rows of every key (or of ``key_ids``), grouped per key, keys in the order
    they were created (the table's row order)."""
    if key_ids is not None and not key_ids:
        return []
    where, args = ("WHERE list_contains(?, key_id)", [key_ids]) if key_ids else ("", [])
    keys = con.execute(
        f"""SELECT key_id, name, spec, purpose, state, prior_state, owner, created_at, rotated_at,
                  rotation_period_s, exportable, latest_version, min_decryption_version,
                  min_encryption_version, deletion_due, tags, policy FROM keys {where}
            ORDER BY rowid""",
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
    return [_key_doc(rows) for rows in _key_rows(con, None if key_id is None else [key_id])]


_SEPARATORS = (",", ":")


# Per key, a hash of its row, its versions' and its aliases': the exporter compares them with
# the ones it exported last, so a commit re-reads and re-encodes only the keys that changed,
# whichever process (or crash) changed them. Keys come in the table's row order.
_FINGERPRINTS = """
    SELECT k.key_id,
           hash(k.name, k.spec, k.purpose, k.state, k.prior_state, k.owner, k.created_at,
                k.rotated_at, k.rotation_period_s, k.exportable, k.latest_version,
                k.min_decryption_version, k.min_encryption_version, k.deletion_due, k.tags,
                k.policy, v.fp, a.fp)
    FROM keys k
    LEFT JOIN (SELECT key_id, bit_xor(hash(version, handle, state, created_at, destroyed_at))
               AS fp FROM versions GROUP BY key_id) v ON v.key_id = k.key_id
    LEFT JOIN (SELECT key_id, bit_xor(hash(alias)) AS fp FROM aliases GROUP BY key_id) a
           ON a.key_id = k.key_id
    ORDER BY k.rowid"""
_GRANTS_AND_POLICY = """
    SELECT (SELECT count(*) FROM grants),
           (SELECT bit_xor(hash(scope, principal, role)) FROM grants),
           (SELECT value FROM meta WHERE name = 'home_policy')"""


class _Exported(NamedTuple):
    """One key as last exported: its fingerprint, its document and that document's JSON."""

    fingerprint: int
    doc: dict
    text: str


# what the exporter hands this process's cache after each export: key documents by key_id,
# grants, the home policy and the stamp of the file just written
Stamp = tuple[int, int, int]  # see file_stamp
Installer = Callable[[dict[str, dict], Grants, dict, Stamp | None], None]


class SnapshotExporter:
    """Writes catalog.json from the committed catalog (called with the store lock held).

    Incremental per changed key: one query fingerprints every key in DuckDB, and only the keys
    whose fingerprint moved since this process's last export (changed here, by another
    process, or by one that died between its commit and its export) are read and encoded
    again; grants are read again only when they changed. The file is still written whole,
    to a temporary name and renamed over catalog.json, so a reader sees the old catalog or
    the new one, never a mix. A commit that changed no catalog row (say, a request or a
    process opening the home) leaves the file alone, so other processes do not reload it,
    unless the file differs from what this process would write. ``install`` (this process's
    ``CatalogCache.install``) receives what was exported, so the writer never re-reads its
    own export."""

    def __init__(self, home: Path, install: Installer | None = None) -> None:
        self.path = home / SNAPSHOT_NAME
        self._install = install
        self._keys: dict[str, _Exported] = {}  # key_id -> as last exported
        self._rest: tuple | None = None  # (grant count, grants' hash, home policy JSON)
        self._grants: tuple[str, Grants] = ("[]", {})  # grants as JSON, and indexed
        self._home_policy: tuple[str, dict] = ("{}", {})
        self._written: tuple[str, tuple[int, int, int] | None] | None = None  # (text, stamp)

    def __call__(self, con: Connection) -> None:
        keys = self._keys_now(con)
        self._grants_and_policy_now(con)
        text = (f'{{"keys":[{",".join(e.text for e in keys.values())}],'
                f'"grants":{self._grants[0]},"home_policy":{self._home_policy[0]}}}')
        self._keys = keys
        stamp = file_stamp(self.path)
        ours = self._written is not None and self._written[1] == stamp
        if ours and self._written is not None and self._written[0] == text:
            return  # nothing changed, and the file is still this process's export
        if ours or stamp is None or _read(self.path) != text:
            tmp = self.path.with_name(f".{SNAPSHOT_NAME}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            stamp = file_stamp(self.path)
        self._written = (text, stamp)
        if self._install is not None:
            self._install({kid: e.doc for kid, e in keys.items()}, self._grants[1],
                          self._home_policy[1], stamp)

    def _keys_now(self, con: Connection) -> dict[str, _Exported]:
        """Every key as committed, in row order; only the changed ones read and encoded."""
        prints = con.execute(_FINGERPRINTS).fetchall()
        changed = [kid for kid, fp in prints
                   if (done := self._keys.get(kid)) is None or done.fingerprint != fp]
        fresh = {rows[0][0]: rows for rows in _key_rows(con, changed)}
        keys = {}
        for kid, fp in prints:
            rows = fresh.get(kid)
            if rows is None:
                keys[kid] = self._keys[kid]
            else:
                doc = _key_doc(rows)
                keys[kid] = _Exported(fp, doc, json.dumps(doc, separators=_SEPARATORS))
        return keys

    def _grants_and_policy_now(self, con: Connection) -> None:
        rest = con.execute(_GRANTS_AND_POLICY).fetchall()[0]
        if self._rest is not None and rest == self._rest:
            return
        if self._rest is None or rest[:2] != self._rest[:2]:
            grants = con.execute(
                "SELECT scope, principal, role FROM grants ORDER BY ALL").fetchall()
            self._grants = (json.dumps([list(g) for g in grants], separators=_SEPARATORS),
                            index_grants(grants))
        policy = json.loads(rest[2]) if rest[2] else {}
        self._home_policy = (json.dumps(policy, separators=_SEPARATORS), policy)
        self._rest = rest


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


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


def key_status(con: Connection, key_id: str) -> tuple[KeyState, int]:
    """A key's committed state and latest version (two columns, not the whole key)."""
    rows = con.execute("SELECT state, latest_version FROM keys WHERE key_id = ?",
                       [key_id]).fetchall()
    if not rows:
        raise KeyNotFound(f"no key with id {key_id}; list keys with `keyledger key list`")
    return KeyState(rows[0][0]), rows[0][1]


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


def _view(docs: dict[str, dict], built: dict[str, Key], grants: Grants,
          home_policy: dict) -> _View:
    ids = {d["name"]: kid for kid, d in docs.items()}
    for kid, d in docs.items():
        for alias in d["aliases"]:
            ids.setdefault(alias, kid)  # names win over aliases
    return _View(docs, ids, built, grants, home_policy, {})


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
            self._view = _view({d["key_id"]: d for d in doc["keys"]}, {}, index_grants(
                tuple(g) for g in doc.get("grants", [])), doc.get("home_policy", {}))
            self._stamp = stamp

    def install(self, docs: dict[str, dict], grants: Grants, home_policy: dict,
                stamp: tuple[int, int, int] | None) -> None:
        """Take the catalog this process just exported (``SnapshotExporter``), as if it had
        been read back from catalog.json with ``stamp``, without reading it: a change then
        costs this process no reload. Keys whose documents did not change keep their built
        ``Key`` (when the home policy, which their rotation periods depend on, is the same)."""
        with self._lock:
            old = self._view
            built = {kid: key for kid, key in old.built.items()
                     if docs.get(kid) is old.docs[kid]} if home_policy == old.home_policy else {}
            self._view = _view(docs, built, grants, home_policy)
            self._stamp, self._checked = stamp, time.monotonic()

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
