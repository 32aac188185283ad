"""Cached data access for the dashboard: analytics frames keyed by a change token + filters.

Every function here takes an open ``KeyLedger`` and returns what a view shows; the heavy lifting
stays in ``keyledger.analytics`` (SQL through ``KeyLedger.query``). Results are kept in one
process-wide cache keyed by (home, principal, change token, function, filters, arguments):

- the **principal** is part of the key, so a frame computed for an admin is never served to a
  session whose principal may not read it (and each principal's first read is audited);
- the **change token** (``ChangeDetector.token``) moves when anything meaningful changes in the
  home, so a cached frame is never older than the last change the dashboard has seen.

Why not ``analytics.data_version(home)`` alone: the dashboard's own reads are audited (one
``query`` record each), and ingesting those records rewrites the store and ``catalog.json``, so
the raw version would change after every refresh and a live dashboard would refresh itself
forever. ``ChangeDetector`` polls ``data_version`` (file metadata only) and, when it moved,
derives a token that ignores this process's own audit journal and the store files: the catalog
content (key states, grants, policy), the other processes' journals (every call anywhere writes
one audit line there, so any change made by a script or notebook moves them) and a counter that
this process bumps after its own actions (``note_local_change``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .. import analytics as kla
from ..errors import AccessDenied, KeyLedgerError
from ..frames import normalize
from ..store.journal import SUFFIX as JOURNAL_SUFFIX
from ..store.journal import has_changes, journal_pid

if TYPE_CHECKING:
    from ..service import KeyLedger

# Time range presets of the global filter: label -> length (None: everything).
TIME_RANGES: dict[str, timedelta | None] = {
    "Last 24 hours": timedelta(days=1),
    "Last 7 days": timedelta(days=7),
    "Last 30 days": timedelta(days=30),
    "Last 90 days": timedelta(days=90),
    "Last 12 months": timedelta(days=365),
    "All time": None,
}
DEFAULT_RANGE = "Last 30 days"
CACHE_SIZE = 256


# -- change detection ----------------------------------------------------------------------------
_local_lock = threading.Lock()
_local_changes: dict[str, int] = {}


def note_local_change(home: str | os.PathLike) -> None:
    """Tell every dashboard session of this process that something changed in ``home`` (an
    action taken here: other sessions cannot see it in another process's journal)."""
    with _local_lock:
        key = str(Path(home).absolute())
        _local_changes[key] = _local_changes.get(key, 0) + 1


def local_changes(home: str | os.PathLike) -> int:
    with _local_lock:
        return _local_changes.get(str(Path(home).absolute()), 0)


@dataclass(frozen=True)
class Token:
    """What the dashboard has seen: catalog content, other processes' audit activity and
    this process's own actions."""

    catalog: str
    activity: tuple
    local: int

    def catalog_changed(self, other: Token | None) -> bool:
        return other is None or (self.catalog, self.local) != (other.catalog, other.local)


class ChangeDetector:
    """Polls ``analytics.data_version(home)`` and turns it into a ``Token``."""

    def __init__(self, home: str | os.PathLike, pid: int | None = None) -> None:
        self.home = Path(home)
        self.pid = os.getpid() if pid is None else pid
        self._raw: tuple | None = None
        self._token: Token | None = None
        self._catalog_stamp: tuple | None = None
        self._catalog_digest = ""
        self._journals: dict[str, tuple[int, int]] = {}  # name -> (bytes seen, changes seen)

    def raw(self) -> tuple:
        return kla.data_version(self.home)

    def token(self) -> Token:
        """The current token (re-derived only when ``data_version`` moved)."""
        raw = self.raw()
        local = local_changes(self.home)
        if raw == self._raw and self._token is not None and self._token.local == local:
            return self._token
        catalog, activity = "", []
        for name, mtime, size in raw:
            if name == "catalog.json":
                catalog = self._digest((mtime, size))
            elif name.startswith("keyledger.duckdb"):
                continue  # moved by every ingest, including of this process's own reads
            else:
                if journal_pid(name.removesuffix(JOURNAL_SUFFIX)) == self.pid:
                    continue  # this process's own audit journal (its reads are audited too)
                # Only growth holding a non-read counts: another dashboard's or notebook's
                # reads are audited too, and two dashboards would otherwise wake each other.
                # Journals seen at the first look are the baseline; later ones count whole.
                start = (size or 0) if self._token is None else 0
                seen, changes = self._journals.get(name, (start, 0))
                if (size or 0) != seen and has_changes(self.home / "journal" / name, seen,
                                                       size or 0):
                    changes += 1
                self._journals[name] = (size or 0, changes)
                activity.append((name, changes))
        self._raw = raw
        self._token = Token(catalog, tuple(activity), local)
        return self._token

    def _digest(self, stamp: tuple) -> str:
        if stamp != self._catalog_stamp:
            try:
                data = (self.home / "catalog.json").read_bytes()
            except OSError:
                data = b""
            self._catalog_digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            self._catalog_stamp = stamp
        return self._catalog_digest


class RemoteChangeDetector:
    """``ChangeDetector`` of a dashboard served as a client of ``keyledger serve``
    (``--url``): the server derives the token from its home; this process's own actions
    count as local changes, as they do for a local home."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.home = ledger.url

    def token(self) -> Token:
        catalog, activity = self.ledger.change_token()
        return Token(catalog, tuple(activity), local_changes(self.home))


def detector_for(ledger: Any) -> ChangeDetector | RemoteChangeDetector:
    """The change detector of a local ledger (its home's files) or of a ``RemoteLedger``."""
    if getattr(ledger, "url", None) is not None:
        return RemoteChangeDetector(ledger)
    return ChangeDetector(ledger.home)


# -- the cache -----------------------------------------------------------------------------------
class FrameCache:
    """A small thread-safe LRU of computed frames; entries of older tokens age out."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = compute()  # outside the lock: a slow query must not block other sessions
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


CACHE = FrameCache()


class Data:
    """Cached analytics for one session: a ledger, its principal and the current token.

    ``token`` is set by the dashboard state after each refresh; every method returns a frame
    for (token, filters, arguments), computing it at most once per process.
    """

    def __init__(self, ledger: KeyLedger, *, cache: FrameCache = CACHE) -> None:
        self.ledger = ledger
        self.cache = cache
        self.token: Hashable = None

    def _cached(self, name: str, compute: Callable[[], Any], *args: Hashable) -> Any:
        where = getattr(self.ledger, "url", None) or self.ledger.home
        key = (str(where), self.ledger.principal, self.token, name, *args)
        return self.cache.get_or_compute(key, compute)

    def now(self) -> datetime:
        return self.ledger.now()

    # -- catalog and roles -----------------------------------------------------------------------
    def keys(self) -> pd.DataFrame:
        """``list_keys()`` (the keys this principal may see)."""
        return self._cached("keys", self.ledger.list_keys)

    def grants(self) -> pd.DataFrame:
        def compute() -> pd.DataFrame:
            try:
                return self.ledger.grants()
            except AccessDenied:  # no role anywhere: nothing to show
                return normalize(pd.DataFrame(columns=["key", "principal", "role",
                                                       "granted_by", "granted_at"]),
                                 times=("granted_at",))
        return self._cached("grants", compute)

    def requests(self, status: str | None = "pending") -> pd.DataFrame:
        return self._cached("requests", lambda: self.ledger.requests(status), status)

    # -- rotation --------------------------------------------------------------------------------
    def key_status(self, filters: kla.Filters) -> pd.DataFrame:
        now = self.now()
        # analytics.key_status over the cached list_keys() frame (one audited read per token,
        # not one per filter change)
        return self._cached("key_status", lambda: kla.key_status_of(self.keys(), filters,
                                                                    now=now),
                            filters, _minute(now))

    def upcoming(self, filters: kla.Filters, days: int = 30) -> pd.DataFrame:
        now = self.now()
        return self._cached("upcoming", lambda: kla.upcoming(self.key_status(filters), now=now,
                                                             days=days), filters, days,
                            _minute(now))

    def version_timeline(self, filters: kla.Filters) -> pd.DataFrame:
        now = self.now()
        return self._cached("version_timeline",
                            lambda: kla.version_timeline(self.ledger, filters, now=now),
                            filters, _minute(now))

    # -- usage -----------------------------------------------------------------------------------
    def ops_per_period(self, filters: kla.Filters, by: str = "action", top: int = 8,
                       bucket: str | None = None) -> pd.DataFrame:
        return self._cached("ops", lambda: kla.ops_per_period(self.ledger, filters, by=by,
                                                              top=top, bucket=bucket),
                            filters, by, top, bucket)

    def version_usage(self, filters: kla.Filters) -> pd.DataFrame:
        return self._cached("version_usage", lambda: kla.version_usage(self.ledger, filters),
                            filters)

    def top_keys(self, filters: kla.Filters, n: int = 10) -> pd.DataFrame:
        return self._cached("top_keys", lambda: kla.top_keys(self.ledger, filters, n=n),
                            filters, n)

    def unusual_activity(self, filters: kla.Filters, days: int = 7) -> pd.DataFrame:
        now = self.now()
        return self._cached("unusual", lambda: kla.unusual_activity(self.ledger, filters, now=now,
                                                                    days=days),
                            filters, days, _minute(now))

    def overview_numbers(self, filters: kla.Filters) -> dict[str, Any]:
        """``analytics.activity_24h`` (ops, ops_before, denied, failed), every audit record
        (``total``) and ``last_verification`` (``verification``: None or a dict) in ONE query.

        Each ``KeyLedger.query`` first ingests pending journal lines, including the audit
        record of the previous query, which costs far more than these aggregates; the overview
        is the first page shown, so it asks once instead of three times."""
        now = self.now()

        def compute() -> dict[str, Any]:
            activity, args = kla.activity_24h_sql(filters, now)
            sql = f"""
                SELECT a.*, (SELECT count(*) FROM audit_log)::BIGINT AS total,
                       v.time AS v_time, v.ok AS v_ok, v.records AS v_records,
                       v.first_bad_seq AS v_first_bad_seq, v.problem AS v_problem
                FROM ({activity}) a
                LEFT JOIN (SELECT * FROM verifications ORDER BY time DESC, records DESC
                           LIMIT 1) v ON TRUE"""
            row = self.ledger.query(sql, args, label="dashboard.overview").iloc[0]
            out: dict[str, Any] = {k: int(row[k]) for k in ("ops", "ops_before", "denied",
                                                             "failed", "total")}
            out["verification"] = None if pd.isna(row["v_time"]) else {
                "time": row["v_time"], "ok": bool(row["v_ok"]),
                "records": int(row["v_records"] or 0),
                "first_bad_seq": None if pd.isna(row["v_first_bad_seq"])
                else int(row["v_first_bad_seq"]),
                "problem": None if pd.isna(row["v_problem"]) else row["v_problem"]}
            return out
        return self._cached("overview_numbers", compute, filters, _minute(now))

    # -- audit -----------------------------------------------------------------------------------
    def audit_window(self, filters: kla.Filters, principal: str | None = None,
                     action: str | None = None, outcome: str | None = None,
                     anchor: int | None = None, include_reads: bool = True
                     ) -> tuple[int, int | None]:
        """(matching records, highest ``seq`` among them) up to ``anchor`` (a ``seq``; None:
        everything ingested). Paging below a fixed anchor stays stable while the ledger grows
        (pages by offset over a live ledger would shift with every new record)."""
        def compute() -> tuple[int, int | None]:
            return kla.audit_window(self.ledger, filters, principal=principal, action=action,
                                    outcome=outcome, max_seq=anchor,
                                    include_reads=include_reads)
        return self._cached("audit_window", compute, filters, principal, action, outcome, anchor,
                            include_reads)

    def audit_page(self, filters: kla.Filters, principal: str | None = None,
                   action: str | None = None, outcome: str | None = None,
                   anchor: int | None = None, offset: int = 0, limit: int = 50,
                   include_reads: bool = True) -> pd.DataFrame:
        """One page, newest first, of the records at or below ``anchor``."""
        def compute() -> pd.DataFrame:
            return kla.audit_page(self.ledger, filters, principal=principal, action=action,
                                  outcome=outcome, offset=int(offset), limit=int(limit),
                                  max_seq=anchor, include_reads=include_reads)
        return self._cached("audit_page", compute, filters, principal, action, outcome, anchor,
                            offset, limit, include_reads)

    def audit_facets(self) -> dict[str, list[str]]:
        return self._cached("audit_facets", lambda: kla.audit_facets(self.ledger))

    def last_verification(self) -> dict[str, Any] | None:
        return self._cached("last_verification", lambda: kla.last_verification(self.ledger))

    # -- compliance ------------------------------------------------------------------------------
    def findings(self) -> pd.DataFrame:
        return self._cached("findings", self.ledger.findings)

    def compliance_trend(self) -> pd.DataFrame:
        return self._cached("compliance_trend", self.ledger.compliance_trend)

    def compliance_matrix(self, filters: kla.Filters) -> pd.DataFrame:
        return self._cached("compliance_matrix",
                            lambda: kla.compliance_matrix(self.filtered_findings(filters)),
                            filters)

    def filtered_findings(self, filters: kla.Filters) -> pd.DataFrame:
        """Findings on the filtered keys (home-wide findings, without a key, always show)."""
        def compute() -> pd.DataFrame:
            df = self.findings()
            if not (filters.keys or filters.owners or filters.tags):
                return df
            names = set(filters.match_keys(self.keys())["name"])
            return df[df["key"].isna() | df["key"].isin(names)].reset_index(drop=True)
        return self._cached("filtered_findings", compute, filters)

    def compliance_report(self) -> Path:
        """Write the HTML compliance report to a fresh temporary file and return its path."""
        folder = Path(tempfile.mkdtemp(prefix="keyledger-report-"))
        return self.ledger.compliance_report(folder / "keyledger-compliance.html", "html")


def range_filters(filters: kla.Filters, time_range: str, now: datetime) -> kla.Filters:
    """``filters`` limited to the preset ``time_range`` ending at ``now`` (to the minute, so a
    range stays one cache key for a minute)."""
    span = TIME_RANGES.get(time_range)
    if span is None:
        return filters.with_range(None, None)
    end = _minute(now) + timedelta(minutes=1)
    return filters.with_range(end - span, end)


def bucket_for(time_range: str) -> str | None:
    """Days for ranges up to 90 days, weeks for a year (what ``ops_per_period`` would pick,
    without the extra query that measures the span); None (let it measure) for all time."""
    span = TIME_RANGES.get(time_range)
    if span is None:
        return None
    return "day" if span <= timedelta(days=120) else "week"


def _minute(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0)


def message(exc: BaseException) -> str:
    """What to show for a failure: keyledger errors carry a sentence meant for people."""
    if isinstance(exc, KeyLedgerError):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


__all__ = ["CACHE", "DEFAULT_RANGE", "TIME_RANGES", "ChangeDetector", "Data", "FrameCache",
           "RemoteChangeDetector", "bucket_for", "detector_for",
           "Token", "local_changes", "message", "note_local_change", "range_filters"]
