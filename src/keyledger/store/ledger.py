"""The audit ledger in DuckDB: batch ingest of journals, signed checkpoints, verification.

Ingest moves the complete lines that journals gained since the last ingest into ``audit_log``
in one transaction (Arrow batch, no per-row INSERT), updates usage counters, and appends a
checkpoint: a digest of every journal's tip, chained to the previous checkpoint and signed by
the HSM-held audit key. The newest checkpoint's hash is also kept in the HSM as a data object,
so deleting the newest rows together with their checkpoints is still detected.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.json as pajson

from ..errors import AuditError
from .journal import SEP

JOURNAL_SCHEMA = pa.schema([
    ("journal", pa.string()), ("jseq", pa.int64()), ("time_us", pa.int64()),
    ("principal", pa.string()), ("action", pa.string()), ("key", pa.string()),
    ("key_id", pa.string()), ("version", pa.int64()), ("outcome", pa.string()),
    ("error", pa.string()), ("detail", pa.string()), ("context", pa.string()),
    ("pid", pa.int32()), ("prev", pa.string()), ("hash", pa.string()),
])

# SQL twin of journal.record_hash: recomputes each row's hash from its columns.
ROW_HASH_SQL = f"""sha256(concat_ws(chr({ord(SEP)}), journal, jseq::VARCHAR,
    epoch_us(time)::VARCHAR, principal, action, coalesce(key, ''), coalesce(key_id, ''),
    coalesce(version::VARCHAR, ''), outcome, coalesce(error, ''), coalesce(detail, ''),
    coalesce(context, ''), pid::VARCHAR, prev))"""

TIPS_SQL = """SELECT coalesce(sha256(string_agg(journal || ':' || jseq::VARCHAR || ':' || hash,
    chr(10) ORDER BY journal)), '') FROM (
    SELECT journal, max(jseq) AS jseq, arg_max(hash, jseq) AS hash FROM audit_log
    WHERE seq <= ? GROUP BY journal)"""

# The same digest over the ingest bookkeeping (journal -> newest ingested record).
OFFSETS_TIPS_SQL = """SELECT coalesce(sha256(string_agg(journal || ':' || tip_jseq::VARCHAR
    || ':' || tip_hash, chr(10) ORDER BY journal)), '') FROM journal_offsets"""

ZERO = "0" * 64
HEAD_LABEL_PREFIX = "keyledger-audit-head:"

Signer = Callable[[bytes], bytes]


def checkpoint_hash(cp_seq: int, last_seq: int, n_records: int, tips: str, prev: str) -> str:
    text = SEP.join((str(cp_seq), str(last_seq), str(n_records), tips, prev))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class IngestResult:
    records: int = 0
    journals: int = 0
    checkpoint: int | None = None


def pending_bytes(journal_dir: Path, known: dict[str, int]) -> bool:
    """Cheap check (stat only) whether any journal grew past what this process last ingested."""
    try:
        with os.scandir(journal_dir) as it:
            for entry in it:
                if entry.name.endswith(".jsonl"):
                    name = entry.name[:-6]
                    if entry.stat().st_size > known.get(name, 0):
                        return True
    except FileNotFoundError:
        return False
    return False


def check_before_extend(con: duckdb.DuckDBPyConnection,
                        verify_signature: Callable[[bytes, bytes], bool],
                        head: tuple[int, str] | None) -> None:
    """Refuse to sign a new checkpoint on top of a store that no longer matches the last one.

    Without this, a forger who rewrites records and recomputes every hash would have the next
    ingest sign the forgery. The newest checkpoint must carry a valid HSM signature, match the
    head kept in the HSM, and its tips digest must equal the ingest bookkeeping's.
    """
    last = con.execute("SELECT cp_seq, last_seq, n_records, tips_digest, prev_hash, hash, "
                       "signature FROM checkpoints ORDER BY cp_seq DESC LIMIT 1").fetchone()
    if last is None:
        if head is not None or con.execute("SELECT count(*) FROM audit_log").fetchone()[0]:
            raise AuditError("the audit ledger lost its checkpoints; run `keyledger audit "
                             "verify` - new records stay safe in the journals")
        return
    cp_seq, last_seq, n, tips, prev, h, sig = last
    problem = None
    if checkpoint_hash(cp_seq, last_seq, n, tips, prev) != h:
        problem = f"checkpoint {cp_seq} was altered"
    elif not verify_signature(bytes.fromhex(h), bytes.fromhex(sig)):
        problem = f"checkpoint {cp_seq} does not carry a valid HSM signature"
    elif head is not None and (head[0] > cp_seq or (head[0] == cp_seq and head[1] != h)):
        problem = f"the HSM-held head (checkpoint {head[0]}) does not match the store"
    elif con.execute(OFFSETS_TIPS_SQL).fetchone()[0] != tips:
        problem = "the ingest bookkeeping does not match the last signed checkpoint"
    if problem:
        raise AuditError(f"the audit ledger does not match its last signed checkpoint "
                         f"({problem}); run `keyledger audit verify` - new records stay safe "
                         "in the journals and are not ingested until this is resolved")


def ingest(con: duckdb.DuckDBPyConnection, journal_dir: Path, sign: Signer,
           now: datetime, known: dict[str, int]) -> IngestResult:
    """Move new complete journal lines into audit_log; runs inside the caller's transaction."""
    offsets = {j: (o, s, h) for j, o, s, h in con.execute(
        "SELECT journal, file_offset, tip_jseq, tip_hash FROM journal_offsets").fetchall()}
    chunks: list[bytes] = []
    new_offsets: dict[str, int] = {}
    try:
        entries = sorted(e for e in os.listdir(journal_dir) if e.endswith(".jsonl"))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        name = entry[:-6]
        start = offsets.get(name, (0, 0, ""))[0]
        path = journal_dir / entry
        try:
            size = path.stat().st_size
            if size <= start:
                known[name] = size
                continue
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read(size - start)
        except FileNotFoundError:
            continue
        end = data.rfind(b"\n") + 1  # only complete lines; a torn tail waits for its rest
        if end == 0:
            continue
        chunks.append(data[:end])
        new_offsets[name] = start + end
    result = IngestResult()
    if not chunks:
        return result
    table = pajson.read_json(
        io.BytesIO(b"".join(chunks)),
        parse_options=pajson.ParseOptions(explicit_schema=JOURNAL_SCHEMA,
                                          unexpected_field_behavior="ignore"),
    )
    base = con.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0]
    con.register("kl_batch", table)
    try:
        con.execute(
            """INSERT INTO audit_log SELECT ? + row_number() OVER (ORDER BY journal, jseq),
               journal, jseq, make_timestamp(time_us), principal, action, key, key_id, version,
               outcome, error, detail, context, pid, prev, hash FROM kl_batch""", [base])
        con.execute(
            """INSERT INTO usage SELECT key_id, version, action, count(*), max(make_timestamp(time_us))
               FROM kl_batch WHERE outcome = 'ok' AND version IS NOT NULL AND key_id IS NOT NULL
               GROUP BY ALL
               ON CONFLICT DO UPDATE SET count = usage.count + excluded.count,
                   last_time = greatest(usage.last_time, excluded.last_time)""")
        tips = con.execute(
            "SELECT journal, max(jseq), arg_max(hash, jseq) FROM kl_batch GROUP BY journal"
        ).fetchall()
    finally:
        con.unregister("kl_batch")
    for journal, jseq, h in tips:
        con.execute(
            """INSERT INTO journal_offsets VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET
               file_offset = excluded.file_offset, tip_jseq = excluded.tip_jseq,
               tip_hash = excluded.tip_hash""", [journal, new_offsets[journal], jseq, h])
    for journal, off in new_offsets.items():
        known[journal] = off
    result.records = table.num_rows
    result.journals = len(new_offsets)
    result.checkpoint = write_checkpoint(con, sign, now)
    return result


def write_checkpoint(con: duckdb.DuckDBPyConnection, sign: Signer, now: datetime) -> int:
    last = con.execute(
        "SELECT cp_seq, hash FROM checkpoints ORDER BY cp_seq DESC LIMIT 1").fetchone()
    cp_seq, prev = (last[0] + 1, last[1]) if last else (1, ZERO)
    last_seq, n = con.execute("SELECT coalesce(max(seq), 0), count(*) FROM audit_log").fetchone()
    tips = con.execute(OFFSETS_TIPS_SQL).fetchone()[0]
    h = checkpoint_hash(cp_seq, last_seq, n, tips, prev)
    signature = sign(bytes.fromhex(h)).hex()
    con.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [cp_seq, now.replace(tzinfo=None), last_seq, n, tips, prev, h, signature])
    return cp_seq


def head_value(cp_seq: int, cp_hash: str) -> bytes:
    return cp_seq.to_bytes(8, "big") + bytes.fromhex(cp_hash)


def parse_head(values: list[bytes]) -> tuple[int, str] | None:
    best = max((v for v in values if len(v) == 40), default=None)
    if best is None:
        return None
    return int.from_bytes(best[:8], "big"), best[8:].hex()


@dataclass
class VerifyReport:
    """Result of ``verify_audit()``. ``ok`` is True, or ``first_bad`` names the first bad record."""

    ok: bool
    records: int
    checkpoints: int
    problems: list[str] = field(default_factory=list)
    first_bad: dict | None = None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"audit ledger OK: {self.records} records, {self.checkpoints} checkpoints verified"
        where = ""
        if self.first_bad:
            fb = self.first_bad
            where = (f" First bad record: seq {fb.get('seq')} (journal {fb.get('journal')}, "
                     f"record {fb.get('jseq')}, {fb.get('action')} at {fb.get('time')}).")
        return "audit ledger BROKEN: " + "; ".join(self.problems) + "." + where

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.ok else "#cf222e"
        return f"<div style='color:{colour};font-weight:600'>{str(self)}</div>"


def verify(con: duckdb.DuckDBPyConnection, verify_signature: Callable[[bytes, bytes], bool],
           head: tuple[int, str] | None) -> VerifyReport:
    """Vectorised checks in SQL: row hashes, chain links per journal, checkpoint chain, tips."""
    n = con.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    ncp = con.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
    report = VerifyReport(True, n, ncp)
    bad: list[int] = []

    def fail(problem: str, seq: int | None) -> None:
        report.ok = False
        report.problems.append(problem)
        if seq is not None:
            bad.append(seq)

    row = con.execute(f"SELECT min(seq), count(*) FROM audit_log WHERE {ROW_HASH_SQL} <> hash"
                      ).fetchone()
    if row[1]:
        fail(f"{row[1]} record(s) do not match their hash (modified)", row[0])
    row = con.execute(
        """SELECT min(seq), count(*) FROM (
             SELECT seq, jseq, prev, journal,
                    lag(hash) OVER w AS lh, lag(jseq) OVER w AS lj, lag(seq) OVER w AS ls
             FROM audit_log WINDOW w AS (PARTITION BY journal ORDER BY jseq))
           WHERE (lj IS NULL AND (jseq <> 1 OR prev <> sha256(journal)))
              OR (lj IS NOT NULL AND (jseq <> lj + 1 OR prev <> lh OR seq < ls))""").fetchone()
    if row[1]:
        fail(f"{row[1]} chain link(s) broken (a record was deleted, inserted or reordered)",
             row[0])
    dup = con.execute("SELECT count(*) - count(DISTINCT seq) FROM audit_log").fetchone()[0]
    if dup:
        fail(f"{dup} duplicated sequence number(s)", None)
    cps = con.execute(
        "SELECT cp_seq, last_seq, n_records, tips_digest, prev_hash, hash, signature "
        "FROM checkpoints ORDER BY cp_seq").fetchall()
    prev = ZERO
    for i, (cp_seq, last_seq, n_rec, tips, cp_prev, h, _sig) in enumerate(cps, start=1):
        if cp_seq != i or cp_prev != prev or checkpoint_hash(cp_seq, last_seq, n_rec, tips,
                                                             cp_prev) != h:
            fail(f"checkpoint {cp_seq} is altered or out of chain", None)
            break
        prev = h
    if cps:
        cp_seq, last_seq, n_rec, tips, _, h, sig = cps[-1]
        if not verify_signature(bytes.fromhex(h), bytes.fromhex(sig)):
            fail(f"checkpoint {cp_seq} signature does not verify with the HSM audit key", None)
        actual_tips = con.execute(TIPS_SQL, [last_seq]).fetchone()[0]
        if con.execute(OFFSETS_TIPS_SQL).fetchone()[0] != tips:
            fail("the ingest bookkeeping (journal_offsets) differs from the last signed "
                 "checkpoint", None)
        covered = con.execute("SELECT count(*) FROM audit_log WHERE seq <= ?",
                              [last_seq]).fetchone()[0]
        if actual_tips != tips or covered != n_rec:
            gap = con.execute(
                """SELECT j.journal, coalesce(max(a.jseq), 0) + 1, j.tip_jseq
                   FROM journal_offsets j LEFT JOIN audit_log a USING (journal)
                   GROUP BY j.journal, j.tip_jseq HAVING coalesce(max(a.jseq), 0) < j.tip_jseq
                   ORDER BY 1 LIMIT 1""").fetchone()
            if gap:
                report.first_bad = {"journal": gap[0], "jseq": gap[1], "missing": True,
                                    "missing_through": gap[2]}
            fail(f"records covered by checkpoint {cp_seq} differ from what it signed "
                 f"(it signed {n_rec} records, the ledger has {covered}): records were "
                 "removed, added or rewritten", None)
        extra = con.execute("SELECT min(seq), count(*) FROM audit_log WHERE seq > ?",
                            [last_seq]).fetchone()
        if extra[1]:
            fail(f"{extra[1]} record(s) after the last signed checkpoint (inserted)", extra[0])
    elif n:
        fail("records exist but no signed checkpoint does", None)
    if head is not None:
        head_seq, head_hash = head
        by_seq = {c[0]: c for c in cps}
        at_head = by_seq.get(head_seq)
        if at_head is None or at_head[5] != head_hash:
            have = cps[-1][0] if cps else 0
            fail(f"the HSM holds checkpoint {head_seq} as the newest, the ledger's newest is "
                 f"{have} (newest records or checkpoints were removed or rewritten)", None)
        else:  # a crash between commit and head update leaves the head one step behind
            for c in cps:
                if c[0] > head_seq and not verify_signature(bytes.fromhex(c[5]),
                                                            bytes.fromhex(c[6])):
                    fail(f"checkpoint {c[0]} after the HSM head is not signed by the HSM", None)
                    break
    elif cps:
        fail("the HSM holds no audit head although checkpoints exist", None)
    if bad and report.first_bad is None:
        first = min(bad)
        rec = con.execute("SELECT seq, journal, jseq, time, action, key FROM audit_log "
                          "WHERE seq = ?", [first]).fetchone()
        if rec:
            report.first_bad = dict(zip(("seq", "journal", "jseq", "time", "action", "key"),
                                        rec, strict=True))
    return report
