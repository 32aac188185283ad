"""``KeyLedger.backup``, ``restore_test`` and ``backups``: the audited service calls (and the
restore's record in the restored home)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import outputs
from ..errors import AuditError, InvalidInput, KeyLedgerError
from ..frames import normalize
from ..services.context import Service
from .archive import Layout, as_error, write_archive
from .reports import BackupInfo, RestoreTestReport, record_event
from .restore import Restored
from .stream import check_passphrase

if TYPE_CHECKING:
    import pandas as pd

RESTORE_TEST_SAMPLE = 32


class BackupMixin(Service):
    """The service behind ``KeyLedger.backup``, ``restore_test`` and ``backups``."""

    def backup(self, path: str | os.PathLike, *, passphrase: str | bytes,
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
            layout = Layout.of(self.home, self._rt.settings)
            secret = check_passphrase(passphrase)
            dest = outputs.check_target(path, outputs.protected_paths(self._rt.settings),
                                        overwrite=overwrite, what="backup")
            started, t0 = self._now(), time.monotonic()
            try:
                try:  # journals into the store first, so the archive needs few of them
                    self._rt.ingest()
                except AuditError:  # a ledger that fails its checkpoint: back it up as it is
                    pass  # (the journals are archived too; verify_audit names the problem)
                info = write_archive(self.ctx, layout, dest, secret, started, t0, overwrite)
            except (KeyLedgerError, OSError, tarfile.TarError) as exc:
                err = as_error(exc, f"writing the backup {dest}")
                try:
                    record_event(self.ctx, "backup", dest, None, None, False,
                                 f"{type(err).__name__}: {err}")
                except KeyLedgerError:
                    pass
                if err is exc:
                    raise
                raise err from None
            record_event(self.ctx, "backup", dest, info.sha256, info.bytes, True, json.dumps({
                "keys": info.keys, "audit_records": info.audit_records, "files": info.files,
                "seconds": round(info.seconds, 3)}))
            rec.detail = f"{info.bytes} bytes, sha256 {info.sha256}, to {dest}"
            return info

    def restore_test(self, path: str | os.PathLike, *, passphrase: str | bytes,
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
            secret = check_passphrase(passphrase)
            if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
                raise InvalidInput("sample must be a positive whole number of key versions")
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
                raise InvalidInput("timeout must be a positive number of seconds")
            report = _run_restore_test(src, secret, self.principal, float(timeout), sample)
            record_event(self.ctx, "restore_test", src, report.sha256, report.bytes, report.ok,
                         json.dumps(report.to_dict(), default=str))
            rec.detail = str(report)[:500]
            return report

    def backups(self) -> pd.DataFrame:
        """Backups, restores and restore tests recorded in this home (oldest first)."""
        with self._audited("backups", None) as rec:
            self._authorize(rec, "audit", None)
            with self._rt.db.read() as tx:
                df = tx.execute("SELECT * FROM backups ORDER BY time, rowid").df()
            return normalize(df)

    def record_restore(self, src: Path, restored: Restored, reconcile: str) -> None:
        """The audit record and ``backups`` row of a restore, written in the restored home."""
        m = restored.manifest
        with self._audited("restore", None) as rec:
            record_event(self.ctx, "restore", src, restored.sha256, restored.bytes, True,
                         json.dumps({
                             "backup_time": m.get("created_at"), "original_home": m.get("home"),
                             "home": str(restored.home), "keys": m.get("keys"),
                             "audit_records": m.get("audit_records"), "reconcile": reconcile}))
            rec.detail = (f"restored {src} (sha256 {restored.sha256}, backup of "
                          f"{m.get('created_at')}) into {restored.home}")


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
                [sys.executable, "-m", "keyledger.backup.restore_test", str(src),
                 str(tmp / "home"), principal, str(result_path), str(sample)],
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
