"""What backups, restores and restore tests report: to the caller, and as evidence in the
store's ``backups`` table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime import naive

if TYPE_CHECKING:
    from ..services.context import Context


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


def record_event(ctx: Context, kind: str, path: Path | str, digest: str | None,
                 size: int | None, ok: bool, detail: str | None) -> None:
    """One row of the ``backups`` table (compliance evidence, GDPR 32(1)(c))."""
    with ctx.rt.db.write() as tx:
        tx.execute("INSERT INTO backups (time, kind, path, sha256, bytes, principal, ok, detail) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [naive(ctx.now()), kind, str(path), digest, size, ctx.principal, ok,
                    detail[:2000] if detail else None])
