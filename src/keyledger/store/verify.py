"""Verification of the audit ledger: vectorised checks in SQL of row hashes, chain links per
journal, time going back, the checkpoint chain and its signatures, the HSM-held head; with the
journals, also their files and seals (``seals.check_journals``)."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from . import host
from .checkpoints import OFFSETS_TIPS_SQL, TIPS_SQL, ZERO, checkpoint_hash, tips_digest
from .db import Tx
from .journal import SEP, genesis
from .seals import JournalCheck, check_journals

# SQL twin of journal.record_hash: recomputes each row's hash from its columns. concat() reads
# NULL as '' and numbers as decimal text, exactly like record_hash.
_HASHED = ("journal", "jseq", "epoch_us(time)", "principal", "action", "key", "key_id",
           "version", "outcome", "error", "detail", "context", "pid", "prev")
ROW_HASH_SQL = f"sha256(concat({f', chr({ord(SEP)}), '.join(_HASHED)}))"


@dataclass
class VerifyReport:
    """Result of ``verify_audit()``. ``ok`` is True, or ``first_bad`` names the first bad record."""

    ok: bool
    records: int
    checkpoints: int
    problems: list[str] = field(default_factory=list)
    first_bad: dict | None = None
    # unproven records an admin accepted (accept_unproven): not problems, but worth knowing
    accepted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            note = f" ({'; '.join(self.accepted)})" if self.accepted else ""
            return (f"audit ledger OK: {self.records} records, {self.checkpoints} checkpoints "
                    f"verified{note}")
        where = ""
        if self.first_bad:
            fb = self.first_bad
            where = (f" First bad record: seq {fb.get('seq')} (journal {fb.get('journal')}, "
                     f"record {fb.get('jseq')}, {fb.get('action')} at {fb.get('time')}).")
        return "audit ledger BROKEN: " + "; ".join(self.problems) + "." + where

    def _repr_html_(self) -> str:
        colour = ("var(--jp-success-color1, #1a7f37)" if self.ok  # theme-aware, light fallback
                  else "var(--jp-error-color1, #cf222e)")
        return f"<div style='color:{colour};font-weight:600'>{html.escape(str(self))}</div>"


# Rows whose stored hash does not match their columns (parallel scan).
_MODIFIED_SQL = f"SELECT seq FROM audit_log WHERE NOT coalesce({ROW_HASH_SQL} = hash, false)"

# One pass over audit_log in storage order (a streaming window: no sort, no hash table): the
# rows that do not continue the row stored just before them (same journal, next jseq, prev =
# its hash, higher seq). In an intact ledger those are the first row of each journal's run in
# each ingest batch; anything else is moved, removed or inserted rows.
# A row dated before the row it continues is a run start too, so that _run_links sees it.
_RUN_STARTS_SQL = """SELECT seq, journal, jseq, prev, ls, lj, ljs, lh, time, lt FROM (
    SELECT seq, journal, jseq, prev, time, lag(seq) OVER () AS ls, lag(journal) OVER () AS lj,
           lag(jseq) OVER () AS ljs, lag(hash) OVER () AS lh, lag(time) OVER () AS lt
    FROM audit_log)
    WHERE NOT coalesce(seq > ls AND journal = lj AND jseq = ljs + 1 AND prev = lh
                       AND time >= lt, false)"""

# The exact check of time within each journal (a sort); only when _run_links is not conclusive.
_BACKWARDS_SQL = """SELECT seq FROM (
    SELECT seq, time, lag(time) OVER (PARTITION BY journal ORDER BY jseq) AS lt FROM audit_log)
    WHERE time < lt ORDER BY seq"""

# The exact link check (a sort per journal); run only when the fast one above is not conclusive.
_LINKS_SQL = """SELECT min(seq), count(*) FROM (
    SELECT seq, jseq, prev, journal,
           lag(hash) OVER w AS lh, lag(jseq) OVER w AS lj, lag(seq) OVER w AS ls
    FROM audit_log WINDOW w AS (PARTITION BY journal ORDER BY jseq))
    WHERE (lj IS NULL AND (jseq <> 1 OR prev <> sha256(journal)))
       OR (lj IS NOT NULL AND (jseq <> lj + 1 OR prev <> lh OR seq < ls))"""


def _run_links(starts: list[tuple], last: tuple | None
               ) -> tuple[dict[str, tuple[int, str]], list[int]] | None:
    """Check that the runs of consecutive rows found by ``_RUN_STARTS_SQL`` chain up per journal.

    ``starts`` are (seq, journal, jseq, prev, ls, lj, ljs, lh, time, lt) of the rows that do
    not continue the row stored before them (whose seq, journal, jseq, hash, time are ls, lj,
    ljs, lh, lt: a run's end); ``last`` is (seq, journal, jseq, hash, time) of the last row.
    Sound on its own: every row continues its predecessor in storage order or starts a run;
    each run start links to the end of another run of its journal (jseq - 1, its hash, a
    lower seq) that nothing else links to, or is its journal's only jseq 1 with prev =
    sha256(journal); seq rises in storage order. So every journal is one unbroken chain 1..n
    with rising seq, as the exact window check demands. Returns each journal's (jseq, hash)
    tip and the seqs of the rows dated before their predecessor in the journal, or None when
    this check cannot vouch for the ledger (the exact checks decide then).
    """
    ends: dict[tuple[str, int], tuple[str, int, datetime]] = {}
    pairs = [(lj, ljs, lh, ls, lt) for *_, ls, lj, ljs, lh, _, lt in starts if ls is not None]
    if last is not None:
        pairs.append((last[1], last[2], last[3], last[0], last[4]))
    for journal, jseq, h, seq, time in pairs:
        if (journal, jseq) in ends:
            return None
        ends[(journal, jseq)] = (h, seq, time)
    first_seen: set[str] = set()
    used: set[tuple[str, int]] = set()
    backwards: list[int] = []
    for seq, journal, jseq, prev, ls, _, _, _, time, _ in starts:
        if seq is None or journal is None or jseq is None or (ls is not None and seq <= ls):
            return None  # storage order is not seq order
        if jseq == 1:
            if journal in first_seen or prev != genesis(journal):
                return None
            first_seen.add(journal)
            continue
        end = ends.get((journal, jseq - 1))
        if end is None or (journal, jseq - 1) in used or end[0] != prev or end[1] >= seq:
            return None
        used.add((journal, jseq - 1))
        if time < end[2]:
            backwards.append(seq)
    tips: dict[str, tuple[int, str]] = {}
    for (journal, jseq), (h, _, _) in ends.items():
        if journal not in tips or jseq > tips[journal][0]:
            tips[journal] = (jseq, h)
    return tips, backwards



def verify(con: Tx, verify_signature: Callable[[bytes, bytes], bool],
           head: tuple[int, str] | None, journals: JournalCheck | None = None) -> VerifyReport:
    """Vectorised checks in SQL: row hashes, chain links per journal, checkpoint chain, tips;
    with ``journals``, also the journal files and seals (``check_journals``)."""
    n, max_seq = con.execute("SELECT count(*), max(seq) FROM audit_log").one()
    ncp = con.execute("SELECT count(*) FROM checkpoints").one()[0]
    report = VerifyReport(True, n, ncp)
    bad: list[int] = []

    def fail(problem: str, seq: int | None) -> None:
        report.ok = False
        report.problems.append(problem)
        if seq is not None:
            bad.append(seq)

    # The link scan (one thread: a streaming window) runs beside the row hashes (all threads)
    # on a second connection of this process; nothing was written in this transaction yet,
    # so both see the same ledger.
    cursor = host.sibling(con.con)
    found: list = []

    def scan_links() -> None:
        try:
            found.append(cursor.execute(_RUN_STARTS_SQL).fetchall())
        except BaseException as exc:  # re-raised below, in the caller's thread
            found.append(exc)

    worker = threading.Thread(target=scan_links, name="keyledger-verify-links")
    worker.start()
    try:
        modified = [seq for (seq,) in con.execute(_MODIFIED_SQL).fetchall()]
    finally:
        worker.join()
        cursor.close()
    if isinstance(found[0], BaseException):
        raise found[0]
    starts = found[0]
    if modified:
        seqs = [s for s in modified if s is not None]
        fail(f"{len(modified)} record(s) do not match their hash (modified)",
             min(seqs) if seqs else None)
    lasts = con.execute("SELECT seq, journal, jseq, hash, time FROM audit_log WHERE seq = ?",
                        [max_seq]).fetchall() if max_seq is not None else []
    tips = linked = None
    if len(lasts) <= 1 and (n == 0) == (not lasts):  # else seq repeats or is missing
        linked = _run_links(starts, lasts[0] if lasts else None)
    if linked is not None:
        tips, backwards = linked
    else:
        backwards = [seq for (seq,) in con.execute(_BACKWARDS_SQL).fetchall()]
    if backwards:
        fail(f"{len(backwards)} record(s) dated before the record before them in their journal "
             "(time went backwards: a clock set back by more than a second, or lines that its "
             "writer did not write)", backwards[0])
    if tips is None:  # not conclusive: the exact checks decide and name the first bad row
        row = con.execute(_LINKS_SQL).one()
        if row[1]:
            fail(f"{row[1]} chain link(s) broken (a record was deleted, inserted or reordered)",
                 row[0])
        dup = con.execute("SELECT count(*) - count(DISTINCT seq) FROM audit_log").one()[0]
        if dup:
            fail(f"{dup} duplicated sequence number(s)", None)
    cps = con.execute(
        "SELECT cp_seq, last_seq, n_records, tips_digest, prev_hash, hash, signature "
        "FROM checkpoints ORDER BY cp_seq").fetchall()
    prev = ZERO
    for i, (cp_seq, last_seq, n_rec, cp_tips, cp_prev, h, _sig) in enumerate(cps, start=1):
        if cp_seq != i or cp_prev != prev or checkpoint_hash(cp_seq, last_seq, n_rec, cp_tips,
                                                             cp_prev) != h:
            fail(f"checkpoint {cp_seq} is altered or out of chain", None)
            break
        prev = h
    if cps:
        cp_seq, last_seq, n_rec, cp_tips, _, h, sig = cps[-1]
        if not verify_signature(bytes.fromhex(h), bytes.fromhex(sig)):
            fail(f"checkpoint {cp_seq} signature does not verify with the HSM audit key", None)
        if tips is not None and (max_seq is None or max_seq <= last_seq):
            # every row is covered and every chain checked: its tips are the run ends above
            actual_tips = tips_digest([(j, s, th) for j, (s, th) in tips.items()])
            covered = n
        else:
            actual_tips = con.execute(TIPS_SQL, [last_seq]).one()[0]
            covered = con.execute("SELECT count(*) FROM audit_log WHERE seq <= ?",
                                  [last_seq]).one()[0]
        if con.execute(OFFSETS_TIPS_SQL).one()[0] != cp_tips:
            fail("the ingest bookkeeping (journal_offsets) differs from the last signed "
                 "checkpoint", None)
        if actual_tips != cp_tips or covered != n_rec:
            gap = con.execute(
                """SELECT j.journal, coalesce(max(a.jseq), 0) + 1, j.tip_jseq
                   FROM journal_offsets j LEFT JOIN audit_log a USING (journal)
                   GROUP BY j.journal, j.tip_jseq HAVING coalesce(max(a.jseq), 0) < j.tip_jseq
                   ORDER BY 1 LIMIT 1""").fetchone()
            if gap:
                report.first_bad = {"journal": gap[0], "jseq": gap[1], "missing": True,
                                    "missing_through": gap[2]}
            # rows beyond what ingest ever took from a journal were put there by hand
            surplus = con.execute(
                """SELECT min(a.seq) FROM audit_log a JOIN journal_offsets j USING (journal)
                   WHERE a.jseq > j.tip_jseq AND a.seq <= ?""", [last_seq]).one()[0]
            what = (f"it signed {n_rec} records, the ledger has {covered}" if covered != n_rec
                    else "the newest record of a journal is not the one it signed")
            fail(f"records covered by checkpoint {cp_seq} differ from what it signed ({what}): "
                 "records were removed, added or rewritten", surplus)
        if max_seq is not None and max_seq > last_seq:
            extra = con.execute("SELECT min(seq), count(*) FROM audit_log WHERE seq > ?",
                                [last_seq]).one()
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
    if journals is not None:
        check_journals(con, journals, fail, report.accepted)
    if bad and report.first_bad is None:
        first = min(bad)
        rec = con.execute("SELECT seq, journal, jseq, time, action, key FROM audit_log "
                          "WHERE seq = ?", [first]).fetchone()
        if rec:
            report.first_bad = dict(zip(("seq", "journal", "jseq", "time", "action", "key"),
                                        rec, strict=True))
    return report
