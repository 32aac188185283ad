"""The key catalog: SQL over keys/versions/aliases, and the per-process snapshot cache.

Crypto calls must not open DuckDB (one writer process at a time, ~16 ms to open). After every
committed catalog change the writer, still holding the file lock, writes ``catalog.json``
atomically; every process keeps it in memory and reloads it when the file changes (checked at
most every ``refresh_ms``). That bounds how long another process may act on a stale state.
"""

from __future__ import annotations

import bisect
import functools
import json
import operator
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

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
from .keys import KEY_COLUMNS, VERSION_COLUMNS
from .storelock import StoreLock

SNAPSHOT_NAME = "catalog.json"


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


KeyRows = tuple[tuple, tuple, tuple]  # a key's row, its version rows, its aliases


# Hashes of catalog rows, computed by DuckDB: the exporter compares them with those of what it
# exported last. Every table has a primary key, so no two rows hash alike by repetition.
_KEY_HASH = f"hash({KEY_COLUMNS})"
_VERSION_HASH = f"hash({VERSION_COLUMNS})"
_ALIAS_HASH = "hash(alias, key_id)"
_GRANT_HASH = "hash(scope, principal, role)"

# per key: (its row's hash, its versions' and its aliases' hashes xor-ed), in row order
_KEY_PRINTS = f"""
    SELECT k.key_id, k.h, v.h, a.h
    FROM (SELECT rowid AS r, key_id, {_KEY_HASH} AS h FROM keys) k
    LEFT JOIN (SELECT key_id, bit_xor({_VERSION_HASH}) AS h FROM versions GROUP BY key_id) v
           ON v.key_id = k.key_id
    LEFT JOIN (SELECT key_id, bit_xor({_ALIAS_HASH}) AS h FROM aliases GROUP BY key_id) a
           ON a.key_id = k.key_id
    ORDER BY k.r"""
# one row: each catalog table's hashes xor-ed, and the home policy
_TOTALS = f"""
    SELECT (SELECT bit_xor({_KEY_HASH}) FROM keys),
           (SELECT bit_xor({_VERSION_HASH}) FROM versions),
           (SELECT bit_xor({_ALIAS_HASH}) FROM aliases),
           (SELECT bit_xor({_GRANT_HASH}) FROM grants),
           (SELECT value FROM meta WHERE name = 'home_policy')"""


def _key_rows(con: Connection, key_ids: list[str] | None = None,
              prints: dict[str, tuple[int, int, int]] | None = None) -> list[KeyRows]:
    """The catalog rows of every key (or of ``key_ids``), grouped per key, keys in the order
    they were created (the table's row order). ``prints`` receives each key's hashes, as
    ``_KEY_PRINTS`` computes them."""
    if key_ids is not None and not key_ids:
        return []
    args: list[object] = []
    where = ""
    if key_ids is not None:  # one key: a point lookup, several: one scan
        where = "WHERE key_id = ?" if len(key_ids) == 1 else "WHERE list_contains(?, key_id)"
        args = [key_ids[0] if len(key_ids) == 1 else key_ids]
    hashed = prints is not None
    keys = con.execute(
        f"SELECT {KEY_COLUMNS}{f', {_KEY_HASH}' if hashed else ''} FROM keys {where} "
        "ORDER BY rowid", args).fetchall()
    versions: dict[str, list] = {}
    vhash: dict[str, int] = {}
    for row in con.execute(
            f"SELECT {VERSION_COLUMNS}{f', {_VERSION_HASH}' if hashed else ''} FROM versions "
            f"{where} ORDER BY version", args).fetchall():
        versions.setdefault(row[0], []).append(row[1:6])
        if hashed:
            vhash[row[0]] = vhash.get(row[0], 0) ^ row[6]
    aliases: dict[str, list[str]] = {}
    ahash: dict[str, int] = {}
    for row in con.execute(
            f"SELECT alias, key_id{f', {_ALIAS_HASH}' if hashed else ''} FROM aliases {where} "
            "ORDER BY alias", args).fetchall():
        aliases.setdefault(row[1], []).append(row[0])
        if hashed:
            ahash[row[1]] = ahash.get(row[1], 0) ^ row[2]
    if prints is not None:
        for k in keys:
            prints[k[0]] = (k[17], vhash.get(k[0], 0), ahash.get(k[0], 0))
    return [(k[:17], tuple(versions.get(k[0], ())), tuple(aliases.get(k[0], ()))) for k in keys]


def _key_doc(rows: KeyRows) -> dict:
    """One key as a plain document (the snapshot format)."""
    k, versions, aliases = rows
    return {"key_id": k[0], "name": k[1], "spec": k[2], "purpose": k[3], "state": k[4],
            "prior_state": k[5], "owner": k[6], "created_at": _ts(k[7]), "rotated_at": _ts(k[8]),
            "rotation_period_s": k[9], "exportable": k[10], "latest_version": k[11],
            "min_decryption_version": k[12], "min_encryption_version": k[13],
            "deletion_due": _ts(k[14]), "tags": json.loads(k[15]), "policy": json.loads(k[16]),
            "aliases": list(aliases), "versions": [_version_doc(v) for v in versions]}


# how a changed key column's value appears in a key document (the others as they are)
_DOC_VALUE: dict[str, Callable[[Any], object]] = {
    "created_at": _ts, "rotated_at": _ts, "deletion_due": _ts, "tags": json.loads,
    "policy": json.loads}


def _version_doc(row: tuple) -> list:
    """One version (version, handle, state, created_at, destroyed_at) as in a key document."""
    version, handle, state, created, destroyed = row
    return [version, handle, state, _ts(created), _ts(destroyed)]


def key_docs(con: Connection, key_id: str | None = None) -> list[dict]:
    """Keys as plain documents (the snapshot format), all of them or one."""
    return [_key_doc(rows) for rows in _key_rows(con, None if key_id is None else [key_id])]


_SEPARATORS = (",", ":")


class _Exported(NamedTuple):
    """One key as last exported: its hashes (row, versions, aliases), document and JSON.
    ``prints`` is None for a document built from the rows a writer returned (``wrote``): the
    next export that checks the tables' hashes reads that key again."""

    prints: tuple[int, int, int] | None
    doc: dict
    text: str


class _Scope(NamedTuple):
    """The grants of one scope (a key_id, or ``*``) as last exported."""

    hash: int | None  # the rows' hashes xor-ed; None when built from a writer's rows
    rows: list[tuple[str, str, str]]  # (scope, principal, role), sorted
    text: str  # the rows as JSON list items


Stamp = tuple[int, int, int]  # see file_stamp
# what the exporter hands this process's cache after each export: key documents by key_id,
# grants, the home policy, the stamp of the file just written, the keys whose documents
# changed (None: not known) and the stamp of the export before (``CatalogCache.install``)
Installer = Callable[[dict[str, dict], Grants, dict, Stamp | None, set[str] | None,
                      Stamp | None], None]
_UNKNOWN = (object(),) * 5  # the tables' hashes after an export that did not compute them


class _Wrote(NamedTuple):
    """What one transaction wrote to the catalog rows of one key (``wrote``)."""

    tx: object  # the transaction (its ``Tx``): rows of a transaction rolled back never count
    key_id: str
    key: tuple | Mapping[str, object]  # a new row (KEY_COLUMNS), or the columns it set
    versions: tuple[tuple, ...]  # version rows it inserted (VERSION_COLUMNS)
    states: Mapping[int, str]  # versions whose state it set
    grants: tuple[tuple[str, str, str], ...] | None  # a new scope's grants, all of them


class SnapshotExporter:
    """Writes catalog.json from the committed catalog (called with the store lock held).

    Incremental per changed key. The writer says which keys its transaction changes
    (``expect``); the export reads only those keys' rows and grants, with their hashes, and
    one query checks every catalog table's hashes (xor-ed, computed by DuckDB) against what
    it then expects. Anything else that changed (another process's commit, one that died
    between its commit and its export, a write that did not say what it changed) makes the
    totals differ; then every key's hashes are compared and only the keys that differ are
    read and encoded. The file is still written whole, to a temporary name and renamed over
    catalog.json, so a reader sees the old catalog or the new one, never a mix. A commit that
    changed no catalog row leaves the file alone (other processes do not reload it), unless
    it differs from what this process would write. ``install`` (this process's
    ``CatalogCache.install``) receives what was exported: the writer never re-reads it.

    A writer that names every row it changes, as the writes returned them (``wrote``: create
    and rotate), spares even those reads: when this process has held the store without a break
    since its last export (``lock``, the store's ``StoreLock``) and committed no other catalog
    write meanwhile, nothing else can have changed, so the key's document is built from those
    rows and the tables' hashes are not checked. Those keys are read again by the next export
    that checks them (the first one of the next hold, or after any other write)."""

    def __init__(self, home: Path, install: Installer | None = None,
                 lock: StoreLock | None = None) -> None:
        self.path = home / SNAPSHOT_NAME
        self._install = install
        self._lock = lock
        self._since: tuple[int, int] | None = None  # lock.since() after the last export
        self._wrote: list[_Wrote] = []
        self._expected: set[str] = set()
        self._keys: dict[str, _Exported] = {}  # key_id -> as last exported, in row order
        # the same keys' documents and JSON texts, kept along (a change of one key costs no
        # pass over every key): documents by key_id, texts in row order, each key's index
        self._docs: dict[str, dict] = {}
        self._texts: list[str] = []
        self._pos: dict[str, int] = {}
        self._names: set[str] = set()  # every key's name and alias
        self._sums = (0, 0, 0)  # the exported keys' hashes xor-ed (keys, versions, aliases)
        self._scopes: dict[str, _Scope] = {}  # grants by scope
        self._scopes_sum = 0  # their hashes xor-ed
        self._grants: tuple[Grants, str] = ({}, "[]")  # indexed, and as JSON
        self._order: tuple[list[str], list[str]] = ([], [])  # scopes sorted, and their texts
        self._policy: tuple[dict, str] = ({}, "{}")  # the home policy, and as JSON
        self._totals: tuple = (None,) * 5  # _TOTALS as of the last export
        self._written: tuple[str, Stamp | None] | None = None  # (text, its file's stamp)
        self._installed: Stamp | None = None  # the stamp last handed to ``install``

    def expect(self, key_id: str) -> None:
        """The transaction being written changes this key (or its grants): the next export
        reads it again. Call inside the transaction; a key that did not change costs one
        read, a key changed without saying so costs a comparison of every key's hashes."""
        self._expected.add(key_id)

    def current(self) -> bool:
        """Whether the last export is still the whole committed catalog: this process has held
        the store without a break since (``lock``) and committed no catalog write meanwhile, so
        no other process can have written either. Ask inside a transaction (a writer's checks)."""
        return (self._lock is not None and self._since is not None
                and self._lock.since() == self._since)

    def name_taken(self, name: str) -> bool | None:
        """Whether a key or an alias has this name, as the last export knows when it is
        ``current`` (no query); None when only the store can say."""
        return (name in self._names) if self.current() else None

    def status(self, key_id: str) -> tuple[KeyState, int] | None:
        """A key's state and latest version, as the last export knows when it is ``current``;
        None when only the store can say."""
        doc = self._docs.get(key_id) if self.current() else None
        return None if doc is None else (KeyState(doc["state"]), doc["latest_version"])

    def wrote(self, tx: Connection, key_id: str, key: tuple | Mapping[str, object], *,
              versions: Iterable[tuple] = (), states: Mapping[int, str] | None = None,
              grants: Iterable[tuple[str, str, str]] | None = None) -> None:
        """The transaction ``tx`` changes the catalog rows of key ``key_id`` so: ``key`` is its
        new row as the INSERT returned it, or the columns an UPDATE set (values as bound);
        ``versions`` the version rows inserted (as returned), ``states`` the versions whose
        state was set; with ``grants`` (a new key's) every grant of the key's scope. Call inside
        the transaction, after the writes; a transaction that calls this must name every
        catalog row it changes so (a key it only ``expect``-s turns the tables' check back on)."""
        self._wrote.append(_Wrote(tx, key_id, key, tuple(versions),
                                  dict(states or {}),
                                  None if grants is None else tuple(grants)))

    def __call__(self, con: Connection) -> None:
        expected, self._expected = self._expected, set()
        wrote, self._wrote = self._wrote, []
        since, self._since = self._since, None  # set again once this export is complete
        now = None if self._lock is None else self._lock.since()
        if (wrote and not expected and since is not None and now == (since[0], since[1] + 1)
                and all(w.tx is con and (
                    isinstance(w.key, tuple) or w.key_id in self._keys) for w in wrote)):
            self._patch(wrote)  # nothing but these rows changed since the last export
            self._totals = _UNKNOWN
            changed: set[str] | None = {w.key_id for w in wrote}
            text = self._text()
        else:
            text, changed = self._export(con, expected | {w.key_id for w in wrote}), None
        stamp = file_stamp(self.path)
        ours = self._written is not None and self._written[1] == stamp
        if ours and self._written is not None and self._written[0] == text:
            self._since = now
            return  # nothing changed, and the file is still this process's export
        if ours or stamp is None or _read(self.path) != text:
            tmp = self.path.with_name(f".{SNAPSHOT_NAME}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
            stamp = file_stamp(self.path)
        self._written = (text, stamp)
        if self._install is not None:
            self._install(dict(self._docs), self._grants[0], self._policy[0], stamp, changed,
                          self._installed)
            self._installed = stamp
        self._since = now

    def _export(self, con: Connection, expected: set[str]) -> str:
        """The catalog's text after checking every table's hashes: the expected keys (and
        any built from a writer's rows) read again, and whatever else the hashes say changed."""
        totals = con.execute(_TOTALS).fetchall()[0]
        if self._written is not None and totals == self._totals:
            return self._written[0]
        expected |= {kid for kid, e in self._keys.items() if e.prints is None}
        expected |= {scope for scope, g in self._scopes.items() if g.hash is None}
        self._export_keys(con, expected, totals[:3])
        self._export_grants(con, expected, totals[3])
        if self._written is None or totals[4] != self._totals[4]:
            policy = json.loads(totals[4]) if totals[4] else {}
            self._policy = (policy, json.dumps(policy, separators=_SEPARATORS))
        self._totals = totals
        return self._text()

    def _text(self) -> str:
        return (f'{{"keys":[{",".join(self._texts)}],'
                f'"grants":{self._grants[1]},"home_policy":{self._policy[1]}}}')

    def _patch(self, wrote: list[_Wrote]) -> None:
        """Build the written keys' documents (and a new key's grants) from what their writes
        wrote, on top of what was last exported; their hashes are left unknown."""
        sums, scopes = self._sums, dict(self._scopes)
        for w in wrote:
            old = self._keys.get(w.key_id)
            if old is not None and old.prints is not None:
                sums = _xor(sums, old.prints)
            if isinstance(w.key, tuple):
                doc = _key_doc((w.key, (), () if old is None else old.doc["aliases"]))
            else:
                assert old is not None  # checked before
                doc = {**old.doc, **{c: _DOC_VALUE.get(c, _same)(v) for c, v in w.key.items()}}
            versions = {} if old is None else {v[0]: v for v in old.doc["versions"]}
            for v, state in w.states.items():
                versions[v] = [v, versions[v][1], state, *versions[v][3:]]
            versions.update((row[1], _version_doc(row[1:])) for row in w.versions)
            doc["versions"] = [versions[v] for v in sorted(versions)]
            self._put(w.key_id, _Exported(None, doc, json.dumps(doc, separators=_SEPARATORS)))
            if w.grants:
                rows = sorted(w.grants)
                scopes[w.key_id] = _Scope(None, rows, ",".join(
                    json.dumps(list(r), separators=_SEPARATORS) for r in rows))
            elif w.grants is not None:
                scopes.pop(w.key_id, None)  # a scope without grants is no scope
        self._sums = sums
        changed = {w.key_id for w in wrote if w.grants is not None}
        if changed:
            self._set_scopes(scopes, changed, functools.reduce(operator.xor, (
                g.hash for scope in changed for g in (self._scopes.get(scope),)
                if g is not None and g.hash is not None), self._scopes_sum))

    def _export_keys(self, con: Connection, expected: set[str], totals: tuple) -> None:
        """Every key as committed, in row order: the expected ones read again, and when the
        tables' hashes say more changed, every key whose hashes differ."""
        want = tuple(t or 0 for t in totals)
        keys, sums = self._reread(con, dict(self._keys), self._sums, list(expected))
        if sums != want:
            prints = {kid: (kh, vh or 0, ah or 0)
                      for kid, kh, vh, ah in con.execute(_KEY_PRINTS).fetchall()}
            keys, sums = self._reread(con, keys, sums, [
                kid for kid in keys.keys() | prints.keys()
                if kid not in keys or keys[kid].prints != prints.get(kid)])
            keys = {kid: keys[kid] for kid in prints}  # in row order
        self._keys, self._sums = keys, sums
        self._docs = {kid: e.doc for kid, e in keys.items()}
        self._texts = [e.text for e in keys.values()]
        self._pos = {kid: i for i, kid in enumerate(keys)}
        self._names = {n for e in keys.values() for n in (e.doc["name"], *e.doc["aliases"])}

    def _put(self, key_id: str, exported: _Exported) -> None:
        """Take one key's new export (a new key goes last, as its row does)."""
        self._keys[key_id] = exported
        self._docs[key_id] = exported.doc
        i = self._pos.get(key_id)
        if i is None:
            self._pos[key_id] = len(self._texts)
            self._texts.append(exported.text)
            self._names.update((exported.doc["name"], *exported.doc["aliases"]))
        else:
            self._texts[i] = exported.text

    @staticmethod
    def _reread(con: Connection, keys: dict[str, _Exported], sums: tuple[int, int, int],
                key_ids: list[str]) -> tuple[dict[str, _Exported], tuple[int, int, int]]:
        """``keys`` with ``key_ids`` read again (those that no longer exist dropped), and
        the hashes' xor updated."""
        prints: dict[str, tuple[int, int, int]] = {}
        rows_of = {rows[0][0]: rows for rows in _key_rows(con, key_ids, prints)}
        for kid in key_ids:
            old = keys.pop(kid, None) if kid not in rows_of else keys.get(kid)
            if old is not None and old.prints is not None:
                sums = _xor(sums, old.prints)
            if kid in rows_of:
                doc = _key_doc(rows_of[kid])
                keys[kid] = _Exported(prints[kid], doc, json.dumps(doc, separators=_SEPARATORS))
                sums = _xor(sums, prints[kid])
        return keys, sums

    def _export_grants(self, con: Connection, expected: set[str], total: int | None) -> None:
        """The grants as committed: the expected keys' scopes read again, and all of them
        when the table's hashes say more changed."""
        if total == self._totals[3] and self._written is not None:
            return  # the table's hashes did not move: neither did a grant
        scopes = dict(self._scopes)
        changed = self._read_scopes(con, scopes, sorted(expected))
        sums = functools.reduce(operator.xor, (
            g.hash for scope in changed for g in (self._scopes.get(scope), scopes.get(scope))
            if g is not None and g.hash is not None), self._scopes_sum)
        if sums != (total or 0):
            scopes, changed = {}, set(scopes) | set(self._scopes)
            changed |= self._read_scopes(con, scopes, None)
            sums = functools.reduce(operator.xor, (g.hash or 0 for g in scopes.values()), 0)
        if changed:
            self._set_scopes(scopes, changed, sums)

    def _set_scopes(self, scopes: dict[str, _Scope], changed: set[str], sums: int) -> None:
        """Take ``scopes`` as the grants, re-indexing the ``changed`` ones; ``sums``: the
        hashes of those whose hash is known, xor-ed."""
        grants = dict(self._grants[0])
        for scope in changed:
            for _, principal, _ in self._scopes[scope].rows if scope in self._scopes else ():
                grants.pop((scope, principal), None)
            if scope in scopes:
                grants.update(index_grants(scopes[scope].rows))
        order, texts = self._order
        if len(changed) > 8:  # a whole re-read: sort again
            order = sorted(scopes)
            texts = [scopes[scope].text for scope in order]
        for scope in () if len(changed) > 8 else changed:  # a few: in place, still sorted
            i = bisect.bisect_left(order, scope)
            there = i < len(order) and order[i] == scope
            if scope in scopes and there:
                texts[i] = scopes[scope].text
            elif scope in scopes:
                order.insert(i, scope)
                texts.insert(i, scopes[scope].text)
            elif there:
                del order[i], texts[i]
        self._scopes, self._scopes_sum, self._order = scopes, sums, (order, texts)
        self._grants = (grants, "[" + ",".join(texts) + "]")

    @staticmethod
    def _read_scopes(con: Connection, scopes: dict[str, _Scope],
                     only: list[str] | None) -> set[str]:
        """Read the grants of the scopes ``only`` (all when None) into ``scopes``; returns
        the scopes whose grants changed."""
        if only is not None and not only:
            return set()
        where, args = ("", []) if only is None else ("WHERE list_contains(?, scope)", [only])
        got: dict[str, list] = {}
        for *row, h in con.execute(f"SELECT scope, principal, role, {_GRANT_HASH} FROM grants "
                                   f"{where} ORDER BY ALL", args).fetchall():
            got.setdefault(row[0], []).append((tuple(row), h))
        changed = set()
        for scope in (only if only is not None else got):
            rows = got.get(scope)
            new = None if rows is None else _Scope(
                functools.reduce(operator.xor, (h for _, h in rows), 0), [r for r, _ in rows],
                ",".join(json.dumps(list(r), separators=_SEPARATORS) for r, _ in rows))
            if new != scopes.get(scope):
                changed.add(scope)
            if new is None:
                scopes.pop(scope, None)
            else:
                scopes[scope] = new
        return changed


def _same(value: object) -> object:
    return value


def _xor(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int, int]:
    return a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2]


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


def _view_after(old: _View, docs: dict[str, dict], changed: set[str], grants: Grants,
                home_policy: dict) -> _View | None:
    """``old`` with the documents of the ``changed`` keys replaced by those in ``docs`` (the
    others are ``old``'s): its name index and built keys updated, not rebuilt. None when a
    changed key vanished or its names moved (then the caller builds the view whole)."""
    ids, built = dict(old.ids), dict(old.built)
    for kid in changed:
        new, before = docs.get(kid), old.docs.get(kid)
        if new is None or (before is not None and (
                before["name"], before["aliases"]) != (new["name"], new["aliases"])):
            return None
        built.pop(kid, None)
        if before is None:  # a new key: names win over aliases, as in _view
            ids[new["name"]] = kid
            for alias in new["aliases"]:
                ids.setdefault(alias, kid)
    return _View(docs, ids, built, grants, home_policy, {})


class CatalogCache:
    """This process's view of the catalog; refreshed from catalog.json when it changes."""

    def __init__(self, home: Path, refresh_ms: int) -> None:
        self._path = home / SNAPSHOT_NAME
        # (public for the crypto hot path, which makes get()'s refresh test inline and keeps
        # what it checked per ``view``: one load of catalog.json, never changed once made)
        self.refresh_s = refresh_ms / 1000
        self.checked = 0.0  # time.monotonic() of the last look at catalog.json
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self.view = _EMPTY

    def refresh(self, force: bool = False) -> None:
        """Reload catalog.json if it changed; ``force`` checks now instead of at most every
        ``refresh_ms``. (Writers replace the file by rename, so a changed file always has a
        new stamp: an unchanged one is never parsed again.)"""
        now = time.monotonic()
        if not force and now - self.checked < self.refresh_s:
            return
        with self._lock:
            self.checked = now
            stamp = file_stamp(self._path)
            if stamp == self._stamp:
                return
            if stamp is None:
                self.view, self._stamp = _EMPTY, None
                return
            doc = json.loads(self._path.read_text())
            self.view = _view({d["key_id"]: d for d in doc["keys"]}, {}, index_grants(
                tuple(g) for g in doc.get("grants", [])), doc.get("home_policy", {}))
            self._stamp = stamp

    def install(self, docs: dict[str, dict], grants: Grants, home_policy: dict,
                stamp: Stamp | None, changed: set[str] | None = None,
                base: Stamp | None = None) -> None:
        """Take the catalog this process just exported (``SnapshotExporter``), as if it had
        been read back from catalog.json with ``stamp``, without reading it: a change then
        costs this process no reload. Keys whose documents did not change keep their built
        ``Key`` (when the home policy, which their rotation periods depend on, is the same).
        ``changed``: the only keys whose documents differ from the export stamped ``base``;
        when that is the view held, only those keys are indexed again (no pass over every key)."""
        with self._lock:
            old, view = self.view, None
            same_policy = home_policy == old.home_policy
            if changed is not None and base is not None and base == self._stamp and same_policy:
                view = _view_after(old, docs, changed, grants, home_policy)
            if view is None:
                built = {kid: key for kid, key in old.built.items()
                         if docs.get(kid) is old.docs[kid]} if same_policy else {}
                view = _view(docs, built, grants, home_policy)
            self.view = view
            self._stamp, self.checked = stamp, time.monotonic()

    @property
    def grants(self) -> Grants:
        return self.view.grants

    def grants_now(self) -> Grants:
        if time.monotonic() - self.checked >= self.refresh_s:  # refresh()'s own test, inline
            self.refresh()
        return self.view.grants

    def home_policy(self) -> dict:
        self.refresh()
        return self.view.home_policy

    def get(self, name: str) -> Key:
        # every audited call on a key asks this: refresh()'s test and the built key inline
        if time.monotonic() - self.checked >= self.refresh_s:
            self.refresh()
        view = self.view
        key_id = view.ids.get(name)
        key = view.built.get(key_id) if key_id is not None else None
        if key is None:
            key = view.key(key_id)
            if key is None:
                raise KeyNotFound(f"no key named {name!r}; list keys with `keyledger key list`")
        return key

    def usage_limit(self, key: Key) -> int:
        """Encryptions one version of ``key`` may make, as this snapshot says (see
        ``model.usage_limit``); computed once per key and snapshot."""
        view = self.view
        limit = view.limits.get(key.key_id)
        if limit is None:
            current = view.key(key.key_id) or key
            limit = view.limits[key.key_id] = usage_limit(current.policy, view.home_policy)
        return limit

    def get_id(self, key_id: str) -> Key | None:
        if time.monotonic() - self.checked >= self.refresh_s:  # as in get: every decrypt asks
            self.refresh()
        view = self.view
        key = view.built.get(key_id)
        return key if key is not None else view.key(key_id)

    def all_keys(self) -> list[Key]:
        self.refresh()
        view = self.view
        return [view.doc_key(kid) for kid in view.docs]
