"""Reads of the audit ledger for callers (records, seal state, exports) and the record of
each verification; ingest, checkpoints and verification themselves are in ingest.py,
checkpoints.py, seals.py and verify.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .db import Tx

if TYPE_CHECKING:
    import pandas as pd

# proven: covered by a journal seal made in the HSM (docs/audit.md "Seals")
_RECORDS = ("SELECT seq, time, principal, action, key, version, outcome, error, detail, "
            "context, key_id, pid, journal, jseq, "
            "jseq <= coalesce(o.seal_jseq, 0) AS proven "
            "FROM audit_log LEFT JOIN journal_offsets o USING (journal)")
_EXPORT = ("SELECT seq, time, principal, action, key, key_id, version, outcome, error, "
           "detail, context, pid, journal, jseq, prev, hash, "
           "strftime(time, '%Y-%m-%d') AS day FROM audit_log ORDER BY seq")


def records(tx: Tx, *, key: str | None, key_digest: str | None, principal: str | None,
            action: str | None, outcome: str | None, since: datetime | None,
            until: datetime | None, limit: int | None, offset: int,
            newest_first: bool) -> pd.DataFrame:
    """Audit records matching the filters (``key`` also matches its digest ``key_digest``)."""
    where: list[str] = []
    args: list[object] = []
    if key is not None:
        where.append("key IN (?, ?)")
        args += [key, key_digest]
    for col, value in (("principal", principal), ("action", action), ("outcome", outcome)):
        if value is not None:
            where.append(f"{col} = ?")
            args.append(value)
    if since is not None:
        where.append("time >= ?")
        args.append(since)
    if until is not None:
        where.append("time < ?")
        args.append(until)
    return tx.execute(_page_sql(" AND ".join(where) or "TRUE", limit, offset, newest_first),
                      args).df()


def _page_sql(cond: str, limit: int | None, offset: int, newest_first: bool) -> str:
    """The records matching ``cond``: the newest ``limit`` after skipping ``offset``, picked
    by ``seq`` alone in a top-N subquery (so DuckDB reads the wide columns of the page only:
    5x faster than sorting whole rows), newest or oldest first."""
    if limit is not None or offset:
        page = f"SELECT seq FROM audit_log WHERE {cond} ORDER BY time DESC, seq DESC"
        if limit is not None:
            page += f" LIMIT {int(limit)}"
        if offset:
            page += f" OFFSET {int(offset)}"
        cond = f"seq IN ({page})"
    order = " DESC" if newest_first else ""
    return f"{_RECORDS} WHERE {cond} ORDER BY time{order}, seq{order}"


def export(tx: Tx, path: Path, format: str) -> None:
    """Write every record to ``path``: a JSONL file, or Parquet partitioned by day."""
    target = str(path.absolute()).replace("'", "''")
    if format == "jsonl":
        tx.execute(f"COPY ({_EXPORT}) TO '{target}' (FORMAT json)")
    else:
        tx.execute(f"COPY ({_EXPORT}) TO '{target}' "
                   "(FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE true)")


def record_verification(tx: Tx, *, time: datetime, ok: bool, records: int,
                        first_bad_seq: int | None, problem: str | None) -> None:
    tx.execute("INSERT INTO verifications (time, ok, records, first_bad_seq, problem) "
               "VALUES (?, ?, ?, ?, ?)", [time, ok, records, first_bad_seq, problem])


def seal_state(tx: Tx, journal: str) -> tuple[int, int] | None:
    """(sealed through jseq, tip jseq) of a journal, or None if the ledger never saw it."""
    row = tx.execute("SELECT coalesce(seal_jseq, 0), tip_jseq FROM journal_offsets "
                     "WHERE journal = ?", [journal]).fetchone()
    return (int(row[0]), int(row[1])) if row else None


def unsealed(tx: Tx) -> list[tuple[str, int, int]]:
    """(journal, tip jseq, sealed through jseq) of journals with records past their seal."""
    return tx.execute("SELECT journal, tip_jseq, coalesce(seal_jseq, 0) FROM journal_offsets "
                      "WHERE tip_jseq > coalesce(seal_jseq, 0)").fetchall()


def never_sealed(tx: Tx) -> list[tuple[str, int, str]]:
    """(journal, tip jseq, tip hash) of journals ingested before seals existed."""
    return tx.execute("SELECT journal, tip_jseq, tip_hash FROM journal_offsets "
                      "WHERE seal_jseq IS NULL").fetchall()


def set_seal(tx: Tx, journal: str, jseq: int, tip: str, mac: str) -> None:
    tx.execute("UPDATE journal_offsets SET seal_jseq = ?, seal_hash = ?, seal_mac = ? "
               "WHERE journal = ?", [jseq, tip, mac, journal])


def has_checkpoints(tx: Tx) -> bool:
    return bool(tx.execute("SELECT count(*) > 0 FROM checkpoints").one()[0])


def encryptions(tx: Tx, actions: Sequence[str], key_id: str | None = None,
                version: int | None = None) -> dict[tuple[str, int], int]:
    """Counted uses per (key id, version) among ``actions`` (optionally of one version)."""
    marks = ", ".join("?" for _ in actions)
    sql = f"SELECT key_id, version, sum(count) FROM usage WHERE action IN ({marks})"
    args: list[object] = list(actions)
    if key_id is not None:
        sql += " AND key_id = ? AND version = ?"
        args += [key_id, version]
    rows = tx.execute(sql + " GROUP BY ALL", args).fetchall()
    return {(k, int(v)): int(n) for k, v, n in rows}


def version_usage(tx: Tx, key_id: str | None = None) -> pd.DataFrame:
    """Per key version (of one key, or all): state, encryptions, decryptions, last uses."""
    sql = """SELECT k.name AS key, v.version, v.state, v.created_at,
               coalesce(sum(u.count) FILTER (u.action IN ('encrypt', 'generate_data_key',
                   'envelope_encrypt', 'rewrap', 'encrypt_many', 'rewrap_many')), 0)::BIGINT
                   AS encryptions,
               coalesce(sum(u.count) FILTER (u.action IN ('decrypt', 'envelope_decrypt',
                   'decrypt_many')), 0)::BIGINT AS decryptions,
               max(u.last_time) FILTER (u.action IN ('decrypt', 'envelope_decrypt',
                   'decrypt_many')) AS last_decrypt,
               max(u.last_time) FILTER (u.action IN ('encrypt', 'decrypt', 'rewrap',
                   'generate_data_key', 'envelope_encrypt', 'envelope_decrypt', 'sign',
                   'verify', 'mac', 'verify_mac', 'encrypt_many', 'decrypt_many', 'rewrap_many'))
                   AS last_used,
               v.version < k.min_decryption_version AS below_min_decryption
             FROM versions v JOIN keys k USING (key_id)
             LEFT JOIN usage u ON u.key_id = v.key_id AND u.version = v.version"""
    args: list[object] = []
    if key_id:
        sql += " WHERE v.key_id = ?"
        args.append(key_id)
    sql += " GROUP BY ALL ORDER BY key, v.version"
    return tx.execute(sql, args).df()
