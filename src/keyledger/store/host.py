"""The process's one DuckDB instance, which store files are attached to and detached from.

Starting a DuckDB instance costs ~16-35 ms of CPU whatever the file (an in-memory database
costs the same: DuckDB registers its built-in functions and extensions), and a store is opened
for every transaction of a process that does not hold it. So each process starts one
in-memory instance once and ``ATTACH``es a store file to it for as long as a connection of
the process uses the file (~2-4 ms), and ``DETACH``es it after the last one (which
checkpoints the file and drops DuckDB's lock on it, as closing an instance does). Each
connection is a cursor of that instance whose default database is the attached file, so SQL
names tables without a catalog.

A caller's SQL runs on a *sandbox* instead: an in-memory instance per store file (the newest
few kept) with file access turned off after its first ``ATTACH`` (DuckDB can turn file access
off for a running instance but never on again; the attached file's own paths stay allowed, so
it can be detached after each read and attached again for the next).

Attach and detach are counted per file and must be called with the process's store lock
(``db._process_lock``) and the file's ``StoreLock`` held. A forked child starts its own
instance: the parent's belongs to the parent's threads.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from pathlib import Path

import duckdb

_host: duckdb.DuckDBPyConnection | None = None
_host_pid = 0
_aliases = itertools.count(1)
_attached: dict[Path, tuple[str, int]] = {}  # file -> (its catalog name, connections using it)
_sandboxes: OrderedDict[Path, tuple[int, duckdb.DuckDBPyConnection]] = OrderedDict()
SANDBOXES_KEPT = 4


def _instance() -> duckdb.DuckDBPyConnection:
    global _host, _host_pid
    if _host is None or _host_pid != os.getpid():
        _attached.clear()  # in a forked child, nothing is attached to the new instance
        _host = duckdb.connect(":memory:", config={"threads": 2})
        _host_pid = os.getpid()
    return _host


def attach(path: Path) -> duckdb.DuckDBPyConnection:
    """A connection whose default database is the store file at ``path``, attaching the file
    first if no connection of this process uses it. Raises ``duckdb.Error`` as opening the file
    would (e.g. the lock error while a program other than keyledger holds it)."""
    host = _instance()
    key = Path(os.path.abspath(path))
    alias, users = _attached.get(key, ("", 0))
    if alias and not users:  # an earlier DETACH failed: it must succeed before a new ATTACH
        host.execute(f"DETACH {alias}")
        del _attached[key]
    if not users:
        alias = f"kl_store_{next(_aliases)}"
        host.execute(_attach_sql(key, alias))
    _attached[key] = (alias, users + 1)
    try:
        return _cursor(host, alias)
    except BaseException:
        detach(path, None)
        raise


def _cursor(instance: duckdb.DuckDBPyConnection, alias: str) -> duckdb.DuckDBPyConnection:
    """A connection of ``instance`` on the attached database ``alias``. DuckDB 2.0's cursors
    start with the progress bar off (never in a notebook's output; its ``connect`` turns it on),
    so no ``SET`` per transaction: ``tests/test_store_starts.py`` checks it."""
    con = instance.cursor()
    con.execute(f"USE {alias}")
    return con


def _attach_sql(path: Path, alias: str) -> str:
    quoted = str(path).replace("'", "''")
    return f"ATTACH '{quoted}' AS {alias}"


def sibling(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A second connection of the same instance whose default database is ``con``'s (a bare
    ``cursor()`` would default to the instance's in-memory database)."""
    (name,) = con.execute("SELECT current_database()").fetchall()[0]
    cur = con.cursor()
    cur.execute(f'USE "{name}"')
    return cur


def detach(path: Path, con: duckdb.DuckDBPyConnection | None) -> None:
    """Close ``con`` (from ``attach``) and detach the file after its last connection: DuckDB
    checkpoints it and releases its lock, as when an instance closes."""
    key = Path(os.path.abspath(path))
    try:
        if con is not None:
            con.close()
    finally:
        alias, users = _attached.get(key, ("", 0))
        if users > 1:
            _attached[key] = (alias, users - 1)
        elif users == 1:
            _attached[key] = (alias, 0)  # kept until DETACH succeeds (see ``attach``)
            _instance().execute(f"DETACH {alias}")
            del _attached[key]


def attach_sandboxed(path: Path) -> duckdb.DuckDBPyConnection:
    """A connection to the store file at ``path`` on its sandbox instance (file access off:
    no ``read_csv`` of /etc/passwd, no ``COPY TO``, no ``ATTACH`` of another file). Close it
    with ``detach_sandboxed``."""
    key = Path(os.path.abspath(path))
    attach_sql = _attach_sql(key, "kl_store")
    pid, instance = _sandboxes.pop(key, (0, None))
    if instance is None or pid != os.getpid():
        instance = duckdb.connect(":memory:", config={"threads": 2})
        instance.execute(attach_sql)
        instance.execute("SET enable_external_access = false")
    else:
        instance.execute(attach_sql)  # the file's own paths stay allowed
    _sandboxes[key] = (os.getpid(), instance)
    while len(_sandboxes) > SANDBOXES_KEPT:
        _, (old_pid, old) = _sandboxes.popitem(last=False)
        if old_pid == os.getpid():
            old.close()
    try:
        return _cursor(instance, "kl_store")
    except BaseException:
        instance.execute("DETACH kl_store")
        raise


def detach_sandboxed(path: Path, con: duckdb.DuckDBPyConnection) -> None:
    """Close ``con`` (from ``attach_sandboxed``) and detach the file from its sandbox."""
    key = Path(os.path.abspath(path))
    try:
        con.close()
    finally:
        entry = _sandboxes.get(key)
        if entry is not None:
            entry[1].execute("DETACH kl_store")
