"""Call-time usage limits: per key version, a counter that processes take blocks of uses from.

Crypto calls never open DuckDB (docs/design.md, decision 1), so the uses of a version that have
been handed out live in a small file per version, ``usage/<key_id>-v<version>``: one 8-byte
count of the uses claimed by all processes, changed only under an exclusive flock and synced to
disk. A process claims a block (never past the limit), spends it in memory, and gives back what
it did not spend when it closes. A process that dies keeps its block: those
uses count as made, so the total never passes the limit (a version may stop short of it).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator
from itertools import islice, repeat
from pathlib import Path

from ..errors import StoreError

MAX_BLOCK = 2**20  # uses one claim may take: one file update per ~a million encryptions
_COUNT = struct.Struct("<Q")

# (key_id, version) -> uses the version had before its counter existed (older homes, restores)
Seed = Callable[[str, int], int]


def block_size(remaining: int) -> int:
    """Uses to claim when ``remaining`` are left: a quarter of them (so several processes
    share what is left near the limit), at least one, at most ``MAX_BLOCK``."""
    if remaining <= 0:
        return 0
    return min(MAX_BLOCK, max(1, remaining // 4))


class UsageCounters:
    """This process's view of the per-version usage counters of one home."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._lock = threading.Lock()  # claims, limit changes, batches, give-backs, release
        # (key_id, version) -> (the uses left in this process's block, the limit it was taken
        # under). The uses are the items of an iterator, ``repeat(1, n)``: ``next(uses, 0)``
        # spends one in a single C call, in which CPython's GIL lets no other thread run, so
        # every use goes to exactly one caller with no lock (the crypto hot path spends one
        # inline: ``blocks`` is public). Everything else runs under ``_lock`` and takes what is
        # left in one C call too (``sum(uses)``, ``sum(islice(uses, n))``), so a use is either
        # spent or given back, never both.
        self.blocks: dict[tuple[str, int], tuple[Iterator[int], int]] = {}

    def _path(self, key_id: str, version: int) -> Path:
        return self._dir / f"{key_id}-v{version}"

    def create(self, key_id: str, version: int) -> None:
        """Start the counter of a new version at zero (before the version is committed, so no
        process ever needs the store to seed it). Not synced (an fsync is ~1-2 ms of a key's
        creation or rotation): a zero lost to a power loss leaves an empty counter, which the
        first claim seeds from the ledger, and no use of a version is made without a claim,
        each of which is synced."""
        with self._counter(key_id, version, _nothing, sync=False):
            pass

    def take(self, key_id: str, version: int, limit: int, seed: Seed) -> bool:
        """Spend one use of the version; False when no use is left under ``limit``."""
        slot = (key_id, version)
        block = self.blocks.get(slot)
        if block is not None and block[1] == limit and next(block[0], 0):
            return True
        with self._lock:
            block = self.blocks.get(slot)
            if block is not None and block[1] == limit and next(block[0], 0):
                return True
            return self._claim(slot, limit, seed)

    def take_many(self, key_id: str, version: int, limit: int, seed: Seed, n: int) -> int:
        """Spend up to ``n`` uses of the version at once (a batch); how many were spent (fewer
        than ``n`` only when the version has no use left under ``limit``)."""
        slot = (key_id, version)
        spent = 0
        with self._lock:
            while spent < n:
                block = self.blocks.get(slot)
                got = 0 if block is None or block[1] != limit else sum(islice(block[0],
                                                                              n - spent))
                if got:
                    spent += got
                elif self._claim(slot, limit, seed):  # a new block, one use of it spent
                    spent += 1
                else:
                    break
        return spent

    def give_back(self, key_id: str, version: int, limit: int, n: int) -> None:
        """Return ``n`` uses spent by ``take_many`` but not used (a batch refused before any
        encryption) to this process's block (they are claimed in the shared counter); if the
        block was taken under another limit meanwhile, they stay counted as used, which never
        lets a version pass its limit."""
        with self._lock:
            block = self.blocks.get((key_id, version))
            if block is None:  # the claim that found the version used up dropped it
                self.blocks[(key_id, version)] = (repeat(1, n), limit)
            elif block[1] == limit:  # (what was left, taken at once, and n more)
                self.blocks[(key_id, version)] = (repeat(1, sum(block[0]) + n), limit)

    def _claim(self, slot: tuple[str, int], limit: int, seed: Seed) -> bool:
        """Claim a new block from the shared counter (called with ``_lock`` held). A block taken
        under another limit is given back first, so a lowered limit holds exactly."""
        with self._counter(*slot, seed) as (fd, stored):
            old = self.blocks.pop(slot, None)  # (under the same limit: used up)
            claimed = stored - sum(old[0]) if old is not None and old[1] != limit else stored
            n = block_size(limit - claimed)
            if n:
                self.blocks[slot] = (repeat(1, n - 1), limit)
            if claimed + n != stored:
                _write(fd, claimed + n)
            return n > 0

    def release(self) -> None:
        """Give back the uses this process claimed but did not spend (at close)."""
        with self._lock:
            blocks, self.blocks = self.blocks, {}
            for (key_id, version), (uses, _) in blocks.items():
                left = sum(uses)  # (a call holding the block now finds it used up)
                if left > 0:
                    try:
                        with self._counter(key_id, version, _nothing) as (fd, claimed):
                            _write(fd, max(0, claimed - left))
                    except (OSError, StoreError):  # kept: they count as used (never above)
                        pass

    def _counter(self, key_id: str, version: int, seed: Seed, *, sync: bool = True) -> _Locked:
        return _Locked(self._dir, self._path(key_id, version), lambda: seed(key_id, version),
                       sync)


class _Locked:
    """The counter file, open and exclusively locked for a block: ``(fd, claimed)``."""

    def __init__(self, directory: Path, path: Path, seed: Callable[[], int],
                 sync: bool = True) -> None:
        self._dir, self._path, self._seed, self._sync = directory, path, seed, sync
        self._fd = -1

    def __enter__(self) -> tuple[int, int]:
        try:
            self._dir.mkdir(mode=0o700, exist_ok=True)
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            raw = os.pread(self._fd, _COUNT.size, 0)
        except OSError as exc:
            self.__exit__()
            raise StoreError(f"cannot read the usage counter {self._path}: {exc}") from None
        if len(raw) == _COUNT.size:
            return self._fd, _COUNT.unpack(raw)[0]
        try:  # a version older than its counter: start from the uses the ledger knows
            claimed = self._seed()
            _write(self._fd, claimed, sync=self._sync)
        except BaseException:
            self.__exit__()
            raise
        return self._fd, claimed

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the lock
            self._fd = -1


def _nothing(key_id: str, version: int) -> int:
    return 0


def _write(fd: int, claimed: int, *, sync: bool = True) -> None:
    try:
        os.pwrite(fd, _COUNT.pack(claimed), 0)
        if sync:
            os.fsync(fd)  # a claim must survive a power loss, or uses could be handed out twice
    except OSError as exc:
        raise StoreError(f"cannot update a usage counter: {exc}") from None
