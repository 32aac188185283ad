"""Per-process append-only audit journals, hash-chained, with group commit.

Each process appends one line per audited call to its own file ``<journal>.jsonl`` with a single
``write`` syscall before the call returns, so a SIGKILL right after loses nothing (the bytes are
in the kernel). ``fsync`` runs in groups every ``fsync_interval_ms`` (power-loss window), or
before every return in strict mode.

A line is a compact JSON array (every journal is valid JSON Lines), in ``LINE_FIELDS`` order::

    [jseq,time_us,"principal","action","key","key_id",version,"outcome","error","detail","context","hash"]

with ``null`` for absent values and strings escaped by ``json.encoder.encode_basestring``. The
journal name (``<host>-<pid>-<12 hex>``, the file name) and the pid are the same on every line of
a file, and ``prev`` is the ``hash`` of the line before (``genesis(journal)`` for ``jseq`` 1), so
the lines leave them out and the ingester adds them (``ingest.ingest``). Record ``n`` hashes
``prev`` = hash of record ``n-1`` of the same journal: ``hash`` = sha256(content fields joined by
U+001F, then ``prev``), see ``record_hash``.

Seal lines prove that keyledger wrote the records, with the HSM's help: every
``fsync_interval_ms`` (when records were added) and on close, the writer appends::

    ["seal",jseq,"<hash of record jseq>","<HMAC-SHA256 in hex>"]

where the MAC is made in the HSM with the home's non-extractable seal key over
``seal_message(journal, jseq, hash)``. Because every record hashes its predecessor, one valid
seal proves every record of the journal up to ``jseq``. ``append`` (the hot path) never calls
the HSM; a record written after the newest seal is *unproven* until the next one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from json.encoder import encode_basestring as _q  # C-accelerated
from pathlib import Path
from typing import Any

from ..errors import AuditError

log = logging.getLogger("keyledger")
SEP = "\x1f"
# Audited calls that change nothing shown anywhere: a read need not wait for their records to
# be ingested, and a live view need not refresh for another process's reads.
READ_ACTIONS = frozenset({"open", "query", "list_keys", "get_key", "audit", "findings",
                          "requests", "compliance_trend", "compliance_rules",
                          "compliance_exceptions", "public_key_pem", "capabilities",
                          "version_usage"})
SUFFIX = ".jsonl"
LINE_FIELDS = ("jseq", "time_us", "principal", "action", "key", "key_id", "version", "outcome",
               "error", "detail", "context", "hash")
_NAME_RE = re.compile(r"^.+-([0-9]{1,9})-[0-9a-f]{12}$")


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 (``_sha2`` from 3.12, ``_sha256`` before), for the chain hash
    of each record, with OpenSSL's as the fallback. The digests are the same; in the hot
    path's HSM loop CPython's costs ~2.7 us less per call, though it is slower on its own
    (1.07 against 0.54 us for 200 bytes), likely because OpenSSL's EVP digest context,
    allocated per hash, works in the library state the HSM's AES-GCM also uses
    (docs/benchmarks.md, "§3 and §4 met")."""
    for module in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(module).sha256
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()
# A record dated up to this much before its predecessor (two threads racing between reading
# the clock and appending, a small clock step) takes the predecessor's time, so time never
# goes backwards within a journal; a larger step is recorded as it is (verification reports it).
CLOCK_SLACK_US = 1_000_000
_MIDDLES_MAX = 1024  # remembered (principal .. outcome) field texts
SEAL_PREFIX = b'["'  # a record line starts with "[<digit>", a seal line with '["seal"'
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Sealer = Callable[[bytes], bytes]


def seal_message(journal: str, jseq: int, tip_hash: str) -> bytes:
    """What a seal's MAC covers: the journal's name, the sealed record's jseq and hash."""
    return SEP.join((journal, str(jseq), tip_hash)).encode()


def parse_seal(line: bytes) -> tuple[int, str, bytes]:
    """``(jseq, hash, mac)`` of a seal line; ValueError if it is not one."""
    try:
        value = json.loads(line)
        tag, jseq, tip, mac = value
        if (tag != "seal" or type(jseq) is not int or jseq < 1 or not isinstance(tip, str)
                or not _HEX64.match(tip) or not isinstance(mac, str) or len(mac) != 64):
            raise ValueError
        return jseq, tip, bytes.fromhex(mac)
    except (ValueError, TypeError):
        raise ValueError("not a valid seal line") from None


_RECORD_TYPES: tuple[type | tuple[type, ...], ...] = (
    int, int, str, str, (str, type(None)), (str, type(None)), (int, type(None)),
    str, (str, type(None)), (str, type(None)), (str, type(None)), str)


def line_problem(line: bytes) -> str | None:
    """Why a complete journal line is neither a record nor a seal (None: it is one).

    The slow, exact check behind ingest's fast parser: used to name the line that stopped a
    journal's ingest and by verification for the bytes no ingest took.
    """
    if line.startswith(SEAL_PREFIX):
        try:
            parse_seal(line)
        except ValueError as exc:
            return str(exc)
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return "not a JSON line"
    if not isinstance(value, list) or len(value) != len(LINE_FIELDS):
        return f"not a record of {len(LINE_FIELDS)} fields"
    for name, v, kind in zip(LINE_FIELDS, value, _RECORD_TYPES, strict=True):
        if not isinstance(v, kind) or isinstance(v, bool):
            return f"field {name} has the wrong type"
    if value[0] < 1 or not _HEX64.match(value[-1]):
        return "bad jseq or hash"
    return None


def has_changes(path: Path, start: int, end: int) -> bool:
    """Whether the bytes ``start:end`` of a journal hold a record of a call that is not a read
    (unreadable or unexpected bytes count as a change)."""
    if end < start:
        return True
    chunk = read_range(path, start, end)
    if chunk is None:
        return True
    for line in chunk.splitlines():
        if line.startswith(SEAL_PREFIX):
            continue  # a seal changes nothing
        try:
            if json.loads(line)[3] not in READ_ACTIONS:  # [jseq, time_us, principal, action, ...]
                return True
        except (ValueError, IndexError, TypeError):
            return True
    return False


def read_range(path: Path, start: int, end: int) -> bytes | None:
    """The bytes ``start:end`` of a journal file; None if it cannot be read."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            return f.read(end - start)
    except OSError:
        return None


def genesis(journal: str) -> str:
    return hashlib.sha256(journal.encode()).hexdigest()


def journal_pid(journal: str) -> int | None:
    """The writer's pid from a journal name ``<host>-<pid>-<12 hex>``; None if not one."""
    m = _NAME_RE.match(journal)
    return int(m.group(1)) if m else None


def record_hash(
    journal: str, jseq: int, time_us: int, principal: str, action: str, key: str | None,
    key_id: str | None, version: int | None, outcome: str, error: str | None,
    detail: str | None, context: str | None, pid: int, prev: str,
) -> str:
    """The one definition of a record's hash; ``verify.ROW_HASH_SQL`` is its SQL twin.

    ``JournalWriter.append`` builds the same text inline (it is the hot path of every call).
    """
    content = SEP.join((
        journal, str(jseq), str(time_us), principal, action, key or "", key_id or "",
        "" if version is None else str(version), outcome, error or "", detail or "",
        context or "", str(pid), prev,
    ))
    return hashlib.sha256(content.encode()).hexdigest()


def _backslashed(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates) backslash-escaped."""
    return text.encode("utf-8", "backslashreplace").decode()


class JournalWriter:
    """One process's journal. ``seal``: the HSM MAC of a seal message (None: no seals, every
    record stays unproven; only for tools that write journals without a home's HSM)."""

    def __init__(self, directory: Path, *, strict: bool, fsync_interval_ms: int,
                 seal: Sealer | None = None) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pid = os.getpid()
        self.journal = f"{socket.gethostname()}-{self.pid}-{uuid.uuid4().hex[:12]}"
        self.path = directory / f"{self.journal}{SUFFIX}"
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot create the audit journal {self.path}: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._seq = 0
        self._last_us = 0  # time_us of the newest record
        # The newest trusted time this process handed out (``trusted_us``, ``append_ok``): under
        # the same lock as the journal, so a call reads the clock and appends under one lock.
        self._trusted_us = 0
        self.size = 0  # bytes this writer appended
        self.changed_upto = 0  # end of its last record that was not a read
        self._head = self.journal + SEP  # record_hash's text starts with these ...
        self._tail = f"{SEP}{self.pid}{SEP}"  # ... and ends with these, then prev
        self._prev = genesis(self.journal)
        self._middles: dict[tuple, tuple[str, str, str, str]] = {}  # see append
        self._strict = strict
        self._dirty = False
        self._closed = False
        self._seal = seal
        self._seal_lock = threading.Lock()  # one seal at a time (fsync thread, close, verify)
        self.sealed = 0  # jseq of the newest seal written
        self._interval = max(fsync_interval_ms, 1) / 1000
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="keyledger-fsync",
                                         daemon=True)
        self._flusher.start()

    def append(self, time_us: int, principal: str, action: str, key: str | None,
               key_id: str | None, version: int | None, outcome: str, error: str | None,
               detail: str | None, context: str | None) -> int:
        """Append a record dated ``time_us``: its fields rendered here, outside the lock, then
        written by ``append_ok``. The fields from principal to outcome repeat from call to
        call: their text is built once (``_middle``); a call that worked on a key has no error,
        detail or context, so its fields after the time are that text whole."""
        fixed = (principal, action, key, key_id, version, outcome)
        mid = self._middles.get(fixed)
        if mid is None:
            mid = self._middle(fixed)
        if error is None and detail is None and context is None:
            text, body = mid[2], mid[3]
        else:
            text = f"{mid[0]}{SEP}{error or ''}{SEP}{detail or ''}{SEP}{context or ''}"
            body = (f'{mid[1]}{"null" if error is None else _q(error)},'
                    f'{"null" if detail is None else _q(detail)},'
                    f'{"null" if context is None else _q(context)},"')
        try:
            return self.append_ok((text + self._tail, body, action not in READ_ACTIONS),
                                  time_us)
        except UnicodeEncodeError:  # a string no UTF-8 can hold: record it backslash-escaped
            e = _backslashed
            return self.append(time_us, e(principal), e(action), key and e(key),
                               key_id and e(key_id), version, e(outcome), error and e(error),
                               detail and e(detail), context and e(context))

    def trusted_us(self) -> int:
        """The system clock in microseconds since the epoch, never earlier than a time this
        process already handed out (``Runtime.trusted_us``, every record ``append_ok`` dates)."""
        now = time.time_ns() // 1000
        with self._lock:
            if now < self._trusted_us:
                return self._trusted_us
            self._trusted_us = now
        return now

    def fixed_ok(self, principal: str, action: str, key: str, key_id: str,
                 version: int) -> tuple[str, str, bool]:
        """What ``append_ok`` takes for a call on a key that worked (no error, detail or
        context), rendered once (a caller keeps it with its plan): the record's hash text after
        the time with the journal's tail, its JSON after the time, and whether the action is a
        change rather than a read. A field no UTF-8 can hold is backslash-escaped, as
        ``append`` records it."""
        fixed = (principal, action, key, key_id, version, "ok")
        mid = self._middle(fixed)
        try:
            mid[2].encode()
        except UnicodeEncodeError:
            e = _backslashed
            mid = self._middle((e(principal), e(action), e(key), e(key_id), version, "ok"))
        return mid[2] + self._tail, mid[3], action not in READ_ACTIONS

    def append_ok(self, fixed: tuple[str, str, bool], time_us: int | None = None) -> int:
        """Write the record ``fixed`` (from ``fixed_ok``, or rendered by ``append``) dated
        ``time_us``, or now by trusted time read under the journal's lock (one lock for the
        clock and the chain: the hot path of every call that worked). A record dated up to
        ``CLOCK_SLACK_US`` before its predecessor takes the predecessor's time. Raises
        ``UnicodeEncodeError`` before anything changed if a field has a lone surrogate."""
        with self._lock:
            if self._closed:
                raise AuditError("the audit journal is closed; open the ledger again")
            if time_us is None:
                now = time.time_ns() // 1000
                if now < self._trusted_us:
                    now = self._trusted_us
                else:
                    self._trusted_us = now
            else:
                now = time_us
            if now < self._last_us <= now + CLOCK_SLACK_US:  # (a simulation clock's record)
                now = self._last_us
            seq = self._seq + 1
            n, t = str(seq), str(now)  # (each rendered once for the hash text and the line)
            h = _sha256(f"{self._head}{n}{SEP}{t}{fixed[0]}{self._prev}".encode()).hexdigest()
            try:
                line = f'[{n},{t}{fixed[1]}{h}"]\n'.encode()
                os.write(self._fd, line)
                if self._strict:
                    os.fsync(self._fd)
            except OSError as exc:
                raise AuditError(
                    f"cannot append to the audit journal {self.path}: {exc.strerror}; "
                    "the operation was done but its record may be missing - free disk space"
                ) from None
            self._seq, self._prev, self._dirty = seq, h, True
            self._last_us = now
            self.size += len(line)
            if fixed[2]:
                self.changed_upto = self.size
            return seq

    def _middle(self, fixed: tuple) -> tuple[str, str, str, str]:
        """The record text and JSON of the fields principal .. outcome, remembered; then the
        same followed by empty error, detail and context (text) and nulls (JSON)."""
        principal, action, key, key_id, version, outcome = fixed
        text = (f"{SEP}{principal}{SEP}{action}{SEP}{key or ''}{SEP}{key_id or ''}"
                f"{SEP}{'' if version is None else version}{SEP}{outcome}")
        body = (f',{_q(principal)},{_q(action)},{"null" if key is None else _q(key)},'
                f'{"null" if key_id is None else _q(key_id)},'
                f'{"null" if version is None else version},{_q(outcome)},')
        mid = (text, body, f"{text}{SEP}{SEP}{SEP}", f'{body}null,null,null,"')
        if len(self._middles) >= _MIDDLES_MAX:
            self._middles.clear()
        self._middles[fixed] = mid
        return mid

    def flush(self) -> None:
        """fsync outside the lock, so appends never wait for the disk."""
        with self._lock:
            if not self._dirty or self._closed:
                return
            self._dirty = False
            fd = self._fd
        os.fdatasync(fd)

    def seal(self) -> None:
        """Append a seal over the newest record, if it is not sealed yet.

        The MAC is made in the HSM outside the append lock, so calls never wait for the HSM;
        records appended meanwhile are covered by the next seal.
        """
        if self._seal is None:
            return
        with self._seal_lock:
            with self._lock:
                if self._closed or self._seq <= self.sealed:
                    return
                seq, tip = self._seq, self._prev
            mac = self._seal(seal_message(self.journal, seq, tip))
            line = f'["seal",{seq},"{tip}","{mac.hex()}"]\n'.encode()
            with self._lock:
                if self._closed:
                    return
                os.write(self._fd, line)
                self.size += len(line)
                self.sealed, self._dirty = seq, True

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
                self.seal()
            except OSError:  # reported on the next append
                pass
            except Exception:  # an HSM hiccup: the next round seals again
                log.warning("could not seal the audit journal %s; retrying", self.journal,
                            exc_info=True)

    def close(self) -> None:
        self._stop.set()
        if self._flusher.is_alive() and self._flusher is not threading.current_thread():
            self._flusher.join()
        try:
            self.seal()
        except Exception:  # the tail stays unproven; verify_audit names it
            log.warning("could not seal the audit journal %s on close", self.journal,
                        exc_info=True)
        self.flush()
        with self._lock:
            if not self._closed:
                os.close(self._fd)
                self._closed = True
