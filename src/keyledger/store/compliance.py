"""Evaluate compliance rules over the store, keep the history of findings, and list them.

The compliance tables (runs, findings, run counts, exceptions) are made by a migration
(schema.py). Works on any DuckDB connection (or keyledger ``Tx``) holding the keyledger schema, inside the
caller's transaction: ``evaluate`` runs every selected rule's SQL (set-based; no per-key Python
loops over the ledger), stores the run, opens/updates/resolves finding episodes, and returns the
findings. The benchmark (bench/compliance.py) calls it on a raw connection.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import duckdb

from ..errors import ConfigError, KeyLedgerError, StoreError
from ..model import SEVERITIES, SPECS, Purpose, configured_usage_limit, resolve_rotation_period
from .sql import referenced_parameters, without_final_semicolon

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    # rules as data, parsed above the store: only their attributes are used here
    from ..compliance.rules import Rule, RuleSet


BACKUPS_DDL = ("CREATE TABLE IF NOT EXISTS backups (time TIMESTAMP, kind VARCHAR, path VARCHAR, "
               "sha256 VARCHAR, bytes BIGINT, principal VARCHAR, ok BOOLEAN, detail VARCHAR)")

# Tables created on first use: only the backups table (backup.py makes it too); the compliance
# tables are in the migrations (schema.py).
DDL = (BACKUPS_DDL,)

# SQL helpers every rule may use (documented in docs/compliance.md).
MACROS = (
    # the value of tag `name` (NULL when absent)
    """CREATE OR REPLACE TEMP MACRO kl_tag(tags, name) AS
        json_extract_string(tags, '$."' || replace(name, '"', '') || '"')""",
    # a key is tagged `marker`: a tag of that name whose value is not false/no/0/empty,
    # or any tag whose value is `marker` (e.g. {"data": "phi"})
    """CREATE OR REPLACE TEMP MACRO kl_tagged(tags, marker) AS
        (coalesce(lower(kl_tag(tags, marker)), 'false') NOT IN ('false', 'no', '0', '')
         OR list_contains(json_extract_string(tags, '$.*'), marker))""",
)

FINDING_COLUMNS = ["rule_id", "framework", "control", "severity", "title", "key", "version",
                   "principal", "evidence", "remediation", "first_seen", "status"]
_REQUIRED_OUTPUT = ("key", "version", "principal", "evidence")


def _severity_rank(column: str) -> str:
    """SQL ranking severities critical (0) .. info (4), for ORDER BY."""
    whens = " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(SEVERITIES))
    return f"CASE {column} {whens} END"


@dataclass
class Evaluation:
    """One stored evaluation: its findings and what the engine measured."""

    run_id: int
    time: datetime
    frameworks: list[str]
    rules: list[Rule]
    findings: pd.DataFrame  # every current finding, accepted ones with status "accepted"
    opened: int = 0
    resolved: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def visible(self) -> pd.DataFrame:
        df = self.findings[self.findings["status"] != "accepted"]
        return df.reset_index(drop=True)


def naive(dt: datetime) -> datetime:
    """UTC without tzinfo, as the store's TIMESTAMP columns hold it."""
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def ensure_tables(con: Any) -> None:
    """Make the tables a store may lack (older than its backups table)."""
    for ddl in DDL:
        con.execute(ddl)


def key_policy_table(con: Any) -> pa.Table:
    """Per key: effective rotation period and its source, configured usage limit, auto_rotate.

    Computed with the same function the service uses (catalog-sized, not ledger-sized).
    """
    import pyarrow as pa

    rows = con.execute("SELECT key_id, spec, purpose, tags, rotation_period_s, policy, rotated_at "
                       "FROM keys").fetchall()
    meta = con.execute("SELECT value FROM meta WHERE name = 'home_policy'").fetchall()
    home_policy = json.loads(meta[0][0]) if meta else {}
    cols: dict[str, list] = {c: [] for c in ("key_id", "rotation_period_s", "rotation_source",
                                             "due_at", "usage_limit", "usage_limit_source",
                                             "auto_rotate")}
    for key_id, spec_name, purpose_name, tags_json, explicit, policy_json, rotated_at in rows:
        tags = _json_obj(tags_json)
        policy = _json_obj(policy_json)
        try:
            purpose = Purpose(purpose_name)
            spec = SPECS[spec_name]
            period, source = resolve_rotation_period(explicit, spec, purpose, tags, home_policy)
        except (KeyError, ValueError):  # unknown spec or purpose: the defaults by purpose
            if explicit is not None:
                period, source = timedelta(seconds=explicit), "key"
            else:
                days = 365 if purpose_name == "sign" else 90
                period, source = timedelta(days=days), "default"
        limit, limit_source = configured_usage_limit(policy, home_policy)  # invalid: ignored
        cols["key_id"].append(key_id)
        cols["rotation_period_s"].append(int(period.total_seconds()))
        cols["rotation_source"].append(source)
        cols["due_at"].append(rotated_at + period if rotated_at is not None else None)
        cols["usage_limit"].append(limit)
        cols["usage_limit_source"].append(limit_source)
        cols["auto_rotate"].append(bool(policy.get("auto_rotate", True)))
    return pa.table({
        "key_id": pa.array(cols["key_id"], pa.string()),
        "rotation_period_s": pa.array(cols["rotation_period_s"], pa.int64()),
        "rotation_source": pa.array(cols["rotation_source"], pa.string()),
        "due_at": pa.array(cols["due_at"], pa.timestamp("us")),
        "usage_limit": pa.array(cols["usage_limit"], pa.int64()),
        "usage_limit_source": pa.array(cols["usage_limit_source"], pa.string()),
        "auto_rotate": pa.array(cols["auto_rotate"], pa.bool_()),
    })


def _json_obj(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def rules_table(rules: list[Rule]) -> pa.Table:
    import pyarrow as pa

    return pa.table({
        "rule_id": [r.id for r in rules], "framework": [r.framework for r in rules],
        "control": [r.control for r in rules], "severity": [r.severity for r in rules],
        "title": [r.title for r in rules], "remediation": [r.remediation for r in rules],
        "rank": pa.array([r.rank for r in rules], pa.int32()),
    })


# rule SQL whose output columns this process has checked -> its text as a subquery
_CHECKED_SQL: dict[str, str] = {}

# one rule's findings into kl_current, in one statement (each DuckDB statement costs a few ms
# of CPU even over a handful of rows; a temp table per rule cost three more); the rule id is
# a literal, as ids are letters, digits and . _ - (rules.py), so no name can clash with the
# rule's own parameters
_INSERT_FINDINGS = """INSERT INTO kl_current (rule_id, key, version, principal, evidence)
    SELECT '{rule_id}', key, version, principal,
           CASE WHEN count(*) = 1 THEN any_value(evidence)
                ELSE CAST(to_json(list(CAST(evidence AS JSON))) AS VARCHAR) END
    FROM (SELECT CAST(key AS VARCHAR) AS key, CAST(version AS BIGINT) AS version,
                 CAST(principal AS VARCHAR) AS principal,
                 CAST(CAST(evidence AS JSON) AS VARCHAR) AS evidence
          FROM ({sql}
          ) kl_out)
    GROUP BY ALL"""


def _run_rule(con: Any, rule: Rule, now: datetime) -> None:
    """Add one rule's findings to kl_current (rule_id, key, version, principal, evidence)."""
    params = {**rule.bound_parameters()}
    if "now" in _refs(rule):
        params["now"] = now
    try:
        sql = _CHECKED_SQL.get(rule.sql)
        if sql is None:
            sql = without_final_semicolon(rule.sql)
            _check_output(con, rule, sql, params)
            _CHECKED_SQL[rule.sql] = sql
        con.execute(_INSERT_FINDINGS.format(rule_id=rule.id, sql=sql), params or None)
    except (duckdb.Error, StoreError) as exc:
        msg = str(exc).splitlines()[0][:400]
        raise ConfigError(f"rule file {rule.source}, rule {rule.id!r} failed: {msg}") from None


def _check_output(con: Any, rule: Rule, sql: str, params: dict[str, Any]) -> None:
    """A rule returns key, version, principal and evidence: say so plainly when one is missing
    (DuckDB would only name the first column it cannot find)."""
    columns = set(con.execute(f"SELECT * FROM ({sql}\n) kl_out LIMIT 0", params or None).columns())
    missing = [c for c in _REQUIRED_OUTPUT if c not in columns]
    if missing:
        raise ConfigError(f"rule file {rule.source}, rule {rule.id!r}: its sql returns no "
                          f"column(s) {', '.join(missing)}; a rule returns key, version, "
                          "principal and evidence")


def _refs(rule: Rule) -> list[str]:
    return referenced_parameters(rule.sql)


def evaluate(con: Any, ruleset: RuleSet, *, now: datetime, frameworks: object = None,
             principal: str | None = None) -> Evaluation:
    """Run the selected frameworks' rules at ``now`` and store the run (caller's transaction)."""
    started = time.perf_counter()
    now = naive(now)
    names = ruleset.resolve_frameworks(frameworks)
    rules = ruleset.select(names)
    ensure_tables(con)
    for macro in MACROS:
        con.execute(macro)
    policy = key_policy_table(con)
    con.register("kl_key_policy", policy)
    con.register("kl_rules", rules_table(rules))
    timings: dict[str, float] = {"prepare": time.perf_counter() - started}
    try:
        con.execute("DROP TABLE IF EXISTS kl_current")
        con.execute("CREATE TEMP TABLE kl_current (rule_id VARCHAR, key VARCHAR, version BIGINT, "
                    "principal VARCHAR, evidence VARCHAR)")
        done: dict[tuple[str, str], str] = {}  # (sql, params) -> rule id already evaluated
        for rule in rules:
            t0 = time.perf_counter()
            signature = (rule.sql, json.dumps(rule.bound_parameters(), sort_keys=True))
            if signature in done:  # a check_from rule: same check, same parameters
                con.execute("INSERT INTO kl_current (rule_id, key, version, principal, evidence) "
                            "SELECT $new, key, version, principal, evidence"
                            " FROM kl_current WHERE rule_id = $old",
                            {"new": rule.id, "old": done[signature]})
            else:
                _run_rule(con, rule, now)
                done[signature] = rule.id
            timings[rule.id] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_id, opened, resolved = _record(con, rules, names, now, principal, frameworks is None)
        findings = _findings(con, run_id, now)
        timings["history"] = time.perf_counter() - t0
        seconds = time.perf_counter() - started
        con.execute("UPDATE compliance_runs SET seconds = $s, timings = $t WHERE run_id = $r",
                    {"s": seconds, "t": json.dumps({k: round(v, 4) for k, v in timings.items()}),
                     "r": run_id})
    finally:
        for name in ("kl_key_policy", "kl_rules"):
            try:
                con.unregister(name)
            except (duckdb.Error, KeyLedgerError):
                pass
    return Evaluation(run_id, now, names, rules, findings, opened, resolved, seconds, timings)


def _record(con: Any, rules: list[Rule], frameworks: list[str], now: datetime,
            principal: str | None, everything: bool) -> tuple[int, int, int]:
    """Store the run; open, update and resolve finding episodes; per-run counts for trends."""
    run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM compliance_runs").fetchall()[0][0]
    p = {"now": now, "run": run_id}
    con.execute(
        """CREATE OR REPLACE TEMP TABLE kl_cur AS
           SELECT c.*, r.framework, r.control, r.severity, r.title,
                  md5(concat_ws('|', c.rule_id, coalesce(c.key, ''),
                                coalesce(CAST(c.version AS VARCHAR), ''),
                                coalesce(c.principal, ''))) AS fingerprint,
                  EXISTS (SELECT 1 FROM compliance_exceptions x
                          WHERE x.rule_id = c.rule_id AND coalesce(x.key, '') = coalesce(c.key, '')
                            AND x.accepted_at <= $now AND x.until > $now) AS accepted
           FROM kl_current c JOIN kl_rules r USING (rule_id)""", {"now": now})
    # still present: refresh the open episode
    con.execute(
        """UPDATE compliance_findings f SET last_seen = $now, last_run = $run,
               evidence = c.evidence, severity = c.severity, title = c.title, control = c.control
           FROM kl_cur c WHERE f.fingerprint = c.fingerprint AND f.resolved_at IS NULL""", p)
    opened = con.execute(
        """INSERT INTO compliance_findings (fingerprint, rule_id, framework, control, severity,
               title, key, version, principal, evidence, first_seen, last_seen, resolved_at,
               first_run, last_run, resolved_run)
           SELECT fingerprint, rule_id, framework, control, severity, title, key, version,
                  principal, evidence, $now, $now, NULL, $run, $run, NULL FROM kl_cur c
           WHERE NOT EXISTS (SELECT 1 FROM compliance_findings f
                             WHERE f.fingerprint = c.fingerprint AND f.resolved_at IS NULL)""",
        p).fetchall()[0][0]
    # gone: resolve (only for what this run evaluated; everything when all frameworks ran)
    scope = "TRUE" if everything else "list_contains($fws, f.framework)"
    args = {**p, "fws": frameworks} if not everything else p
    resolved = con.execute(
        f"""UPDATE compliance_findings f SET resolved_at = $now, resolved_run = $run
            WHERE f.resolved_at IS NULL AND f.first_run < $run AND {scope}
              AND f.fingerprint NOT IN (SELECT fingerprint FROM kl_cur)""", args).fetchall()[0][0]
    counts = con.execute(
        "SELECT count(*) FILTER (NOT accepted), count(*) FILTER (accepted) FROM kl_cur"
    ).fetchall()[0]
    keys = con.execute("SELECT count(*) FROM keys").fetchall()[0][0]
    con.execute("INSERT INTO compliance_runs (run_id, time, principal, frameworks, rules, "
                "findings, accepted, opened, resolved, keys, seconds, timings) VALUES ($run, $now, "
                "$who, $fws, $rules, $findings, $accepted, $opened, $resolved, $keys, NULL, NULL)",
                {**p, "who": principal, "fws": json.dumps(frameworks), "rules": len(rules),
                 "findings": counts[0], "accepted": counts[1], "opened": opened,
                 "resolved": resolved, "keys": keys})
    con.execute(
        """INSERT INTO compliance_run_counts (run_id, framework, severity, open, opened,
               resolved, accepted, mean_open_days, max_open_days)
           WITH cur AS (
               SELECT c.framework, c.severity, c.accepted, f.first_run,
                      date_diff('second', f.first_seen, $now) / 86400.0 AS open_days
               FROM kl_cur c JOIN compliance_findings f
                 ON f.fingerprint = c.fingerprint AND f.resolved_at IS NULL),
           res AS (SELECT framework, severity, count(*) AS n FROM compliance_findings
                   WHERE resolved_run = $run GROUP BY ALL),
           grid AS (SELECT f.framework, s.severity FROM (SELECT unnest($fws) AS framework) f,
                           (SELECT unnest($sevs) AS severity) s)
           SELECT $run, g.framework, g.severity,
                  count(cur.framework) FILTER (NOT cur.accepted),
                  count(cur.framework) FILTER (NOT cur.accepted AND cur.first_run = $run),
                  coalesce(any_value(res.n), 0),
                  count(cur.framework) FILTER (cur.accepted),
                  avg(cur.open_days) FILTER (NOT cur.accepted),
                  max(cur.open_days) FILTER (NOT cur.accepted)
           FROM grid g
           LEFT JOIN cur USING (framework, severity)
           LEFT JOIN res USING (framework, severity)
           GROUP BY g.framework, g.severity""",
        {**p, "fws": frameworks, "sevs": list(SEVERITIES)})
    return int(run_id), int(opened), int(resolved)


def _findings(con: Any, run_id: int, now: datetime) -> pd.DataFrame:
    df = con.execute(
        f"""SELECT c.rule_id, c.framework, c.control, c.severity, c.title, c.key, c.version,
                   c.principal, c.evidence, r.remediation, f.first_seen,
                   CASE WHEN c.accepted THEN 'accepted'
                        WHEN f.first_run = $run THEN 'new' ELSE 'open' END AS status
            FROM kl_cur c JOIN kl_rules r USING (rule_id)
            JOIN compliance_findings f ON f.fingerprint = c.fingerprint AND f.resolved_at IS NULL
            ORDER BY {_severity_rank('c.severity')}, c.framework, c.rule_id,
                     c.key NULLS FIRST, c.version NULLS FIRST, c.principal NULLS FIRST""",
        {"run": run_id}).df()
    return tidy_findings(df)


def tidy_findings(df: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    df = df.reindex(columns=FINDING_COLUMNS)
    df["version"] = df["version"].astype("Int64")
    df["first_seen"] = pd.to_datetime(df["first_seen"]).dt.tz_localize("UTC")
    for col in ("key", "principal"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df.reset_index(drop=True)


def stored_findings(con: Any, rules: pa.Table, now: datetime,
                    frameworks: list[str] | None = None) -> pd.DataFrame:
    """Open finding episodes of the stored evaluations, newest run's view, no re-evaluation."""
    import pandas as pd

    ensure_tables(con)
    con.register("kl_rule_text", rules)
    where = "AND list_contains($fws, f.framework)" if frameworks is not None else ""
    df = con.execute(
        f"""SELECT f.rule_id, f.framework, f.control, f.severity, f.title, f.key, f.version,
                   f.principal, f.evidence, r.remediation, f.first_seen,
                   CASE WHEN EXISTS (SELECT 1 FROM compliance_exceptions x
                                     WHERE x.rule_id = f.rule_id
                                       AND coalesce(x.key, '') = coalesce(f.key, '')
                                       AND x.accepted_at <= $now AND x.until > $now)
                        THEN 'accepted'
                        WHEN f.first_run = (SELECT max(run_id) FROM compliance_runs) THEN 'new'
                        ELSE 'open' END AS status,
                   f.last_seen
            FROM compliance_findings f LEFT JOIN kl_rule_text r USING (rule_id)
            WHERE f.resolved_at IS NULL {where}
            ORDER BY {_severity_rank('f.severity')}, f.framework, f.rule_id,
                     f.key NULLS FIRST, f.version NULLS FIRST, f.principal NULLS FIRST""",
        {"now": naive(now), **({"fws": frameworks} if frameworks is not None else {})}).df()
    con.unregister("kl_rule_text")
    last_seen = pd.to_datetime(df["last_seen"]).dt.tz_localize("UTC")
    out = tidy_findings(df)
    out["last_seen"] = last_seen
    return out


def trend(con: Any, frameworks: list[str] | None = None) -> pd.DataFrame:
    """Per run, framework and severity: open, opened, resolved, accepted and open days."""
    import pandas as pd

    ensure_tables(con)
    where, args = "", {}
    if frameworks is not None:
        where, args = "WHERE list_contains($fws, c.framework)", {"fws": frameworks}
    df = con.execute(
        f"""SELECT c.run_id, r.time, c.framework, c.severity, c.open, c.opened, c.resolved,
                   c.accepted, c.mean_open_days, c.max_open_days
            FROM compliance_run_counts c JOIN compliance_runs r USING (run_id) {where}
            ORDER BY c.run_id, c.framework, {_severity_rank('c.severity')}""",
        args or None).df()
    df["time"] = pd.to_datetime(df["time"]).dt.tz_localize("UTC")
    return df


def add_exception(con: Any, *, exception_id: str, rule_id: str, framework: str,
                  key: str | None, reason: str, accepted_by: str, accepted_at: datetime,
                  until: datetime) -> None:
    """Record an accepted finding (``accept_finding``)."""
    con.execute("INSERT INTO compliance_exceptions (exception_id, rule_id, framework, key, "
                "reason, accepted_by, accepted_at, until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [exception_id, rule_id, framework, key, reason, accepted_by, naive(accepted_at),
                 naive(until)])


def exceptions(con: Any, now: datetime) -> pd.DataFrame:
    """Every recorded exception with whether it is active at ``now``."""
    import pandas as pd

    ensure_tables(con)
    df = con.execute(
        """SELECT exception_id, rule_id, framework, key, reason, accepted_by, accepted_at, until,
                  accepted_at <= $now AND until > $now AS active
           FROM compliance_exceptions ORDER BY accepted_at, exception_id""",
        {"now": naive(now)}).df()
    for col in ("accepted_at", "until"):
        df[col] = pd.to_datetime(df[col]).dt.tz_localize("UTC")
    return df


@dataclass
class ReportFacts:
    """What a compliance report states about the home besides the findings."""

    scope: dict[str, Any]  # keys, keys_by_state, versions, principals, audit, backups
    trend: pd.DataFrame  # the last 12 runs: run_id, time, open, opened, resolved, accepted
    home_id: str | None
    home_mode: str | None


def _scalar(con: Any, sql: str, params: Any = None) -> Any:
    rows = con.execute(sql, params).fetchall() if params is not None else \
        con.execute(sql).fetchall()
    return rows[0][0] if rows else None


def report_facts(con: Any, now: datetime) -> ReportFacts:
    """The store's facts as of ``now`` (naive UTC) for a report, in the caller's transaction."""
    ensure_tables(con)
    states = con.execute("SELECT state, count(*) FROM keys GROUP BY state ORDER BY 2 DESC, 1"
                         ).fetchall()
    audit = con.execute("SELECT count(*), min(time), max(time) FROM audit_log WHERE time <= ?",
                        [now]).fetchall()[0]
    verification = con.execute("SELECT time, ok, problem FROM verifications WHERE time <= ? "
                               "ORDER BY time DESC LIMIT 1", [now]).fetchall()
    backup = _scalar(con, "SELECT max(time) FROM backups WHERE kind = 'backup' AND ok "
                          "AND time <= ?", [now])
    restore = _scalar(con, "SELECT max(time) FROM backups WHERE kind = 'restore_test' AND ok "
                           "AND time <= ?", [now])
    scope = {
        "keys": sum(n for _, n in states), "keys_by_state": dict(states),
        "versions": _scalar(con, "SELECT count(*) FROM versions"),
        "principals": _scalar(con, "SELECT count(DISTINCT principal) FROM grants"),
        "audit_records": audit[0], "audit_first": audit[1], "audit_last": audit[2],
        "verification": verification[0] if verification else None,
        "last_backup": backup, "last_restore_test": restore,
    }
    trend = con.execute(
        """SELECT r.run_id, r.time, sum(c.open) AS open, sum(c.opened) AS opened,
                  sum(c.resolved) AS resolved, sum(c.accepted) AS accepted
           FROM compliance_runs r JOIN compliance_run_counts c USING (run_id)
           GROUP BY ALL ORDER BY r.run_id DESC LIMIT 12""").df().iloc[::-1]
    return ReportFacts(scope, trend,
                       _scalar(con, "SELECT value FROM meta WHERE name = 'home_id'"),
                       _scalar(con, "SELECT value FROM meta WHERE name = 'home_mode'"))


__all__ = ["DDL", "FINDING_COLUMNS", "SEVERITIES", "Evaluation", "ReportFacts", "add_exception",
           "ensure_tables", "evaluate", "exceptions", "key_policy_table", "report_facts",
           "rules_table", "stored_findings", "trend"]
