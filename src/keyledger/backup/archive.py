"""The tar layout of a backup: which files of an embedded home go in, taken consistently.

The archive holds ``MANIFEST.json`` first, then the SoftHSM2 token directory (read by the HSM
backend while no PKCS#11 call of this process runs), the settings, PIN files, catalog snapshot,
the DuckDB files (read with the store locked) and journals up to their last complete line.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import outputs
from ..config import CONFIG_NAME, DB_NAME, Settings
from ..errors import ConfigError, InvalidCiphertext, KeyLedgerError
from ..hsm import memory
from ..hsm.backend import TokenFile
from ..hsm.softhsm import token_dir
from ..store.catalog import SNAPSHOT_NAME
from ..store.journal import SUFFIX as JOURNAL_SUFFIX
from ..version import __version__
from .reports import BackupInfo
from .stream import FORMAT_VERSION, SealedReader, SealedWriter, check_passphrase

if TYPE_CHECKING:
    from ..services.context import Context

MANIFEST_NAME = "MANIFEST.json"
# How long a backup waits for create/rotate/destroy operations of other processes to finish
# before it snapshots anyway (a restore rolls interrupted operations back or forward).
INTENT_WAIT_S = 2.0


@dataclass
class Layout:
    """The files of an embedded home, as paths inside the archive."""

    home: Path
    conf: str  # softhsm2.conf
    tokens: str  # token directory
    pins: list[str]

    @classmethod
    def of(cls, home: Path, settings: Settings) -> Layout:
        hsm = settings.hsm
        if hsm.backend == memory.MEMORY:
            raise ConfigError(memory.NO_BACKUP)
        if not hsm.embedded:
            raise ConfigError(
                f"backup() covers homes with the embedded SoftHSM2 token only; this home uses "
                f"{hsm.module}: back up its keys with the HSM vendor's backup procedure (key "
                "material cannot leave the HSM in clear) and the audit ledger with export_audit()")
        conf_path = hsm.softhsm2_conf or home / "softhsm2.conf"
        tokens = token_dir(conf_path)
        pins = [p for p in (hsm.pin_file, home / "so.pin") if p is not None]
        names = [_inside(home, p, what) for p, what in
                 ((conf_path, "softhsm2.conf"), (tokens, "token directory"))]
        pin_names = sorted({_inside(home, p, "PIN file") for p in pins if p.exists()})
        if hsm.pin_file is None or _inside(home, hsm.pin_file, "PIN file") not in pin_names:
            raise ConfigError(f"the HSM PIN file {hsm.pin_file} is missing; a backup without it "
                              "could not be opened")
        return cls(home, names[0], names[1], pin_names)


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


def sql_count(tx: Any, sql: str) -> int:
    row = tx.execute(sql).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def as_error(exc: BaseException, doing: str) -> KeyLedgerError:
    """``exc`` as a KeyLedgerError whose message says what failed and what to check."""
    if isinstance(exc, KeyLedgerError):
        return exc
    if isinstance(exc, OSError):
        return KeyLedgerError(f"{doing} failed: {exc.strerror or exc}; check the folder "
                              "exists, is writable and has free space")
    return KeyLedgerError(f"{doing} failed: {exc}")


def write_archive(ctx: Context, layout: Layout, dest: Path, secret: bytes,
                  started: datetime, t0: float, overwrite: bool) -> BackupInfo:
    """Seal a consistent snapshot of ``ctx``'s home into ``dest``."""
    with outputs.atomic_file(dest, overwrite=overwrite) as out:
        writer = SealedWriter(out, secret)
        # typeshed's tarfile wants tell/seek/close of any fileobj; a stream ("w|") only writes
        with tarfile.open(fileobj=writer, mode="w|",  # type: ignore[call-overload]
                          format=tarfile.PAX_FORMAT) as tar:
            deadline = time.monotonic() + INTENT_WAIT_S
            while True:
                # The store's file lock: no process changes the catalog, the ledger or the
                # HSM-held audit head until the snapshot is complete.
                with ctx.rt.db.file_reader() as open_file, ctx.rt.db.write() as tx:
                    busy = sum(ctx.rt.owner_running(pid, intent_id) for intent_id, pid in
                               tx.execute("SELECT intent_id, pid FROM intents").fetchall())
                    wait = bool(busy) and time.monotonic() < deadline
                    if not wait:  # else a create/rotate/destroy is in flight: let it end
                        tx.execute("CHECKPOINT")
                        manifest = _manifest(ctx, tx, layout, started, busy)
                        tokens = _token_files(ctx, layout)
                        files = _snapshot(tar, layout, manifest, tokens, open_file)
                if not wait:
                    break
                time.sleep(0.05)
        digest = writer.finish()
    return BackupInfo(dest, writer.bytes, digest, started, files, manifest["audit_records"],
                      manifest["keys"], time.monotonic() - t0)


def _token_files(ctx: Context, layout: Layout) -> list[TokenFile]:
    """The token directory as archive members; no PKCS#11 call of this process runs meanwhile."""
    with ctx.rt.backend.exclusive():
        files = ctx.rt.backend.snapshot_token()
    return [(layout.tokens if rel == "." else f"{layout.tokens}/{rel}", data, mode, mtime)
            for rel, data, mode, mtime in files]


def _manifest(ctx: Context, tx: Any, layout: Layout, started: datetime,
              busy: int) -> dict[str, Any]:
    return {
        "kind": "keyledger-home-backup", "format": FORMAT_VERSION,
        "created_at": started.isoformat(), "principal": ctx.principal,
        "keyledger_version": __version__, "home": str(layout.home),
        "home_id": ctx.rt.home_id,
        "schema_version": sql_count(tx, "SELECT max(version) FROM schema_version"),
        "keys": sql_count(tx, "SELECT count(*) FROM keys WHERE state <> 'destroyed'"),
        "versions": sql_count(tx, "SELECT count(*) FROM versions WHERE state <> 'destroyed'"),
        "audit_records": sql_count(tx, "SELECT count(*) FROM audit_log"),
        "last_checkpoint": sql_count(tx, "SELECT max(cp_seq) FROM checkpoints"),
        "intents_in_flight": busy,
        "softhsm2_conf": layout.conf, "token_dir": layout.tokens, "pin_files": layout.pins,
    }


def _snapshot(tar: tarfile.TarFile, layout: Layout, manifest: dict, tokens: list[TokenFile],
              open_file: Callable[[Path], BinaryIO]) -> int:
    """Write the home into ``tar``; the caller holds the store's lock."""
    home = layout.home
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
            tar.addfile(_tarinfo(name, st.st_size, st.st_mode, st.st_mtime), open_file(path))
        else:
            _add_file(tar, name, path, size)
    return len(manifest["files"])


def archive_names(path: str | os.PathLike, *, passphrase: str | bytes) -> list[str]:
    """Names of the files in a backup (for inspection); decrypts and authenticates all of it."""
    secret = check_passphrase(passphrase)
    with open(Path(path), "rb") as fh:
        reader = SealedReader(fh, secret, str(path))
        try:
            # typeshed's tarfile wants write/tell/seek of any fileobj; a stream ("r|") only reads
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                names = [m.name for m in tar]
        except tarfile.TarError:
            raise InvalidCiphertext(f"the backup {path} is damaged") from None
        reader.drain()
    return names
