"""Backup, restore and restore tests of an embedded (SoftHSM2) home.

A backup is one file: a tar archive of the home (DuckDB store, SoftHSM2 token directory,
settings, catalog snapshot, journals not yet ingested and the PIN files), encrypted in chunks
with AES-256-GCM under a key derived from a passphrase with scrypt. The byte layout is in
``docs/backup.md``. ``KeyLedger.backup`` writes one, ``keyledger.backup.restore`` turns one into
a new home, and ``KeyLedger.restore_test`` proves one restores (in a subprocess), recording each
of them in the ``backups`` table of the store for compliance evidence.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pandas as pd
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import outputs
from .config import CONFIG_NAME, DB_NAME, find_softhsm_module, write_config
from .errors import AuditError, ConfigError, InvalidCiphertext, InvalidInput, KeyLedgerError
from .frames import normalize
from .hsm import pkcs11_backend
from .hsm.pkcs11_backend import _CALL_LOCK
from .hsm.softhsm import softhsm_conf_text
from .model import Family, parse_spec, validate_name
from .runtime import naive
from .store.catalog import SNAPSHOT_NAME
from .store.db import Database
from .store.db import _process_lock as _store_lock
from .store.journal import SUFFIX as JOURNAL_SUFFIX
from .store.ledger import verify as verify_ledger

if TYPE_CHECKING:
    from .service import KeyLedger

# -- archive format (docs/backup.md) ---------------------------------------------------------
MAGIC = b"KLBACKUP"
FORMAT_VERSION = 1
KDF_SCRYPT = 1
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1
CHUNK_SIZE = 1 << 20  # plaintext bytes per sealed chunk (the last one may be shorter)
TAG_LEN = 16
# magic, format, kdf, log2(N), r, p, salt, passphrase check, chunk size, nonce prefix
_HEADER = struct.Struct(">8sBBBBB16s16sI7s")
HEADER_LEN = _HEADER.size  # 56
MANIFEST_NAME = "MANIFEST.json"
MIN_PASSPHRASE = 8

BACKUPS_DDL = ("CREATE TABLE IF NOT EXISTS backups (time TIMESTAMP, kind VARCHAR, path VARCHAR, "
               "sha256 VARCHAR, bytes BIGINT, principal VARCHAR, ok BOOLEAN, detail VARCHAR)")
# How long a backup waits for create/rotate/destroy operations of other processes to finish
# before it snapshots anyway (a restore rolls interrupted operations back or forward).
INTENT_WAIT_S = 2.0
RESTORE_TEST_SAMPLE = 32


def _passphrase(value: object) -> bytes:
    if isinstance(value, str):
        try:
            value = value.encode()
        except UnicodeEncodeError:  # a lone surrogate: no bytes to derive a key from
            raise InvalidInput("the passphrase must be valid Unicode text") from None
    if not isinstance(value, bytes | bytearray):
        raise InvalidInput("passphrase must be text (or bytes)")
    if len(value) < MIN_PASSPHRASE:
        raise InvalidInput(f"the backup passphrase must be at least {MIN_PASSPHRASE} characters;"
                           " use a long random one kept apart from the backups")
    return bytes(value)


def _derive(passphrase: bytes, salt: bytes, log2n: int, r: int, p: int) -> tuple[bytes, bytes]:
    """scrypt -> (AES-256 key, 16-byte passphrase check)."""
    out = Scrypt(salt=salt, length=64, n=1 << log2n, r=r, p=p).derive(passphrase)
    return out[:32], out[32:48]


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= 1 << 32:
        raise InvalidInput("the backup is too large for the archive format (2^32 chunks)")
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class _SealedWriter:
    """A write-only stream that seals what it is given in AES-256-GCM chunks (STREAM layout)."""

    def __init__(self, out: BinaryIO, passphrase: bytes, chunk_size: int = CHUNK_SIZE) -> None:
        salt, prefix = os.urandom(16), os.urandom(7)
        key, check = _derive(passphrase, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
        self.header = _HEADER.pack(MAGIC, FORMAT_VERSION, KDF_SCRYPT, SCRYPT_LOG2_N, SCRYPT_R,
                                   SCRYPT_P, salt, check, chunk_size, prefix)
        self._aes, self._prefix, self._size = AESGCM(key), prefix, chunk_size
        self._out, self._buf, self._counter = out, bytearray(), 0
        self._hash = sha256()
        self.bytes = 0
        self._emit(self.header)

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.bytes += len(data)

    def _seal(self, chunk: bytes, last: bool) -> None:
        nonce = _nonce(self._prefix, self._counter, last)
        self._emit(self._aes.encrypt(nonce, chunk, self.header))
        self._counter += 1

    def write(self, data: bytes) -> int:
        self._buf += data
        # keep at least one byte back: only finish() knows which chunk is the last
        while len(self._buf) > self._size:
            self._seal(bytes(self._buf[:self._size]), last=False)
            del self._buf[:self._size]
        return len(data)

    def finish(self) -> str:
        """Seal the last chunk (possibly empty); returns the archive's sha256 (hex)."""
        self._seal(bytes(self._buf), last=True)
        self._buf.clear()
        return self._hash.hexdigest()


class _SealedReader:
    """A read-only stream over a sealed archive; every byte it returns was authenticated."""

    def __init__(self, src: BinaryIO, passphrase: bytes, name: str) -> None:
        self._src, self.name = src, name
        self._hash = sha256()
        self.bytes = 0  # archive bytes read so far
        header = self._take(HEADER_LEN)
        if len(header) < HEADER_LEN or header[:8] != MAGIC:
            raise InvalidCiphertext(f"{name} is not a keyledger backup (bad header)")
        (_, fmt, kdf, log2n, r, p, salt, check, chunk, prefix) = _HEADER.unpack(header)
        if fmt != FORMAT_VERSION:
            raise InvalidCiphertext(f"{name} has backup format {fmt}, which this keyledger does "
                                    "not read; restore it with a newer keyledger")
        # bounds, so a crafted header cannot make scrypt take gigabytes or minutes
        if kdf != KDF_SCRYPT or not (10 <= log2n <= 20 and 1 <= r <= 16 and 1 <= p <= 4
                                     and 128 * r << log2n <= 1 << 28
                                     and 1024 <= chunk <= 64 << 20):
            raise InvalidCiphertext(f"{name} is damaged or was altered (implausible header)")
        key, expect = _derive(passphrase, salt, log2n, r, p)
        if not hmac.compare_digest(check, expect):
            raise InvalidCiphertext(f"wrong passphrase for the backup {name} (or its header was "
                                    "altered); nothing was restored")
        self.header, self._aes, self._prefix, self._size = header, AESGCM(key), prefix, chunk
        self._counter, self._buf, self._ahead, self._eof = 0, bytearray(), b"", False

    def _take(self, n: int) -> bytes:
        parts, want = [], n
        while want > 0:
            got = self._src.read(want)
            if not got:
                break
            parts.append(got)
            want -= len(got)
        data = b"".join(parts)
        self._hash.update(data)
        self.bytes += len(data)
        return data

    def _next_chunk(self) -> None:
        block = self._ahead + self._take(self._size + TAG_LEN - len(self._ahead))
        self._ahead = b""
        last = True
        if len(block) == self._size + TAG_LEN:
            self._ahead = self._take(1)
            last = not self._ahead
        try:
            if len(block) < TAG_LEN:
                raise InvalidTag
            plain = self._aes.decrypt(_nonce(self._prefix, self._counter, last), block,
                                      self.header)
        except InvalidTag:
            raise InvalidCiphertext(
                f"the backup {self.name} is damaged, truncated or was altered (chunk "
                f"{self._counter} failed authentication); nothing was restored - use another "
                "copy") from None
        self._counter += 1
        self._buf += plain
        self._eof = last

    def read(self, n: int = -1) -> bytes:
        while (n is None or n < 0 or len(self._buf) < n) and not self._eof:
            self._next_chunk()
        if n is None or n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def drain(self) -> None:
        """Authenticate the rest (tar stops reading at its end marker)."""
        while not self._eof:
            self._next_chunk()
            self._buf.clear()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


# -- reports -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackupInfo:
    """What ``backup()`` wrote."""

    path: Path
    bytes: int
    sha256: str
    created_at: datetime
    files: int
    audit_records: int
    keys: int
    seconds: float

    def __str__(self) -> str:
        return (f"backup {self.path}: {self.bytes:,} bytes, sha256 {self.sha256}, {self.keys} "
                f"keys, {self.audit_records:,} audit records, {self.files} files, "
                f"{self.seconds:.1f} s")


@dataclass
class RestoreTestReport:
    """Outcome of ``restore_test``: did the archive restore into a working home?"""

    ok: bool
    archive: str
    sha256: str | None = None
    bytes: int | None = None
    backup_time: str | None = None
    keys: int = 0
    versions: int = 0
    versions_checked: int = 0
    missing: list[str] = field(default_factory=list)
    audit_ok: bool = False
    audit_records: int = 0
    reconcile: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        head = "OK" if self.ok else "FAILED"
        text = (f"restore test of {self.archive}: {head} - audit ledger "
                f"{'verified' if self.audit_ok else 'NOT verified'} ({self.audit_records:,} "
                f"records), {self.versions_checked - len(self.missing)} of "
                f"{self.versions_checked} sampled key versions usable ({self.keys} keys), "
                f"{self.seconds:.1f} s")
        if self.problems:
            text += "; problems: " + "; ".join(self.problems)
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- what goes into the archive ----------------------------------------------------------------
@dataclass
class _Layout:
    """The files of an embedded home, as paths inside the archive."""

    home: Path
    conf: str  # softhsm2.conf
    tokens: str  # token directory
    pins: list[str]

    @classmethod
    def of(cls, home: Path, settings: Any) -> _Layout:
        hsm = settings.hsm
        if not hsm.embedded:
            raise ConfigError(
                f"backup() covers homes with the embedded SoftHSM2 token only; this home uses "
                f"{hsm.module}: back up its keys with the HSM vendor's backup procedure (key "
                "material cannot leave the HSM in clear) and the audit ledger with export_audit()")
        conf_path = hsm.softhsm2_conf or home / "softhsm2.conf"
        token_dir = _token_dir(conf_path)
        pins = [p for p in (hsm.pin_file, home / "so.pin") if p is not None]
        names = [_inside(home, p, what) for p, what in
                 ((conf_path, "softhsm2.conf"), (token_dir, "token directory"))]
        pin_names = sorted({_inside(home, p, "PIN file") for p in pins if p.exists()})
        if hsm.pin_file is None or _inside(home, hsm.pin_file, "PIN file") not in pin_names:
            raise ConfigError(f"the HSM PIN file {hsm.pin_file} is missing; a backup without it "
                              "could not be opened")
        return cls(home, names[0], names[1], pin_names)


def _token_dir(conf: Path) -> Path:
    try:
        for line in conf.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip() == "directories.tokendir":
                return Path(v.strip())
    except OSError as exc:
        raise ConfigError(f"cannot read {conf} ({exc.strerror})") from None
    raise ConfigError(f"{conf} names no directories.tokendir")


def _inside(home: Path, path: Path, what: str) -> str:
    try:
        return path.absolute().relative_to(home).as_posix()
    except ValueError:
        raise ConfigError(f"the {what} {path} is outside the home {home}; backup() covers a "
                          "self-contained embedded home only") from None


def _complete_length(path: Path) -> int:
    """Length of a journal up to its last complete line (a writer may be mid-line)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            i = block.rfind(b"\n")
            if i >= 0:
                return start + i + 1
            end = start
    return 0


def _tarinfo(name: str, size: int, mode: int, mtime: float, kind: bytes = tarfile.REGTYPE
             ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode & 0o700, int(mtime), kind
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600,
               mtime: float | None = None) -> None:
    tar.addfile(_tarinfo(name, len(data), mode, time.time() if mtime is None else mtime),
                io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path, size: int | None = None) -> None:
    st = path.stat()
    with open(path, "rb") as fh:
        tar.addfile(_tarinfo(name, st.st_size if size is None else size, st.st_mode,
                             st.st_mtime), fh)


def _read_tree(root: Path, arc: str) -> list[tuple[str, bytes | None, int, float]]:
    """(name, content or None for a directory, mode, mtime) of a small tree, read in full."""
    out: list[tuple[str, bytes | None, int, float]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).as_posix()
        base = arc if rel == "." else f"{arc}/{rel}"
        st = os.stat(dirpath)
        out.append((base, None, st.st_mode, st.st_mtime))
        for fname in sorted(filenames):
            p = Path(dirpath) / fname
            try:
                st = p.stat()
                out.append((f"{base}/{fname}", p.read_bytes(), st.st_mode, st.st_mtime))
            except FileNotFoundError:  # removed by another process since the listing
                continue
    return out


def _sql_count(tx: Any, sql: str) -> int:
    row = tx.execute(sql).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def record_event(led: KeyLedger, kind: str, path: Path | str, digest: str | None,
                 size: int | None, ok: bool, detail: str | None) -> None:
    """One row of the ``backups`` table (compliance evidence, GDPR 32(1)(c))."""
    with led._rt.db.write() as tx:
        tx.execute(BACKUPS_DDL)
        tx.execute("INSERT INTO backups VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [naive(led._now()), kind, str(path), digest, size, led.principal, ok,
                    detail[:2000] if detail else None])


# -- the KeyLedger methods -----------------------------------------------------------------------
class BackupMixin:
    """Mixed into KeyLedger: ``backup``, ``restore_test`` and ``backups``."""

    def backup(self: KeyLedger, path: str | os.PathLike, *, passphrase: str | bytes,
               overwrite: bool = False) -> BackupInfo:
        """Write an encrypted, consistent snapshot of this (embedded SoftHSM2) home to ``path``.

        The archive holds the store, the token, the settings, pending journals and the PIN
        files, sealed with AES-256-GCM under a key derived from ``passphrase`` (scrypt). Keep
        the passphrase apart from the backups: with both, anyone can use every key. Other
        processes keep working; their store writes wait while the snapshot is taken.
        ``path`` must lie outside the home and not exist yet (``overwrite=True`` replaces an
        existing file, once the new backup is complete).
        """
        with self._audited("backup", None) as rec:
            self._authorize(rec, "backup", None)
            layout = _Layout.of(self.home, self._rt.settings)
            secret = _passphrase(passphrase)
            dest = outputs.check_target(path, outputs.protected_paths(self._rt.settings),
                                        overwrite=overwrite, what="backup")
            started, t0 = self._now(), time.monotonic()
            try:
                try:  # journals into the store first, so the archive needs few of them
                    self._rt.ingest()
                except AuditError:  # a ledger that fails its checkpoint: back it up as it is
                    pass  # (the journals are archived too; verify_audit names the problem)
                info = _write_archive(self, layout, dest, secret, started, t0, overwrite)
            except (KeyLedgerError, OSError, tarfile.TarError) as exc:
                err = _as_error(exc, f"writing the backup {dest}")
                try:
                    record_event(self, "backup", dest, None, None, False,
                                 f"{type(err).__name__}: {err}")
                except KeyLedgerError:
                    pass
                if err is exc:
                    raise
                raise err from None
            record_event(self, "backup", dest, info.sha256, info.bytes, True, json.dumps({
                "keys": info.keys, "audit_records": info.audit_records, "files": info.files,
                "seconds": round(info.seconds, 3)}))
            rec.detail = f"{info.bytes} bytes, sha256 {info.sha256}, to {dest}"
            return info

    def restore_test(self: KeyLedger, path: str | os.PathLike, *, passphrase: str | bytes,
                     timeout: float = 600.0, sample: int = RESTORE_TEST_SAMPLE
                     ) -> RestoreTestReport:
        """Restore ``path`` into a temporary home in a subprocess and check it works.

        Checks the restored audit ledger verifies and a random sample of key versions is
        present and usable in the restored token. Records the result (ok or not) in this home's
        ``backups`` table as kind ``restore_test``; the temporary home is deleted.
        """
        with self._audited("restore_test", None) as rec:
            self._authorize(rec, "restore_test", None)
            src = outputs.check_source(path, "backup file")
            secret = _passphrase(passphrase)
            if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
                raise InvalidInput("sample must be a positive whole number of key versions")
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
                raise InvalidInput("timeout must be a positive number of seconds")
            report = _run_restore_test(src, secret, self.principal, float(timeout), sample)
            record_event(self, "restore_test", src, report.sha256, report.bytes, report.ok,
                         json.dumps(report.to_dict(), default=str))
            rec.detail = str(report)[:500]
            return report

    def backups(self: KeyLedger) -> pd.DataFrame:
        """Backups, restores and restore tests recorded in this home (oldest first)."""
        with self._audited("backups", None) as rec:
            self._authorize(rec, "audit", None)
            with self._rt.db.write() as tx:
                tx.execute(BACKUPS_DDL)
                df = tx.execute("SELECT * FROM backups ORDER BY time, rowid").df()
            return normalize(df)


def _as_error(exc: BaseException, doing: str) -> KeyLedgerError:
    if isinstance(exc, KeyLedgerError):
        return exc
    if isinstance(exc, OSError):
        return KeyLedgerError(f"{doing} failed: {exc.strerror or exc}; check the folder "
                              "exists, is writable and has free space")
    return KeyLedgerError(f"{doing} failed: {exc}")


def _write_archive(led: KeyLedger, layout: _Layout, dest: Path, secret: bytes,
                   started: datetime, t0: float, overwrite: bool) -> BackupInfo:
    with outputs.atomic_file(dest, overwrite=overwrite) as out:
        writer = _SealedWriter(out, secret)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            deadline = time.monotonic() + INTENT_WAIT_S
            while True:
                # The store's file lock: no process changes the catalog, the ledger or the
                # HSM-held audit head until the snapshot is complete.
                with _StoreFiles(led._rt.db) as store_files, led._rt.db.write() as tx:
                    busy = sum(led._rt._owner_running(pid, intent_id) for intent_id, pid in
                               tx.execute("SELECT intent_id, pid FROM intents").fetchall())
                    wait = bool(busy) and time.monotonic() < deadline
                    if not wait:  # else a create/rotate/destroy is in flight: let it end
                        tx.execute("CHECKPOINT")
                        manifest = _manifest(led, tx, layout, started, busy)
                        files = _snapshot(tar, layout, manifest, store_files)
                if not wait:
                    break
                time.sleep(0.05)
        digest = writer.finish()
    return BackupInfo(dest, writer.bytes, digest, started, files, manifest["audit_records"],
                      manifest["keys"], time.monotonic() - t0)


class _StoreFiles:
    """Opens the DuckDB files for reading and closes them only after the store connection.

    DuckDB locks its file with fcntl(2), and POSIX releases every fcntl lock a process holds on
    a file as soon as the process closes *any* descriptor of it: closing our copy of the
    database while the backup's connection is still open would let another process in. So the
    descriptors are closed after the connection, with the process-wide store lock held, so no
    other thread of this process has opened a connection meanwhile, and inside
    ``keep_store_open()`` only when that block ends (``Database.close_file``).
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._files: list[BinaryIO] = []

    def __enter__(self) -> _StoreFiles:
        _store_lock.acquire()
        return self

    def open(self, path: Path) -> BinaryIO:
        fh = open(path, "rb")  # noqa: SIM115 - closed in __exit__, after the connection
        self._files.append(fh)
        return fh

    def __exit__(self, *exc: object) -> None:
        try:
            for fh in self._files:
                self._db.close_file(fh)  # later, if the store is held open (keep_store_open)
        finally:
            _store_lock.release()


def _manifest(led: KeyLedger, tx: Any, layout: _Layout, started: datetime,
              busy: int) -> dict[str, Any]:
    import keyledger

    return {
        "kind": "keyledger-home-backup", "format": FORMAT_VERSION,
        "created_at": started.isoformat(), "principal": led.principal,
        "keyledger_version": keyledger.__version__, "home": str(layout.home),
        "home_id": led._rt.home_id,
        "schema_version": _sql_count(tx, "SELECT max(version) FROM schema_version"),
        "keys": _sql_count(tx, "SELECT count(*) FROM keys WHERE state <> 'destroyed'"),
        "versions": _sql_count(tx, "SELECT count(*) FROM versions WHERE state <> 'destroyed'"),
        "audit_records": _sql_count(tx, "SELECT count(*) FROM audit_log"),
        "last_checkpoint": _sql_count(tx, "SELECT max(cp_seq) FROM checkpoints"),
        "intents_in_flight": busy,
        "softhsm2_conf": layout.conf, "token_dir": layout.tokens, "pin_files": layout.pins,
    }


def _snapshot(tar: tarfile.TarFile, layout: _Layout, manifest: dict,
              store_files: _StoreFiles) -> int:
    """Write the home into ``tar``; the caller holds the store's lock."""
    home = layout.home
    with _CALL_LOCK:  # no PKCS#11 call of this process touches the token while it is read
        tokens = _read_tree(home / layout.tokens, layout.tokens)
    plain: list[tuple[str, Path, int | None]] = [
        (CONFIG_NAME, home / CONFIG_NAME, None), (layout.conf, home / layout.conf, None),
        *[(p, home / p, None) for p in layout.pins],
    ]
    if (home / SNAPSHOT_NAME).exists():
        plain.append((SNAPSHOT_NAME, home / SNAPSHOT_NAME, None))
    plain.append((DB_NAME, home / DB_NAME, None))
    wal = home / f"{DB_NAME}.wal"
    if wal.exists() and wal.stat().st_size:
        plain.append((wal.name, wal, None))
    journal_dir = home / "journal"
    journals = sorted(journal_dir.glob(f"*{JOURNAL_SUFFIX}")) if journal_dir.is_dir() else []
    for j in journals:
        plain.append((f"journal/{j.name}", j, _complete_length(j)))
    manifest["files"] = ([{"name": n, "bytes": len(d)} for n, d, _, _ in tokens if d is not None]
                         + [{"name": n, "bytes": p.stat().st_size if s is None else s}
                            for n, p, s in plain])
    _add_bytes(tar, MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    for name, data, mode, mtime in tokens:
        if data is None:
            tar.addfile(_tarinfo(name, 0, mode, mtime, tarfile.DIRTYPE))
        else:
            _add_bytes(tar, name, data, mode, mtime)
    if journals:
        st = journal_dir.stat()
        tar.addfile(_tarinfo("journal", 0, st.st_mode, st.st_mtime, tarfile.DIRTYPE))
    for name, path, size in plain:
        if name.startswith(DB_NAME):
            st = path.stat()
            tar.addfile(_tarinfo(name, st.st_size, st.st_mode, st.st_mtime),
                        store_files.open(path))
        else:
            _add_file(tar, name, path, size)
    return len(manifest["files"])


# -- restore -----------------------------------------------------------------------------------
@dataclass
class _Restored:
    home: Path
    manifest: dict
    sha256: str
    bytes: int


def restore(path: str | os.PathLike, home: str | os.PathLike, *, passphrase: str | bytes,
            principal: str | None = None, clock: Callable[[], datetime] | None = None
            ) -> KeyLedger:
    """Restore a backup into a new, empty ``home`` and open it.

    The home's SoftHSM2 configuration is rewritten to point at the restored token. A wrong
    passphrase or a damaged/altered archive raises ``InvalidCiphertext`` and leaves nothing
    behind. The restore is recorded in the restored home's ``backups`` table (kind
    ``restore``) and audit ledger. One process uses one SoftHSM2 configuration: close any other
    embedded home first (or restore from a separate process).
    """
    if principal is not None:
        validate_name(principal, "principal")
    restored = _restore_files(path, home, passphrase)
    led = _open_restored(restored, principal, clock)
    try:
        src = outputs.check_source(path, "backup file")
        m = restored.manifest
        with led._audited("restore", None) as rec:
            record_event(led, "restore", src, restored.sha256, restored.bytes, True, json.dumps({
                "backup_time": m.get("created_at"), "original_home": m.get("home"),
                "home": str(restored.home), "keys": m.get("keys"),
                "audit_records": m.get("audit_records"),
                "reconcile": str(led.last_reconcile)}))
            rec.detail = (f"restored {src} (sha256 {restored.sha256}, backup of "
                          f"{m.get('created_at')}) into {restored.home}")
    except BaseException:
        led.close()
        raise
    return led


def _open_restored(restored: _Restored, principal: str | None,
                   clock: Callable[[], datetime] | None) -> KeyLedger:
    from .service import open as open_home

    try:
        return open_home(restored.home, principal=principal, clock=clock)
    except BaseException:
        shutil.rmtree(restored.home, ignore_errors=True)
        raise


def _restore_files(path: str | os.PathLike, home: str | os.PathLike,
                   passphrase: str | bytes) -> _Restored:
    if not isinstance(home, str | os.PathLike):
        raise InvalidInput("path and home must be file paths")
    src = outputs.check_source(path, "backup file")
    target = Path(home).expanduser().absolute().resolve()  # through links, as it is written
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} is not empty; restore into a new, empty folder (a restore "
                          "never overwrites a home)")
    _refuse_inside_a_home(target)
    secret = _passphrase(passphrase)
    _check_process_free()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restoring-", dir=target.parent))
    try:
        with open(src, "rb") as fh:
            reader = _SealedReader(fh, secret, str(src))
            manifest = _extract(reader, staging)
            reader.drain()
        _relocate(staging, target, manifest)
        os.chmod(staging, 0o700)
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _as_error(exc, f"restoring into {target}") from None
        raise
    return _Restored(target, manifest, reader.sha256, reader.bytes)


def _refuse_inside_a_home(target: Path) -> None:
    """A restore never writes into an existing home (its folders are the home's business)."""
    for folder in target.parents:
        if (folder / CONFIG_NAME).is_file():
            raise InvalidInput(f"{target} is inside the keyledger home {folder}; restore into a "
                               "new, empty folder outside any home")


def _check_process_free() -> None:
    with pkcs11_backend._Process.lock:
        confs = [k[1] for k in pkcs11_backend._Process.backends if k[1] is not None]
    if confs:
        raise ConfigError(
            f"this process has an embedded home open (SOFTHSM2_CONF={confs[0]}); a process uses "
            "one SoftHSM2 configuration: close that ledger first or restore in another process")


_TOP_FILES = {MANIFEST_NAME, CONFIG_NAME, DB_NAME, f"{DB_NAME}.wal", SNAPSHOT_NAME}


def _allowed(name: str, manifest: dict) -> bool:
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return False
    if name in _TOP_FILES or name == manifest["softhsm2_conf"] or name in manifest["pin_files"]:
        return True
    tokens = manifest["token_dir"]
    if name == tokens or name.startswith(tokens + "/"):
        return True
    return name == "journal" or (len(parts) == 2 and parts[0] == "journal"
                                 and parts[1].endswith(JOURNAL_SUFFIX))


def _extract(reader: _SealedReader, staging: Path) -> dict:
    damaged = (f"the backup {reader.name} is damaged (its content is not a keyledger home "
               "archive); nothing was restored")
    manifest: dict | None = None
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if manifest is None:
                    if member.name != MANIFEST_NAME or not member.isfile():
                        raise InvalidCiphertext(damaged)
                    fh = tar.extractfile(member)
                    manifest = json.loads(fh.read()) if fh else None
                    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
                        raise InvalidCiphertext(damaged)
                    continue
                if not (member.isfile() or member.isdir()) or not _allowed(member.name,
                                                                           manifest):
                    raise InvalidCiphertext(f"{damaged} (unexpected member {member.name!r})")
                tar.extract(member, staging, filter="data")
    except (tarfile.TarError, json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise InvalidCiphertext(damaged) from None
    if manifest is None:
        raise InvalidCiphertext(damaged)
    for name in (CONFIG_NAME, DB_NAME, manifest["softhsm2_conf"], manifest["token_dir"],
                 *manifest["pin_files"]):
        if not (staging / name).exists():
            raise InvalidCiphertext(f"{damaged} ({name} is missing)")
    return manifest


def _relocate(staging: Path, target: Path, manifest: dict) -> None:
    """Point the restored home's SoftHSM2 config (and, if needed, settings) at ``target``."""
    (staging / manifest["softhsm2_conf"]).write_text(
        softhsm_conf_text(target / manifest["token_dir"]))
    for pin in manifest["pin_files"]:
        os.chmod(staging / pin, 0o600)
    cfg_path = staging / CONFIG_NAME
    try:
        data = tomllib.loads(cfg_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        raise InvalidCiphertext("the restored keyledger.toml is unreadable") from None
    hsm = data.get("hsm", {})
    changed = False
    if not Path(str(hsm.get("module", ""))).exists():
        module = find_softhsm_module()
        if module is None:
            raise ConfigError("SoftHSM2 is not installed here (no libsofthsm2.so found); "
                              "install the softhsm2 package and restore again")
        hsm["module"], changed = module, True
    for key, rel in (("softhsm2_conf", manifest["softhsm2_conf"]),
                     ("pin_file", manifest["pin_files"][0] if manifest["pin_files"] else None)):
        if rel is not None and key in hsm and Path(str(hsm[key])).is_absolute():
            hsm[key], changed = rel, True
    if changed:
        data["hsm"] = hsm
        write_config(staging, data)


# -- restore test (runs in a subprocess: one SoftHSM2 configuration per process) ----------------
_CHILD = (
    "import sys\n"
    "from keyledger.backup import _restore_test_main\n"
    "_restore_test_main(sys.argv[1:], sys.stdin.read())\n"
)


def _run_restore_test(src: Path, secret: bytes, principal: str, timeout: float,
                      sample: int) -> RestoreTestReport:
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="keyledger-restore-test-"))
    result_path = tmp / "result.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOFTHSM2_CONF", "KEYLEDGER_PKCS11_MODULE", "KEYLEDGER_HOME",
                        "KEYLEDGER_FAULT")}
    try:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(src), str(tmp / "home"), principal,
                 str(result_path), str(sample)],
                input=secret.hex(), capture_output=True, text=True, timeout=timeout, env=env)
            if result_path.exists():
                data = json.loads(result_path.read_text())
            else:
                tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
                data = {"problems": [f"the restore process failed (exit {proc.returncode}): "
                                     f"{tail[0][:300]}"]}
        except subprocess.TimeoutExpired:
            data = {"problems": [f"the restore did not finish within {timeout:.0f} s"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    known = {f for f in RestoreTestReport.__dataclass_fields__}
    report = RestoreTestReport(**{"ok": False, "archive": str(src),
                                  **{k: v for k, v in data.items() if k in known}})
    report.archive = str(src)
    report.seconds = time.monotonic() - t0
    return report


def _restore_test_main(argv: list[str], secret_hex: str) -> None:
    src, home, principal, result_path, sample = argv
    result = _restore_test(src, home, principal, bytes.fromhex(secret_hex.strip()), int(sample))
    Path(result_path).write_text(json.dumps(result, default=str))


def _restore_test(src: str, home: str, principal: str, secret: bytes,
                  sample: int) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "archive": src, "problems": [], "missing": []}
    try:
        restored = _restore_files(src, home, secret)
        out.update(sha256=restored.sha256, bytes=restored.bytes,
                   backup_time=restored.manifest.get("created_at"))
        led = _open_restored(restored, principal, None)
    except KeyLedgerError as exc:
        out["problems"].append(f"{type(exc).__name__}: {exc}")
        return out
    with led:
        out["reconcile"] = str(led.last_reconcile)
        rt = led._rt
        try:
            rt.ingest()
        except KeyLedgerError as exc:
            out["problems"].append(f"ingest: {exc}")
        head = rt.audit_head()
        with rt.db.write() as tx:
            report = verify_ledger(tx, rt.verify_checkpoint, head)
            rows = tx.execute(
                """SELECT k.name, k.spec, v.version, v.handle FROM versions v
                   JOIN keys k USING (key_id)
                   WHERE v.state <> 'destroyed' AND k.state <> 'destroyed'""").fetchall()
            keys = _sql_count(tx, "SELECT count(*) FROM keys WHERE state <> 'destroyed'")
        out.update(audit_ok=report.ok, audit_records=report.records, keys=keys,
                   versions=len(rows))
        out["problems"] += [f"audit: {p}" for p in report.problems]
        expected = restored.manifest.get("audit_records", 0)
        if report.records < expected:
            out["problems"].append(f"the restored ledger has {report.records} records, the "
                                   f"backup had {expected}")
        if keys != restored.manifest.get("keys", keys):
            out["problems"].append(f"{keys} keys restored, the backup had "
                                   f"{restored.manifest.get('keys')}")
        chosen = random.sample(rows, min(sample, len(rows)))
        for name, spec_name, version, handle in chosen:
            problem = _probe(rt.backend, spec_name, bytes.fromhex(handle))
            if problem:
                out["missing"].append(f"{name} v{version}")
                out["problems"].append(f"{name} v{version}: {problem}")
        out["versions_checked"] = len(chosen)
    out["ok"] = bool(out.get("audit_ok")) and not out["problems"]
    return out


def _probe(backend: Any, spec_name: str, handle: bytes) -> str | None:
    """None if the version's material is in the token and works, else what is wrong."""
    spec = parse_spec(spec_name)
    msg = b"keyledger restore test"
    try:
        if not backend.exists(handle):
            return "material missing from the restored token"
        if spec.family is Family.AES:
            nonce = os.urandom(12)
            body = backend.encrypt_gcm(handle, nonce, b"", msg)
            ok = backend.decrypt_gcm(handle, nonce, b"", body) == msg
        elif spec.family is Family.HMAC:
            ok = backend.verify_mac(handle, msg, backend.mac(handle, msg))
        else:
            ok = backend.verify(spec, handle, msg, backend.sign(spec, handle, msg))
    except Exception as exc:  # report, never crash the test run
        return f"{type(exc).__name__}: {exc}"
    return None if ok else "the material does not work"


def archive_names(path: str | os.PathLike, *, passphrase: str | bytes) -> list[str]:
    """Names of the files in a backup (for inspection); decrypts and authenticates all of it."""
    secret = _passphrase(passphrase)
    with open(Path(path), "rb") as fh:
        reader = _SealedReader(fh, secret, str(path))
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                names = [m.name for m in tar]
        except tarfile.TarError:
            raise InvalidCiphertext(f"the backup {path} is damaged") from None
        reader.drain()
    return names
