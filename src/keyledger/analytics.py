"""Analytics: small DataFrames for charts, widgets, the dashboard and notebooks.

Every function takes an open ``KeyLedger`` and a ``Filters`` (owner, tag, key, time range) and
returns an aggregated DataFrame. Heavy lifting happens in DuckDB through ``KeyLedger.query``
(read-only, authorised for admins and auditors, audited once per call), so a ledger of millions
of records reaches Python as a few hundred rows. Timestamps are UTC.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidInput
from .frames import VERSION_STATES, normalize
from .model import KeyState
from .store.journal import READ_ACTIONS

if TYPE_CHECKING:
    import pandas as pd

    from .service import KeyLedger

DECRYPT_ACTIONS = ("decrypt", "envelope_decrypt")
ENCRYPT_ACTIONS = ("encrypt", "generate_data_key", "envelope_encrypt", "rewrap")
CRYPTO_ACTIONS = (*ENCRYPT_ACTIONS, *DECRYPT_ACTIONS, "sign", "verify", "mac", "verify_mac")
GROUPINGS = ("action", "key", "principal", "outcome")
DUE_SOON_DAYS = 30
# Rotation status, most urgent first; the same words and colours everywhere (charts.py).
ROTATION_STATUSES = ("overdue", "due soon", "ok", "not scheduled", "inactive")
STATES = tuple(s.value for s in KeyState)


@dataclass(frozen=True)
class Filters:
    """Global filters shared by every view: empty means "everything"."""

    keys: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default=())  # "team=payments"; all must match
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("keys", "owners", "tags"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value or ()))
        for tag in self.tags:
            if "=" not in tag:
                raise InvalidInput(f"tag filter {tag!r} must look like name=value")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise InvalidInput(f"{name} must be a timezone-aware datetime")
        if self.since and self.until and self.since >= self.until:
            raise InvalidInput("the time range is empty: since must be before until")

    def with_range(self, since: datetime | None, until: datetime | None) -> Filters:
        return replace(self, since=since, until=until)

    def key_sql(self, column: str = "key_id") -> tuple[str, list[Any]]:
        """A SQL condition on ``column`` (a key id) for the key filters, and its parameters."""
        conds: list[str] = []
        args: list[Any] = []
        if self.keys:
            conds.append(f"name IN ({_marks(self.keys)})")
            args.extend(self.keys)
        if self.owners:
            conds.append(f"owner IN ({_marks(self.owners)})")
            args.extend(self.owners)
        for tag in self.tags:
            name, value = tag.split("=", 1)
            conds.append("json_extract_string(tags, ?) = ?")
            args.extend([f'$."{name.replace(chr(34), "")}"', value])
        if not conds:
            return "TRUE", []
        return f"{column} IN (SELECT key_id FROM keys WHERE {' AND '.join(conds)})", args

    def time_sql(self, column: str = "time") -> tuple[str, list[Any]]:
        conds, args = [], []
        if self.since is not None:
            conds.append(f"{column} >= ?")
            args.append(_naive(self.since))
        if self.until is not None:
            conds.append(f"{column} < ?")
            args.append(_naive(self.until))
        return (" AND ".join(conds) or "TRUE"), args

    def audit_sql(self) -> tuple[str, list[Any]]:
        """Key and time conditions for ``audit_log``."""
        key_cond, key_args = self.key_sql()
        time_cond, time_args = self.time_sql()
        return f"{key_cond} AND {time_cond}", key_args + time_args

    def match_keys(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows of a ``list_keys()``-shaped frame that pass the key filters."""
        import pandas as pd

        mask = pd.Series(True, index=df.index)
        if self.keys:
            mask &= df["name"].isin(self.keys)
        if self.owners:
            mask &= df["owner"].isin(self.owners)
        for tag in self.tags:
            name, value = tag.split("=", 1)
            mask &= df["tags"].map(lambda t, n=name, v=value: (t or {}).get(n) == v)
        return df[mask]


EVERYTHING = Filters()


def _marks(values: Iterable[object]) -> str:
    return ", ".join("?" for _ in values)


def _naive(dt: datetime) -> datetime:
    from .runtime import naive

    return naive(dt)


def _now(ledger: KeyLedger, now: datetime | None) -> datetime:
    return now if now is not None else ledger.now()


# -- keys and rotation ---------------------------------------------------------------------------
def key_status(ledger: KeyLedger, filters: Filters = EVERYTHING, *,
               now: datetime | None = None, due_soon_days: int = DUE_SOON_DAYS) -> pd.DataFrame:
    """``list_keys()`` plus ``team``, ``days_to_due`` and ``rotation_status`` (overdue, due soon,
    ok, not scheduled, inactive), most urgent first."""
    now = _now(ledger, now)
    return key_status_of(ledger.list_keys(), filters, now=now, due_soon_days=due_soon_days)


def key_status_of(keys: pd.DataFrame, filters: Filters = EVERYTHING, *, now: datetime,
                  due_soon_days: int = DUE_SOON_DAYS) -> pd.DataFrame:
    """``key_status`` of a ``list_keys()`` frame already read (the dashboard's cached one)."""
    import pandas as pd

    df = filters.match_keys(keys).copy()
    days = (df["next_rotation_due"] - pd.Timestamp(now)).dt.total_seconds() / 86400
    df["days_to_due"] = days.round(1)
    df["team"] = df["tags"].map(lambda t: (t or {}).get("team"))
    status = pd.Series("ok", index=df.index, dtype=object)
    status[days <= due_soon_days] = "due soon"
    status[days <= 0] = "overdue"
    status[df["next_rotation_due"].isna()] = "not scheduled"
    status[~df["state"].isin(["active"])] = "inactive"
    df["rotation_status"] = status
    order = {s: i for i, s in enumerate(ROTATION_STATUSES)}
    df = df.assign(_rank=df["rotation_status"].map(order))
    df = (df.sort_values(["_rank", "days_to_due", "name"], na_position="last")
            .drop(columns="_rank").reset_index(drop=True))
    return normalize(df, categories={"state": STATES,
                                     "rotation_status": ROTATION_STATUSES})


def keys_by_state(status: pd.DataFrame) -> pd.DataFrame:
    """Counts of ``key_status`` rows per state (every known state, zeros included)."""
    import pandas as pd

    counts = status["state"].value_counts()
    states = list(STATES) + sorted(set(counts.index) - set(STATES))
    return normalize(pd.DataFrame({"state": states,
                                   "keys": [int(counts.get(s, 0)) for s in states]}),
                     categories={"state": STATES})


def upcoming(status: pd.DataFrame, *, now: datetime, days: int = 30) -> pd.DataFrame:
    """Rotations and deletions due within ``days`` (overdue rotations included), soonest first."""
    import pandas as pd

    horizon = pd.Timestamp(now) + pd.Timedelta(days=days)
    rot = status[(status["state"] == "active") & status["next_rotation_due"].notna()
                 & (status["next_rotation_due"] <= horizon)]
    dele = status[status["deletion_due"].notna() & (status["deletion_due"] <= horizon)]
    rows = [{"due": r.next_rotation_due, "event": "rotation", "key": r.name, "owner": r.owner,
             "overdue": r.next_rotation_due <= pd.Timestamp(now)} for r in rot.itertuples()]
    rows += [{"due": r.deletion_due, "event": "deletion", "key": r.name, "owner": r.owner,
              "overdue": r.deletion_due <= pd.Timestamp(now)} for r in dele.itertuples()]
    out = pd.DataFrame(rows, columns=["due", "event", "key", "owner", "overdue"])
    out = out.astype({"overdue": bool}).sort_values(["due", "key"]).reset_index(drop=True)
    return normalize(out, times=("due",))


def version_timeline(ledger: KeyLedger, filters: Filters = EVERYTHING, *,
                     now: datetime | None = None) -> pd.DataFrame:
    """One row per key version: key, version, state, start, end (next version, destruction or
    now) and whether it is the current version."""
    cond, args = filters.key_sql("v.key_id")
    sql = f"""
        SELECT k.name AS key, v.version, v.state, v.created_at AS start,
               coalesce(least(v.destroyed_at,
                              lead(v.created_at) OVER (PARTITION BY v.key_id ORDER BY v.version)),
                        ?::TIMESTAMP) AS "end",
               v.version = k.latest_version AS current
        FROM versions v JOIN keys k USING (key_id)
        WHERE {cond} ORDER BY k.name, v.version"""
    return normalize(ledger.query(sql, [_naive(_now(ledger, now)), *args],
                                  label="analytics.version_timeline"),
                     categories={"state": VERSION_STATES})


# -- usage -------------------------------------------------------------------------------------
def ops_per_period(ledger: KeyLedger, filters: Filters = EVERYTHING, *, by: str = "action",
                   top: int = 8, bucket: str | None = None,
                   include_reads: bool = False) -> pd.DataFrame:
    """Audit records per day (or week) and ``by`` group: columns ``period``, ``group``,
    ``count``. The ``top`` groups by volume keep their name, the rest become "other".
    ``bucket`` (day or week) defaults to days for ranges up to 120 days, weeks beyond.
    Reads of the catalog and ledger (list_keys, query, ...: ``READ_ACTIONS``) are left out
    unless ``include_reads``: a dashboard looking at the ledger is not key activity."""
    import pandas as pd

    if by not in GROUPINGS:
        raise InvalidInput(f"by must be one of {', '.join(GROUPINGS)}, not {by!r}")
    if bucket not in (None, "day", "week"):
        raise InvalidInput(f"bucket must be day or week, not {bucket!r}")
    cond, args = _without_reads(*filters.audit_sql(), include_reads)
    column = f"coalesce({by}, '(none)')"
    if bucket is None:
        span = ledger.query(f"SELECT max(time) - min(time) FROM audit_log WHERE {cond}", args,
                            label="analytics.time_span").iloc[0, 0]
        bucket = "week" if pd.notna(span) and span > pd.Timedelta(days=120) else "day"
    sql = f"""
        WITH scoped AS (SELECT time, {column} AS grp FROM audit_log WHERE {cond}),
             ranked AS (SELECT grp, row_number() OVER (ORDER BY count(*) DESC, grp) AS r
                        FROM scoped GROUP BY grp)
        SELECT date_trunc('{bucket}', s.time) AS period,
               CASE WHEN r.r <= ? THEN s.grp ELSE 'other' END AS "group",
               count(*)::BIGINT AS count
        FROM scoped s JOIN ranked r USING (grp)
        GROUP BY ALL ORDER BY period, "group" """
    df = ledger.query(sql, [*args, int(top)], label=f"analytics.ops_per_{bucket}_by_{by}")
    df.attrs.update(bucket=bucket, by=by)
    return df


def version_usage(ledger: KeyLedger, filters: Filters = EVERYTHING) -> pd.DataFrame:
    """Per key version in the time range: encryptions, decryptions, last decrypt, state, and
    whether it is below the key's minimum decryption version (retire-safety)."""
    cond, args = filters.key_sql("v.key_id")
    tcond, targs = filters.time_sql("a.time")
    sql = f"""
        WITH ops AS (
            SELECT key_id, version,
                   count(*) FILTER (action IN ({_marks(ENCRYPT_ACTIONS)}))::BIGINT AS encryptions,
                   count(*) FILTER (action IN ({_marks(DECRYPT_ACTIONS)}))::BIGINT AS decryptions,
                   max(time) FILTER (action IN ({_marks(DECRYPT_ACTIONS)})) AS last_decrypt
            FROM audit_log a WHERE outcome = 'ok' AND version IS NOT NULL AND {tcond}
            GROUP BY ALL)
        SELECT k.name AS key, v.version, v.state, v.version = k.latest_version AS current,
               coalesce(o.encryptions, 0) AS encryptions, coalesce(o.decryptions, 0) AS decryptions,
               o.last_decrypt, v.version < k.min_decryption_version AS below_min_decryption
        FROM versions v JOIN keys k USING (key_id)
        LEFT JOIN ops o ON o.key_id = v.key_id AND o.version = v.version
        WHERE {cond} ORDER BY k.name, v.version"""
    params = [*ENCRYPT_ACTIONS, *DECRYPT_ACTIONS, *DECRYPT_ACTIONS, *targs, *args]
    return normalize(ledger.query(sql, params, label="analytics.version_usage"),
                     categories={"state": VERSION_STATES})


def top_keys(ledger: KeyLedger, filters: Filters = EVERYTHING, *, n: int = 10) -> pd.DataFrame:
    """The ``n`` busiest keys: operations, denied, failed, distinct principals, last used."""
    cond, args = filters.audit_sql()
    sql = f"""
        SELECT key, count(*)::BIGINT AS operations,
               count(*) FILTER (outcome = 'denied')::BIGINT AS denied,
               count(*) FILTER (outcome = 'failed')::BIGINT AS failed,
               count(DISTINCT principal)::BIGINT AS principals, max(time) AS last_used
        FROM audit_log WHERE key IS NOT NULL AND {cond}
        GROUP BY key ORDER BY operations DESC, key LIMIT ?"""
    return ledger.query(sql, [*args, int(n)], label="analytics.top_keys")


def unusual_activity(ledger: KeyLedger, filters: Filters = EVERYTHING, *,
                     now: datetime | None = None, days: int = 7,
                     spike_factor: float = 3.0) -> pd.DataFrame:
    """What changed in the last ``days``: a principal using a key for the first time, and a
    key whose daily operations jumped above ``spike_factor`` x its 28-day median."""
    now = _now(ledger, now)
    start = _naive(now - timedelta(days=days))
    base = _naive(now - timedelta(days=days + 28))
    cond, args = filters.key_sql()
    sql = f"""
        WITH scoped AS (SELECT time, key, principal FROM audit_log
                        WHERE key IS NOT NULL AND outcome = 'ok' AND {cond}
                          AND action IN ({_marks(CRYPTO_ACTIONS)})),
        firsts AS (SELECT key, principal, min(time) AS first_time, count(*) AS n
                   FROM scoped GROUP BY ALL),
        newcomers AS (
            SELECT 'new principal' AS kind, key, principal, first_time AS time, n::BIGINT AS count,
                   NULL::DOUBLE AS baseline
            FROM firsts
            WHERE first_time >= $start
              AND key IN (SELECT key FROM scoped WHERE time < $start)),
        daily AS (SELECT key, date_trunc('day', time) AS day, count(*) AS n FROM scoped
                  WHERE time >= $base GROUP BY ALL),
        baseline AS (SELECT key, median(n) AS med FROM daily WHERE day < $start GROUP BY key),
        spikes AS (
            SELECT 'spike' AS kind, d.key, NULL AS principal, d.day AS time, d.n::BIGINT AS count,
                   b.med AS baseline
            FROM daily d JOIN baseline b USING (key)
            WHERE d.day >= $start AND d.n > $factor * b.med AND d.n >= 10)
        SELECT * FROM newcomers UNION ALL SELECT * FROM spikes ORDER BY time DESC, key"""
    named = {"start": start, "base": base, "factor": float(spike_factor)}
    return ledger.query(_positional(sql, named), [*args, *CRYPTO_ACTIONS, *_named_args(sql, named)],
                        label="analytics.unusual_activity")


def _without_reads(cond: str, args: list[Any], include_reads: bool) -> tuple[str, list[Any]]:
    if include_reads:
        return cond, args
    return f"{cond} AND action NOT IN ({_marks(READ_ACTIONS)})", [*args, *sorted(READ_ACTIONS)]


def _positional(sql: str, named: dict[str, Any]) -> str:
    for name in named:
        sql = sql.replace(f"${name}", "?")
    return sql


def _named_args(sql: str, named: dict[str, Any]) -> list[Any]:
    """Values for the ``$name`` placeholders of ``sql`` in order of appearance."""
    import re

    return [named[m] for m in re.findall(r"\$(\w+)", sql) if m in named]


# -- audit -----------------------------------------------------------------------------------
def audit_count(ledger: KeyLedger, filters: Filters = EVERYTHING, *, principal: str | None = None,
                action: str | None = None, outcome: str | None = None,
                max_seq: int | None = None, include_reads: bool = True) -> int:
    """How many audit records match (for paging without loading them); see ``audit_window``."""
    return audit_window(ledger, filters, principal=principal, action=action, outcome=outcome,
                        max_seq=max_seq, include_reads=include_reads)[0]


def audit_window(ledger: KeyLedger, filters: Filters = EVERYTHING, *,
                 principal: str | None = None, action: str | None = None,
                 outcome: str | None = None, max_seq: int | None = None,
                 include_reads: bool = True) -> tuple[int, int | None]:
    """(matching records, the highest ``seq`` among them), at or below ``max_seq``: one query
    that both counts a view and pins it for paging, so records added while paging do not shift
    pages; ``include_reads=False`` leaves out reads of the catalog and ledger (``READ_ACTIONS``)."""
    import pandas as pd

    cond, args = _audit_where(filters, principal, action, outcome, max_seq, include_reads)
    df = ledger.query(f"SELECT count(*) AS n, max(seq) AS top FROM audit_log WHERE {cond}", args,
                      label="analytics.audit_window")
    top = df.iloc[0]["top"]
    return int(df.iloc[0]["n"]), (None if pd.isna(top) else int(top))


def audit_page(ledger: KeyLedger, filters: Filters = EVERYTHING, *, principal: str | None = None,
               action: str | None = None, outcome: str | None = None, offset: int = 0,
               limit: int = 50, newest_first: bool = True, max_seq: int | None = None,
               include_reads: bool = True) -> pd.DataFrame:
    """One page of audit records matching the filters (newest first by default)."""
    if not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise InvalidInput("limit must be between 1 and 10000")
    if not isinstance(offset, int) or offset < 0:
        raise InvalidInput("offset must be a whole number >= 0")
    cond, args = _audit_where(filters, principal, action, outcome, max_seq, include_reads)
    order = "DESC" if newest_first else "ASC"
    sql = (f"SELECT seq, time, principal, action, key, version, outcome, error, detail "
           f"FROM audit_log WHERE {cond} ORDER BY time {order}, seq {order} "
           f"LIMIT {limit} OFFSET {offset}")
    return ledger.query(sql, args, label="analytics.audit_page")


def _audit_where(filters: Filters, principal: str | None, action: str | None,
                 outcome: str | None, max_seq: int | None,
                 include_reads: bool = True) -> tuple[str, list[Any]]:
    cond, args = _without_reads(*filters.audit_sql(), include_reads)
    for column, value in (("principal", principal), ("action", action), ("outcome", outcome)):
        if value:
            cond += f" AND {column} = ?"
            args.append(value)
    if max_seq is not None:
        cond += " AND seq <= ?"
        args.append(int(max_seq))
    return cond, args


def audit_facets(ledger: KeyLedger) -> dict[str, list[str]]:
    """Distinct principals, actions and outcomes in the ledger (for filter menus)."""
    df = ledger.query("""SELECT 'principal' AS facet, principal AS value FROM audit_log
                         GROUP BY principal
                         UNION ALL SELECT 'action', action FROM audit_log GROUP BY action
                         UNION ALL SELECT 'outcome', outcome FROM audit_log GROUP BY outcome
                         ORDER BY facet, value""", label="analytics.audit_facets")
    return {f: sorted(g["value"].dropna()) for f, g in df.groupby("facet")} | {
        f: [] for f in ("principal", "action", "outcome") if f not in set(df["facet"])}


def last_verification(ledger: KeyLedger) -> dict[str, Any] | None:
    """The newest stored ``verify_audit`` result: time, ok, records, first_bad_seq, problem."""
    df = ledger.query("SELECT * FROM verifications ORDER BY time DESC, records DESC LIMIT 1",
                      label="analytics.last_verification")
    return None if df.empty else df.iloc[0].to_dict()


# -- compliance ------------------------------------------------------------------------------
SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")


def compliance_matrix(findings: pd.DataFrame) -> pd.DataFrame:
    """Findings counted per framework x severity, with every cell present (zeros included)."""
    import pandas as pd

    frameworks = sorted(findings["framework"].dropna().unique()) if len(findings) else []
    grid = pd.MultiIndex.from_product([frameworks, SEVERITY_ORDER],
                                      names=["framework", "severity"])
    counts = findings.groupby(["framework", "severity"]).size() if len(findings) else None
    out = (counts.reindex(grid, fill_value=0) if counts is not None
           else pd.Series(0, index=grid, dtype=int))
    return normalize(out.rename("findings").reset_index(),
                     categories={"severity": SEVERITY_ORDER})


# -- overview --------------------------------------------------------------------------------
def activity_24h(ledger: KeyLedger, filters: Filters = EVERYTHING, *,
                 now: datetime | None = None, include_reads: bool = False) -> dict[str, int]:
    """Operations, denied and failed calls in the last 24 h and in the 24 h before (reads
    left out unless ``include_reads``, as in ``ops_per_period``)."""
    sql, args = activity_24h_sql(filters, _now(ledger, now), include_reads)
    df = ledger.query(sql, args, label="analytics.activity_24h")
    return {k: int(v) for k, v in df.iloc[0].items()}


def activity_24h_sql(filters: Filters, now: datetime,
                     include_reads: bool = False) -> tuple[str, list[Any]]:
    """The one-row query of ``activity_24h`` (ops, ops_before, denied, failed), for callers
    that combine it with other aggregates in one query."""
    cond, args = _without_reads(*filters.key_sql(), include_reads)
    sql = f"""SELECT count(*) FILTER (time >= ?)::BIGINT AS ops,
                     count(*) FILTER (time < ?)::BIGINT AS ops_before,
                     count(*) FILTER (time >= ? AND outcome = 'denied')::BIGINT AS denied,
                     count(*) FILTER (time >= ? AND outcome = 'failed')::BIGINT AS failed
              FROM audit_log WHERE time >= ? AND time < ? AND {cond}"""
    day, two = _naive(now - timedelta(days=1)), _naive(now - timedelta(days=2))
    return sql, [day, day, day, day, two, _naive(now), *args]


def data_version(home: str | os.PathLike) -> tuple:
    """A cheap token that changes when anything in the home changes (catalog, journals,
    store). Reads file metadata only, so a dashboard may poll it every second."""
    root = Path(home)
    parts: list[tuple] = []
    for path in (root / "catalog.json", root / "keyledger.duckdb", root / "keyledger.duckdb.wal"):
        try:
            st = path.stat()
            parts.append((path.name, st.st_mtime_ns, st.st_size))
        except OSError:
            parts.append((path.name, None, None))
    journal = root / "journal"
    if journal.is_dir():
        for entry in sorted(os.scandir(journal), key=lambda e: e.name):
            st = entry.stat()
            parts.append((entry.name, st.st_mtime_ns, st.st_size))
    return tuple(parts)


__all__ = [
    "CRYPTO_ACTIONS", "DECRYPT_ACTIONS", "ENCRYPT_ACTIONS", "EVERYTHING", "GROUPINGS",
    "ROTATION_STATUSES", "SEVERITY_ORDER", "STATES", "Filters", "activity_24h", "audit_count",
    "audit_facets", "audit_page", "audit_window", "compliance_matrix",
    "data_version", "key_status", "key_status_of", "keys_by_state", "last_verification",
    "ops_per_period", "top_keys", "unusual_activity", "upcoming", "version_timeline", "version_usage",
]
