"""DuckDB access for many processes: short connections, lock retry with backoff, mapped errors.

DuckDB lets one process at a time hold a database file (even read-only opens fail while a
writer holds it). keyledger therefore never keeps the file open: every read or write opens a
connection, does its work in one transaction, and closes it. A busy file is retried with
exponential backoff; only after ``busy_timeout`` does the caller see ``StoreBusy``.

Opening the file was most of a small transaction's cost (~16-35 ms of CPU: a DuckDB instance
starts, and its close checkpoints). So a process starts one in-memory instance once and attaches
the store file to it per transaction instead (``host.py``: ~2-4 ms, plus the checkpoint on
detach). ``Database.hold()`` keeps the file attached for a block of bulk work, so each
transaction only makes a connection (~0.3 ms); other processes wait meanwhile.
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import duckdb

from ..errors import StoreError
from . import host
from .storelock import busy, store_lock

_PID_RE = re.compile(r"PID (\d+)")
_process_lock = threading.RLock()  # one connection per process at a time, across threads


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set lock" in text)


class Database:
    def __init__(self, path: Path, busy_timeout: float = 15.0,
                 on_commit: Callable[[Tx], None] | None = None) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._on_commit = on_commit
        self._keeper: duckdb.DuckDBPyConnection | None = None
        self._holds = 0
        self._close_after_hold: list[BinaryIO] = []
        self._lock = store_lock(path)

    def _connect(self, timeout: float | None = None, *,
                 sandboxed: bool = False) -> duckdb.DuckDBPyConnection:
        """Open the file; while another process holds it, retry for ``timeout`` seconds
        (default: the busy timeout). ``sandboxed``: with file access off for the instance's
        whole life (DuckDB can turn it off for a running instance, never on again)."""
        timeout = self.busy_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._lock.acquire(deadline, self.path, timeout)  # before DuckDB so much as reads it
        try:
            return self._open_instance(deadline, timeout, sandboxed)
        except BaseException:
            self._lock.release()
            raise

    def _close(self, con: duckdb.DuckDBPyConnection, *, sandboxed: bool = False) -> None:
        """Close a connection from ``_connect`` (and detach the file after the last one)."""
        try:
            if sandboxed:
                host.detach_sandboxed(self.path, con)
            else:
                host.detach(self.path, con)
        finally:
            self._lock.release()

    def _open_instance(self, deadline: float, timeout: float, sandboxed: bool) -> duckdb.DuckDBPyConnection:
        """Attach the file to the process's DuckDB instance (``host``), or to its sandbox
        instance (file access off) when ``sandboxed``. DuckDB's own lock still refuses a file
        that a program other than keyledger holds: retry it until ``deadline``."""
        delay = 0.002
        while True:
            try:
                return host.attach_sandboxed(self.path) if sandboxed else host.attach(self.path)
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):
                    raise StoreError(f"cannot open the store {self.path}: {exc}") from None
                if time.monotonic() >= deadline:
                    m = _PID_RE.search(str(exc))
                    holder = f"process {m.group(1)}" if m else "another process"
                    raise busy(self.path, holder, timeout) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.1)
            except duckdb.Error as exc:
                raise StoreError(f"cannot open the store {self.path}: {exc}") from None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the file open in this process until the block ends (blocks may nest).

        DuckDB shares one open database among the connections a process makes to a file, so
        while this keeper connection lives every transaction skips start-up and close. The file
        stays locked for the whole block: other processes' store calls retry meanwhile and
        fail with ``StoreBusy`` after their busy timeout."""
        with _process_lock:
            if self._holds == 0:
                self._keeper = self._connect()
            self._holds += 1
        try:
            yield
        except BaseException:
            self._release()
            raise  # the block's own error wins over one closing the store
        self._release(raise_errors=True)

    def _release(self, raise_errors: bool = False) -> None:
        with _process_lock:
            self._holds -= 1
            if self._holds:
                return
            keeper, self._keeper = self._keeper, None
            files, self._close_after_hold = self._close_after_hold, []
            try:
                if keeper is not None:
                    self._close(keeper)  # the last connection: DuckDB checkpoints the file
            except duckdb.Error as exc:
                if raise_errors:
                    raise StoreError(f"the store {self.path} failed: {_short(exc)}") from None
            finally:
                for fh in files:
                    fh.close()

    def close_file(self, fh: BinaryIO) -> None:
        """Close a descriptor this process opened on the database file, once DuckDB no longer
        has the file open here. fcntl(2) drops all of a process's locks on a file when it
        closes *any* descriptor of it: closed during a hold, another process could open the
        file while this one still writes it. Call with no connection of this process open."""
        with _process_lock:
            if self._holds:
                self._close_after_hold.append(fh)
                return
            fh.close()

    @contextlib.contextmanager
    def file_reader(self) -> Iterator[Callable[[Path], BinaryIO]]:
        """A block in which no other thread of this process opens a connection, yielding a
        function that opens the store's files for reading (for a backup of the raw files).

        DuckDB locks its file with fcntl(2), and POSIX releases every fcntl lock a process holds
        on a file as soon as the process closes *any* descriptor of it: closing our copy of the
        database while a connection of this block is still open would let another process in.
        So the descriptors are closed when the block ends, after its connections, with the
        process-wide store lock still held (inside ``hold()`` only when that ends:
        ``close_file``). Open the block's connections (``write()``) inside it."""
        files: list[BinaryIO] = []

        def open_file(path: Path) -> BinaryIO:
            fh = open(path, "rb")  # noqa: SIM115 - closed when the block ends
            files.append(fh)
            return fh

        with _process_lock:
            try:
                yield open_file
            finally:
                for fh in files:
                    self.close_file(fh)

    @contextlib.contextmanager
    def connect(self, *, write: bool, keep: bool = True, export: bool = True,
                timeout: float | None = None, sandboxed: bool = False) -> Iterator[Tx]:
        """A connection inside one transaction; committed on success (rolled back instead when
        ``keep`` is False), rolled back on error. ``timeout``: how long to retry a file another
        process holds (default: the busy timeout); this process's other store calls wait
        meanwhile. ``sandboxed``: on an instance of its own with file access off; a held
        store (``hold``) is closed for the transaction and opened again after it."""
        with _process_lock, self._set_aside_keeper(sandboxed):
            # a held store's transactions run on its keeper (a sandboxed one set it aside):
            # no cursor, USE and close per transaction; _process_lock keeps them one at a time
            keeper = self._keeper
            con = keeper if keeper is not None else self._connect(timeout, sandboxed=sandboxed)
            settled = False  # the connection is outside any transaction again
            try:
                con.execute("BEGIN TRANSACTION")
                tx = Tx(con)
                try:
                    yield tx
                except BaseException:
                    con.execute("ROLLBACK")
                    settled = True
                    raise
                con.execute("COMMIT" if keep else "ROLLBACK")
                settled = True
                if not keep:
                    return
                # Still holding the file lock, so no other writer can interleave with these.
                if write and export:
                    self._lock.commits += 1
                    if self._on_commit is not None:
                        self._on_commit(tx)
                for hook in tx.after_commit:
                    hook()
            except duckdb.Error as exc:
                raise StoreError(f"the store {self.path} failed: {_short(exc)}") from None
            finally:
                if keeper is None:
                    self._close(con, sandboxed=sandboxed)
                elif not settled:  # BEGIN, COMMIT or ROLLBACK failed: start a clean keeper
                    self._replace_keeper()

    def _replace_keeper(self) -> None:
        """Swap a keeper whose transaction state is unknown for a fresh one (called with
        ``_process_lock`` held). The new one is opened first, so the store lock and the attach
        are never let go: the hold goes on unbroken and no other process gets in between."""
        old, self._keeper = self._keeper, self._connect()
        if old is not None:
            with contextlib.suppress(duckdb.Error):
                self._close(old)

    @contextlib.contextmanager
    def _set_aside_keeper(self, active: bool) -> Iterator[None]:
        """Close a held store's keeper for a block that needs an instance of its own (DuckDB
        refuses a second configuration for a file a process has open), and reopen it after.
        Call with ``_process_lock`` held, so no other connection of this process is open."""
        if not active or self._keeper is None:
            yield
            return
        keeper, self._keeper = self._keeper, None
        self._close(keeper)
        try:
            yield
        finally:
            self._keeper = self._connect()

    def write(self, *, export: bool = True,
              timeout: float | None = None) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction; ``export=False`` for writes that leave the catalog (keys,
        versions, grants, policies) alone, e.g. audit ingest: no catalog.json rewrite."""
        return self.connect(write=True, export=export, timeout=timeout)

    def read(self) -> contextlib.AbstractContextManager[Tx]:
        return self.connect(write=False)

    def snapshot(self) -> contextlib.AbstractContextManager[Tx]:
        """A read for SQL a caller wrote: its transaction is always rolled back (nothing done
        inside persists) and its instance has file access off (no read_csv of /etc/passwd),
        even while the store is held for other work."""
        return self.connect(write=False, keep=False, sandboxed=True)


class Tx:
    """A connection in a transaction, plus hooks to run after COMMIT while the lock is held."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.after_commit: list[Callable[[], None]] = []

    def execute(self, sql: str, params: object = None) -> Result:
        return Result(self.con.execute(sql, params) if params is not None else self.con.execute(sql))

    def __getattr__(self, name: str):  # register, unregister, sql, ... of the connection
        return getattr(self.con, name)


# what the catalog's readers take: a transaction, or the raw connection of the on-commit hook
Connection = duckdb.DuckDBPyConnection | Tx


class Result:
    """A query result that is always read to the end (DuckDB 2 refuses further work on a
    connection while a result is unfinished, e.g. after ``fetchone``)."""

    __slots__ = ("_cur",)

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self._cur = cur

    def fetchall(self) -> list[tuple]:
        return self._cur.fetchall()

    def fetchone(self) -> tuple | None:
        rows = self._cur.fetchall()
        return rows[0] if rows else None

    def one(self) -> tuple:
        """The row of a query that always returns exactly one (an aggregate, e.g. count(*))."""
        row = self.fetchone()
        if row is None:
            raise StoreError("a query that always returns one row returned none")
        return row

    def columns(self) -> list[str]:
        """The result's column names (its rows are read and dropped)."""
        names = [d[0] for d in self._cur.description or ()]
        self._cur.fetchall()
        return names

    def df(self):
        return self._cur.df()


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300]
