"""Due work, bulk rewrap, trimming old versions and version-usage analytics."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import ciphertext as ct
from ..errors import InvalidInput, KeyLedgerError, KeyStateError, PolicyViolation
from ..frames import VERSION_STATES, normalize
from ..intents import HsmChange
from ..rotation import PROTECT_ACTIONS, DueReport, invalid_usage_limits, plan
from ..runtime import naive
from ..store import audit as audit_repo
from ..store import catalog as cat
from ..store import keys as keys_repo
from ..store import meta
from .batch import BatchService
from .compliance import ComplianceService
from .context import Context, Service
from .lifecycle import LifecycleService

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

LEASE_SECONDS = 600
# items per rewrap_many chunk: one progress step and one record per key; the HSM is still
# called batch.CHUNK items at a time
REWRAP_CHUNK = 4096


def _empty_frame() -> pd.DataFrame:
    import pandas as pd  # loaded by the first result that needs a frame, not by import keyledger

    return pd.DataFrame()


@dataclass
class RewrapResult:
    """Outcome of ``rewrap_many``: new ciphertexts (None where an item failed) and the errors."""

    ciphertexts: list[bytes | None]
    counts: pd.DataFrame  # key, version, ciphertexts (before)
    errors: pd.DataFrame = field(default_factory=_empty_frame)  # index, error, message
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return sum(c is not None for c in self.ciphertexts)

    def __str__(self) -> str:
        by = self._by_version()
        if self.dry_run:
            return f"dry run: {len(self.ciphertexts)} ciphertexts ({by}); nothing changed"
        return (f"rewrapped {self.ok} of {len(self.ciphertexts)} ciphertexts in "
                f"{self.seconds:.1f} s ({len(self.errors)} failed); before: {by}")

    def __repr__(self) -> str:
        """Counts and key names only: a notebook echo must not dump ciphertext bytes."""
        return (f"<RewrapResult {len(self.ciphertexts)} ciphertexts, {self.ok} rewrapped, "
                f"{len(self.errors)} failed{', dry run' if self.dry_run else ''}: "
                f"{self._by_version()}>")

    def _repr_html_(self) -> str:
        """The summary line and the per-version counts (never the ciphertexts)."""
        from ..display import esc

        return f"<div><b>{esc(self)}</b></div>" + self.counts.to_html(index=False)

    def _by_version(self) -> str:
        return ", ".join(f"{r.key} v{r.version}: {r.ciphertexts}"
                         for r in self.counts.itertuples()) or "nothing"


class MaintenanceService(Service):
    """Periodic and bulk work over many keys, built on the lifecycle and crypto services."""

    def __init__(self, ctx: Context, lifecycle: LifecycleService, crypto: BatchService,
                 compliance: ComplianceService) -> None:
        super().__init__(ctx)
        self.lifecycle, self.crypto, self.compliance = lifecycle, crypto, compliance

    # -- leases (one process at a time for periodic work) -----------------------------------------
    def take_lease(self, name: str, seconds: float) -> int | None:
        """Take a named lease; returns None on success or the pid of the live holder."""
        with self._rt.db.write(export=False) as tx:  # a lease row is not in the catalog snapshot
            return meta.take_lease(tx, name, seconds, self._rt.pid_alive)

    def release_lease(self, name: str) -> None:
        with self._rt.db.write(export=False) as tx:
            meta.release_lease(tx, name)

    # -- due work ----------------------------------------------------------------------------------
    def run_due(self, now: datetime | None = None, *,
                compliance: bool = True) -> DueReport:
        """Rotate keys whose period or usage limit is reached, destroy keys whose deletion window
        passed (when no quorum is needed), deactivate keys past their originator-usage period,
        then evaluate compliance (``compliance=False`` skips that evaluation, e.g. for a job that
        runs more often than the findings need refreshing).

        Safe from cron and from several processes at once: one process holds a lease, and each
        action re-checks under the store lock, so nothing runs twice. ``now`` (default: the
        ledger's clock) is the moment due-ness is judged at.
        """
        with self._audited("run_due", None) as rec:
            self._authorize(rec, "run_due", None)
            current = self._now()
            if now is not None and (not isinstance(now, datetime) or now.tzinfo is None):
                raise InvalidInput("now must be a timezone-aware datetime")
            if not isinstance(compliance, bool):
                raise InvalidInput("compliance must be True or False")
            when = current if now is None else now.astimezone(current.tzinfo)
            if when > current:
                raise InvalidInput("now must not be later than the ledger's clock: due work is "
                                   "done at the clock's time (inject a clock to simulate time)")
            report = DueReport(when)
            holder = self.take_lease("run_due", LEASE_SECONDS)
            if holder is not None:
                report.skipped.append({"action": "run_due", "key": "-",
                                       "reason": f"process {holder} is running due work"})
                rec.detail = report.skipped[0]["reason"]
                return report
            try:
                self._rt.ingest()
                keys = self._rt.catalog.all_keys()
                items = plan(keys, self._encryptions(), self._rt.home_policy(), when)
                report.skipped += invalid_usage_limits(keys, self._rt.home_policy())
                for item in items:
                    self._do_due(item, report)
                if compliance:
                    self._due_compliance(report, when)
                else:
                    report.compliance = "not evaluated (compliance=False)"
            finally:
                self.release_lease("run_due")
            rec.detail = f"{len(report.done)} done, {len(report.skipped)} skipped"
            return report

    def _due_compliance(self, report: DueReport, when: datetime) -> None:
        """Evaluate compliance as part of due work, so findings and their trend stay current."""
        try:
            run = self.compliance.evaluate(None, when)
            report.compliance = f"evaluation {run.run_id}: {len(run.visible())} open findings"
        except KeyLedgerError as exc:
            report.compliance = f"not evaluated: {exc}"

    def _do_due(self, item: Any, report: DueReport) -> None:
        entry = {"action": item.action, "key": item.key, "reason": item.reason}
        try:
            key = self._rt.catalog.get(item.key)
            if item.action == "rotate":
                self.lifecycle.rotate_version(item.key, f"due: {item.reason}",
                                              expect_version=key.latest_version)
            elif item.action == "destroy":
                needed = self._quorum(key)
                if needed > 1:
                    report.skipped.append({**entry, "reason": f"{item.reason}, but destroying "
                                           f"needs {needed} approvals: request('destroy', ...)"})
                    return
                self.lifecycle.destroy_key(item.key, f"due: {item.reason}", approved=False)
            else:
                self.lifecycle.deactivate(item.key, reason=f"due: {item.reason}")
            report.done.append(entry)
        except KeyLedgerError as exc:
            report.skipped.append({**entry, "reason": f"{item.reason}; not done: {exc}"})

    def _encryptions(self) -> dict[tuple[str, int], int]:
        """Encryptions per (key id, version) from the usage counters (after an ingest)."""
        with self._rt.db.read() as tx:
            return audit_repo.encryptions(tx, PROTECT_ACTIONS)

    # -- version usage (retire safety) -------------------------------------------------------------
    def version_usage(self, name: str | None = None) -> pd.DataFrame:
        """Per key version: state, encryptions, decryptions and when each last happened.

        Answers "is anything still decrypting with v1?" before raising min_decryption_version
        or trimming old versions.
        """
        with self._audited("version_usage", name) as rec:
            key_id = None
            if name is not None:
                key_id = self._key(rec, name).key_id
            else:
                self._authorize(rec, "version_usage", None)
            with self._rt.db.hold():  # the ingest and the read share one open of the store
                self._rt.ingest()
                with self._rt.db.read() as tx:
                    usage = audit_repo.version_usage(tx, key_id)
            return normalize(usage, categories={"state": VERSION_STATES})

    # -- bulk rewrap -------------------------------------------------------------------------------
    def rewrap_many(self, ciphertexts: Iterable[bytes] | pd.Series | str | os.PathLike,
                    *, context: Mapping[str, str] | None = None, dry_run: bool = False,
                    column: str = "ciphertext", out: str | os.PathLike | None = None,
                    progress: bool = True) -> RewrapResult:
        """Move many ciphertexts to their keys' latest versions; one bad item never stops the batch.

        ``ciphertexts``: an iterable of bytes, a pandas Series, or a Parquet file (``column``;
        with ``out`` the rewrapped file is written there). ``dry_run`` counts ciphertexts per key
        version from their headers, touching no key. The items go REWRAP_CHUNK at a time
        through the batch path (``BatchService.rewrap_chunk``): one ``rewrap_many`` record per
        chunk and key with the counts; an item it does not take (a failure, a key spec without
        batches) is one ``rewrap`` call and record, as are its errors; the whole call is one
        ``rewrap_many`` record without a key.
        """
        with self._audited("rewrap_many", None) as rec:
            items, table = _load_items(ciphertexts, column)
            counts = self._header_counts(items, rec if dry_run else None)
            if dry_run:
                rec.detail = f"dry run over {len(items)} ciphertexts"
                return RewrapResult([None] * len(items), counts, _errors([]), True)
            started = time.perf_counter()
            out_items: list[bytes | None] = []
            errors: list[tuple[int, str, str]] = []
            from tqdm.auto import tqdm  # ~0.15 s of imports: only when a batch is rewrapped

            with tqdm(total=len(items), desc="rewrap", unit="ct", disable=not progress,
                      leave=False) as bar:
                for start in range(0, len(items), REWRAP_CHUNK):
                    chunk = self.crypto.rewrap_chunk(items[start:start + REWRAP_CHUNK], context)
                    for i, got in enumerate(chunk, start):
                        if isinstance(got, KeyLedgerError):
                            out_items.append(None)
                            errors.append((i, type(got).__name__, str(got)))
                        else:
                            out_items.append(got)
                    bar.update(len(chunk))
            result = RewrapResult(out_items, counts, _errors(errors), False,
                                  time.perf_counter() - started)
            if table is not None and out is not None:
                import pyarrow as pa
                import pyarrow.parquet as pq

                arr = pa.array(out_items, type=pa.binary())
                pq.write_table(table.set_column(table.schema.get_field_index(column), column,
                                                arr), out)
            rec.detail = f"{result.ok} rewrapped, {len(errors)} failed"
            return result

    def _header_counts(self, items: list[Any], rec: Any = None) -> pd.DataFrame:
        """Ciphertexts per key version; with ``rec`` (a dry run) the caller must hold the user
        role on every key named, as a real rewrap would need."""
        import pandas as pd

        tally: dict[tuple[str, int], int] = {}
        allowed: set[str] = set()
        for blob in items:
            try:
                header, _, _ = ct.parse(blob)
            except KeyLedgerError:
                tally[("invalid", 0)] = tally.get(("invalid", 0), 0) + 1
                continue
            key = self._rt.catalog.get_id(header.key_id)
            if key is not None and rec is not None and key.key_id not in allowed:
                self._authorize(rec, "rewrap_many", key)
                allowed.add(key.key_id)
            label = key.name if key else f"unknown:{header.key_id}"
            tally[(label, header.version)] = tally.get((label, header.version), 0) + 1
        return normalize(pd.DataFrame([(k, v, n) for (k, v), n in sorted(tally.items())],
                                      columns=["key", "version", "ciphertexts"]))

    # -- trim --------------------------------------------------------------------------------------
    def trim(self, name: str, min_version: int) -> Any:
        """Destroy the HSM material of every version below ``min_version`` (raising the key's
        minimum decryption version to it). Irreversible: data under those versions is lost, so
        check ``version_usage`` first. Quorum-guarded like destroy."""
        return self.trim_versions(name, min_version, approved=False)

    def trim_versions(self, name: str | None, min_version: object, *, approved: bool) -> Any:
        # name None: an approved request whose key is gone; the name check refuses it (audited)
        with self._audited("trim", name) as rec:
            key = self._key(rec, name)
            if isinstance(min_version, bool) or not isinstance(min_version, int):
                raise InvalidInput("min_version must be a whole number")
            if not 1 < min_version <= key.latest_version:
                raise PolicyViolation(f"min_version must be between 2 and the latest version "
                                      f"{key.latest_version} of {key.name!r}")
            if not approved:
                self._require_quorum(key, "trim", f"trimming {key.name!r}")
            now = naive(self._now())
            # destroying objects is quick: the intent and the commit share one start of the store
            with self._rt.db.hold(), HsmChange(self._rt, "trim", self.principal) as change:
                with self._rt.db.write() as tx:
                    key = cat.load_key(tx, key.name)
                    if key.state.value == "destroyed":
                        raise KeyStateError(f"key {key.name!r} is destroyed")
                    doomed = [v for n, v in key.versions.items()
                              if n < min_version and v.state != "destroyed"]
                    # the minimum versions rise with the intent: the doomed versions are
                    # unusable before their material goes
                    change.write(tx, key_id=key.key_id, name=key.name, version=min_version,
                                 handles=[v.handle for v in doomed], now=now)
                    keys_repo.raise_min_versions(tx, key.key_id, min_version)
                change.each([v.handle for v in doomed], self._rt.backend.destroy)
                with change.commit() as tx:
                    keys_repo.destroy_versions(tx, key.key_id, now, below=min_version)
                    key = cat.load_key(tx, key.name)
            self._rt.catalog.refresh(force=True)
            rec.detail = f"destroyed v{', v'.join(str(v.version) for v in doomed) or ' none'}"
            return key


def _load_items(source: Any, column: str) -> tuple[list[Any], pa.Table | None]:
    if isinstance(source, str | os.PathLike) and str(source).endswith(".parquet"):
        path = Path(source)
        if not path.exists():
            raise InvalidInput(f"no Parquet file at {path}")
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise InvalidInput(f"{path} has no column {column!r} (columns: "
                               f"{', '.join(table.column_names)})")
        return table.column(column).to_pylist(), table
    if isinstance(source, bytes | str):
        raise InvalidInput("pass many ciphertexts (a list, a pandas Series or a .parquet path)")
    pandas = sys.modules.get("pandas")  # not loaded yet: source cannot be a pandas Series
    if pandas is not None and isinstance(source, pandas.Series):
        return source.tolist(), None
    try:
        return list(source), None
    except TypeError:
        raise InvalidInput("ciphertexts must be an iterable of bytes, a pandas Series or a "
                           ".parquet path") from None


def _errors(rows: list[tuple[int, str, str]]) -> pd.DataFrame:
    import pandas as pd

    return normalize(pd.DataFrame(rows, columns=["index", "error", "message"]))


__all__ = ["MaintenanceService", "RewrapResult"]
