"""keyledger's own lock on a store file, taken before DuckDB opens it and dropped after it closes.

DuckDB's lock on the database file is not enough for several processes taking turns: DuckDB
(2.0.1, measured with strace) reads the file's headers through a probe *before* it locks the
file and does not read them again after. A process whose probe lands while another process
checkpoints opens the store as it was before that checkpoint, and its own next checkpoint
overwrites the other's: committed transactions vanish (an intent, an audit checkpoint). So a
process takes this lock first; while it holds it, no other keyledger process even probes the file.

The lock is an exclusive ``flock`` on ``<store>.lock``, through a descriptor opened for each
hold (a forked child never shares a held lock), counted per process: held while any connection
or keeper of this process has the file open, released with the last one. Call ``acquire`` and
``release`` with the process's store lock (``db._process_lock``) held.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import time
from pathlib import Path

from ..errors import StoreBusy, StoreError

_locks: dict[Path, StoreLock] = {}


def busy(store: Path, holder: str, timeout: float) -> StoreBusy:
    return StoreBusy(f"the store {store} has been held by {holder} for more than {timeout:g} s; "
                     "wait for it to finish or stop it")


def flock_until(fd: int, deadline: float, max_pause: float) -> bool:
    """Take an exclusive flock on ``fd``, retrying with backoff until ``deadline`` (monotonic);
    False if another holder kept it that long."""
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, max_pause)


def store_lock(db_path: Path) -> StoreLock:
    """The one lock object of this process for the store at ``db_path`` (every Database of
    one file shares it, so two of them never wait on each other)."""
    key = Path(os.path.abspath(db_path))
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = StoreLock(key.with_name(key.name + ".lock"))
    return lock


class StoreLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._count = 0
        self._pid = 0
        self.holds = 0  # how often this process took the flock (a new number per unbroken hold)
        self.commits = 0  # committed writes that may change the catalog (``Database.connect``)

    def acquire(self, deadline: float, store: Path, timeout: float) -> None:
        """Take the lock (or count one more user of it), retrying with backoff while another
        process holds it; ``StoreBusy`` naming the holder once ``deadline`` (monotonic) passes."""
        if self._pid != os.getpid():  # a forked child: the parent's count is not ours
            self._fd, self._count, self._pid = None, 0, os.getpid()
        if self._count:
            self._count += 1
            return
        fd = self._open()
        try:
            if not flock_until(fd, deadline, 0.01):  # short pauses: a slow poller starves
                raise busy(store, self._holder(fd), timeout)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)  # for the next waiter's message
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._count = fd, 1
        self.holds += 1

    def since(self) -> tuple[int, int]:
        """(this hold's number, catalog commits so far): a later value is the same hold with
        one more commit only when no other process can have committed in between and this
        process committed only that one catalog write (``SnapshotExporter``)."""
        return self.holds, self.commits

    def release(self) -> None:
        if self._pid != os.getpid() or not self._count:
            return
        self._count -= 1
        if self._count == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # drops the flock

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{self.path} is a symbolic link; keyledger makes this lock "
                                 "file itself: remove the link") from None
            raise StoreError(f"cannot open the store's lock file {self.path}: "
                             f"{exc.strerror}") from None

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            pid = int(os.pread(fd, 16, 0).decode().strip())
        except (OSError, ValueError):
            return "another process"
        return f"process {pid}"
