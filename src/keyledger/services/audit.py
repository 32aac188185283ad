"""Reading and checking the audit ledger: records, read-only queries, verification, exports."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .. import outputs
from ..errors import AuditError, InvalidInput
from ..frames import normalize
from ..model import name_digest, validate_bool, validate_when
from ..runtime import naive
from ..store import audit as audit_repo
from ..store import queries
from ..store.seals import ACCEPT_ACTION, accept_detail
from ..store.verify import VerifyReport
from ..store.verify import verify as verify_ledger
from .context import Service

if TYPE_CHECKING:
    import pandas as pd

    from ..display import AuditFrame

MAX_QUERY_TIMEOUT_S = 3600
AUDIT_LIMIT = 1000  # audit() returns the newest this many records unless told otherwise


class AuditService(Service):
    """The ledger's records for those allowed to read them; every read is itself recorded."""

    def flush_audit(self) -> int:
        """Move pending journal records of every process into the store now; returns how many."""
        return self._rt.ingest().records

    def audit(self, *, key: str | None = None, principal: str | None = None,
              action: str | None = None, outcome: str | None = None,
              since: datetime | None = None, until: datetime | None = None,
              limit: int | None = AUDIT_LIMIT, offset: int = 0, newest_first: bool = False
              ) -> AuditFrame:
        """The newest ``limit`` (default 1,000) matching audit records, oldest first (so
        ``.tail()`` is the newest), or newest first with ``newest_first=True``: time,
        principal, action, key, version, outcome, error, detail, ... ``offset`` skips that
        many newest records (the next page back); ``limit=None`` returns every match. Only
        the page is read: the query sorts newest first with a LIMIT, never loading the log.

        ``key`` also matches the records of refused calls that name no key, which keep only
        the name's hash (``sha256:...``, docs/audit.md)."""
        with self._audited("audit", key) as rec:
            self._authorize(rec, "audit", None)
            for what, value in (("key", key), ("principal", principal), ("action", action),
                                ("outcome", outcome)):
                if value is not None and not isinstance(value, str):
                    raise InvalidInput(f"{what} must be text, not {type(value).__name__}")
            validate_when(since, "since")
            validate_when(until, "until")
            validate_bool(newest_first, "newest_first")
            if limit is not None:
                _count(limit, "limit")
            _count(offset, "offset")  # all checked before the ingest below does any work
            self._record_filter(rec, key)
            with self._rt.db.hold():  # the ingest and the read share one open of the store
                self._rt.ingest()
                with self._rt.db.read() as tx:
                    df = audit_repo.records(
                        tx, key=key, key_digest=name_digest(key) if key is not None else None,
                        principal=principal, action=action, outcome=outcome,
                        since=naive(since) if since is not None else None,
                        until=naive(until) if until is not None else None,
                        limit=_count(limit, "limit") if limit is not None else None,
                        offset=_count(offset, "offset"), newest_first=newest_first)
            from ..display import AuditFrame  # pandas: loaded by the first call that returns a frame

            return AuditFrame(normalize(df))

    def query(self, sql: str, params: Sequence[object] | Mapping[str, object] | None = None, *,
              label: str | None = None, timeout_s: float | None = None) -> pd.DataFrame:
        """Run one read-only SQL query over the store and return a DataFrame (admin or auditor).

        Tables: keys, versions, transitions, audit_log, grants, requests, approvals, usage,
        compliance_findings, ... (docs/audit.md). The query runs in a transaction that is always
        rolled back, with file access disabled; the frame follows keyledger's conventions
        (``keyledger.frames``: UTC times, ``string``/``Int64``/``boolean``). ``label`` names the
        query in its audit record (default: its first 200 characters). A query still running
        after ``timeout_s`` (default: ``[store] query_timeout_s`` of keyledger.toml, 10 s) is
        stopped with ``InvalidInput``: while it runs, other processes cannot write the store.
        """
        with self._audited("query", None) as rec:
            self._authorize(rec, "query", None)
            if not isinstance(sql, str) or not sql.strip():
                raise InvalidInput("sql must be a non-empty SQL text")
            if label is not None and not isinstance(label, str):
                raise InvalidInput(f"label must be text, not {type(label).__name__}")
            limit = self._query_timeout(timeout_s)
            rec.detail = (label or " ".join(sql.split()))[:200]
            queries.check_query(sql)
            if params is not None and not isinstance(params, Sequence | Mapping):
                raise InvalidInput("params must be a list of values or a mapping of names to "
                                   f"values, not {type(params).__name__}")
            try:
                self._rt.ingest(for_read=True)
            except AuditError:  # a tampered ledger is still readable (verify_audit reports it)
                pass
            df = queries.run_query(self._rt.db, sql, params, limit)
            return normalize(df)

    def _query_timeout(self, timeout_s: object) -> float:
        if timeout_s is None:
            return self._rt.settings.query_timeout_s
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or \
                not 0 < timeout_s <= MAX_QUERY_TIMEOUT_S:
            raise InvalidInput(f"timeout_s must be a number of seconds above 0 and at most "
                               f"{MAX_QUERY_TIMEOUT_S}, not {timeout_s!r}")
        return float(timeout_s)

    def verify_audit(self) -> VerifyReport:
        """Check the chain, the checkpoints, the HSM-held head, the journals and their seals;
        name the first bad record. Not ok while any record is unproven (not accepted)."""
        with self._audited("verify_audit", None) as rec:
            self._authorize(rec, "verify_audit", None)
            # the ingest, the seal check and the verification share one open of the store;
            # when a live writer still owes a seal, that wait runs with the store released
            with self._rt.db.hold():
                due = self._seals_due(wait=False)
                report = self._verify(due) if due is not None else None
            if report is None:
                report = self._verify(self._seals_due(wait=True) or {})
            rec.detail = "ok" if report.ok else "; ".join(report.problems)[:500]
            return report

    def _seals_due(self, *, wait: bool) -> dict[str, int] | None:
        """The runtime's ``await_seals`` (seals and ingests first); a ledger that no longer
        matches its checkpoint is verified as it is (the verification reports it)."""
        try:
            return self._rt.await_seals(wait=wait)
        except AuditError:
            return {}

    def _verify(self, due: dict[str, int]) -> VerifyReport:
        """Verify the ledger and record the verification, in one transaction."""
        with self._rt.db.write(export=False) as tx:
            report = verify_ledger(tx, self._rt.verify_checkpoint, self._rt.audit_head(tx),
                                   self._rt.journal_check(due))
            audit_repo.record_verification(
                tx, time=naive(self._now()), ok=report.ok, records=report.records,
                first_bad_seq=(report.first_bad or {}).get("seq"),
                problem="; ".join(report.problems)[:1000] or None)
        return report

    def accept_unproven(self, journal: str, through_jseq: int, reason: str) -> None:
        """Accept, after investigating, the unproven records of ``journal`` up to
        ``through_jseq`` (see ``verify_audit()``): verification then lists them as accepted
        instead of failing. Needs the admin role; the acceptance is itself an audit record."""
        with self._audited(ACCEPT_ACTION, None) as rec:
            self._authorize(rec, ACCEPT_ACTION, None)
            if not isinstance(reason, str) or not reason.strip():
                raise InvalidInput("say what the investigation found (reason=...); auditors "
                                   "read it")
            if not isinstance(journal, str) or type(through_jseq) is not int:
                raise InvalidInput("journal must be a journal name and through_jseq an int, "
                                   "as verify_audit() names them")
            with self._rt.db.hold():  # the ingest and the read share one open of the store
                self._rt.ingest()
                with self._rt.db.read() as tx:
                    row = audit_repo.seal_state(tx, journal)
            if row is None or not row[0] < through_jseq <= row[1]:
                have = (f"its unproven records are {row[0] + 1}-{row[1]}" if row and row[0] <
                        row[1] else "it has no unproven records")
                raise InvalidInput(f"journal {journal!r}: cannot accept records through "
                                   f"{through_jseq}; {have if row else 'no such journal'}")
            rec.detail = accept_detail(journal, through_jseq, " ".join(reason.split()))[:500]

    def export_audit(self, path: str | os.PathLike, format: str = "parquet", *,
                     overwrite: bool = False) -> Path:
        """JSONL file, or Parquet partitioned by day (Hive layout: day=YYYY-MM-DD/).

        ``path`` must lie outside the home and not exist yet (``overwrite=True`` replaces a
        file, or a folder holding a previous Parquet export); see ``keyledger.outputs``.
        """
        with self._audited("export_audit", None) as rec:
            if not isinstance(path, str | os.PathLike):
                raise InvalidInput(f"path must be a file path, not {type(path).__name__}")
            self._authorize(rec, "export_audit", None)
            if format not in ("parquet", "jsonl"):
                raise InvalidInput("format must be 'parquet' or 'jsonl'")
            out = outputs.check_target(path, outputs.protected_paths(self._rt.settings),
                                       overwrite=overwrite, folder=format == "parquet",
                                       replaceable=_is_parquet_export, what="audit export")
            self._rt.ingest()
            # DuckDB's COPY writes the files itself: into a fresh private folder next to the
            # target, renamed into place afterwards (a failure leaves nothing behind).
            staged = (outputs.staged_file(out, overwrite=overwrite) if format == "jsonl" else
                      outputs.atomic_folder(out, overwrite=overwrite))
            with staged as tmp, self._rt.db.read() as tx:
                audit_repo.export(tx, tmp, format)
            rec.detail = f"{format} to {out}"
            return out


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidInput(f"{what} must be a whole number >= 0, not {value!r}"[:200])
    return value


def _is_parquet_export(folder: Path) -> bool:
    """Whether ``folder`` holds only an earlier Parquet export (day=.../*.parquet)."""
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_dir() or not entry.name.startswith("day="):
            return False
        if not all(f.is_file() and not f.is_symlink() and f.suffix == ".parquet"
                   for f in entry.iterdir()):
            return False
    return True
