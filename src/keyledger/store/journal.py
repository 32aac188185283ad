"""Per-process append-only audit journals, hash-chained, with group commit.

Each process appends one JSON line per audited call to its own file with a single ``write``
syscall before the call returns, so a SIGKILL right after loses nothing (the bytes are in the
kernel). ``fsync`` runs in groups every ``fsync_interval_ms`` (power-loss window), or before
every return in strict mode. Record ``n`` carries ``prev`` = hash of record ``n-1`` of the same
journal and ``hash`` = sha256(content fields joined by U+001F, then ``prev``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import uuid
from json.encoder import encode_basestring as _q  # C-accelerated
from pathlib import Path

from ..errors import AuditError

SEP = "\x1f"


def _opt(value: str | None) -> str:
    return "null" if value is None else _q(value)


def genesis(journal: str) -> str:
    return hashlib.sha256(journal.encode()).hexdigest()


def record_hash(
    journal: str, jseq: int, time_us: int, principal: str, action: str, key: str | None,
    key_id: str | None, version: int | None, outcome: str, error: str | None,
    detail: str | None, context: str | None, pid: int, prev: str,
) -> str:
    """The one definition of a record's hash; ``ledger.ROW_HASH_SQL`` is its SQL twin."""
    content = SEP.join((
        journal, str(jseq), str(time_us), principal, action, key or "", key_id or "",
        "" if version is None else str(version), outcome, error or "", detail or "",
        context or "", str(pid), prev,
    ))
    return hashlib.sha256(content.encode()).hexdigest()


class JournalWriter:
    def __init__(self, directory: Path, *, strict: bool, fsync_interval_ms: int) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pid = os.getpid()
        self.journal = f"{socket.gethostname()}-{self.pid}-{uuid.uuid4().hex[:12]}"
        self.path = directory / f"{self.journal}.jsonl"
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot create the audit journal {self.path}: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._seq = 0
        self._journal_json = _q(self.journal)
        self._prev = genesis(self.journal)
        self._strict = strict
        self._dirty = False
        self._closed = False
        self._interval = max(fsync_interval_ms, 1) / 1000
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="keyledger-fsync",
                                         daemon=True)
        self._flusher.start()

    def append(self, time_us: int, principal: str, action: str, key: str | None,
               key_id: str | None, version: int | None, outcome: str, error: str | None,
               detail: str | None, context: str | None) -> int:
        with self._lock:
            if self._closed:
                raise AuditError("the audit journal is closed; open the ledger again")
            seq = self._seq + 1
            h = record_hash(self.journal, seq, time_us, principal, action, key, key_id, version,
                            outcome, error, detail, context, self.pid, self._prev)
            line = (  # hand-built JSON: this is the hot path of every audited call
                f'{{"journal":{self._journal_json},"jseq":{seq},"time_us":{time_us},'
                f'"principal":{_q(principal)},"action":{_q(action)},"key":{_opt(key)},'
                f'"key_id":{_opt(key_id)},"version":{"null" if version is None else version},'
                f'"outcome":{_q(outcome)},"error":{_opt(error)},"detail":{_opt(detail)},'
                f'"context":{_opt(context)},"pid":{self.pid},"prev":"{self._prev}",'
                f'"hash":"{h}"}}\n'
            )
            try:
                os.write(self._fd, line.encode())
                if self._strict:
                    os.fsync(self._fd)
            except OSError as exc:
                raise AuditError(
                    f"cannot append to the audit journal {self.path}: {exc.strerror}; "
                    "the operation was done but its record may be missing - free disk space"
                ) from None
            self._seq, self._prev, self._dirty = seq, h, True
            return seq

    def flush(self) -> None:
        """fsync outside the lock, so appends never wait for the disk."""
        with self._lock:
            if not self._dirty or self._closed:
                return
            self._dirty = False
            fd = self._fd
        os.fdatasync(fd)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except OSError:  # reported on the next append
                pass

    def close(self) -> None:
        self._stop.set()
        if self._flusher.is_alive() and self._flusher is not threading.current_thread():
            self._flusher.join()
        self.flush()
        with self._lock:
            if not self._closed:
                os.close(self._fd)
                self._closed = True
