"""What proves a journal's records: the HSM seals its writer appends, an admin's acceptance of
unproven records, and the journal files checked against the ledger at verification."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .db import Tx
from .journal import SUFFIX, line_problem
from .offsets import journal_files, read_offsets, tail_intact

# (journal, jseq, tip hash, mac) -> whether the MAC was made with the home's HSM seal key
SealCheck = Callable[[str, int, str, bytes], bool]


@dataclass
class JournalCheck:
    """What verification needs to check the journals and their seals (see ``check_journals``).

    ``alive(journal)``: whether the journal's writer still runs (it seals what it writes).
    ``due``: per live journal, the jseq through which a seal was waited for; a live writer's
    newer records are still pending (sealed within ``fsync_interval_ms``), not a finding.
    """

    journal_dir: Path
    check_seal: SealCheck
    alive: Callable[[str], bool]
    due: dict[str, int] = field(default_factory=dict)


ACCEPT_ACTION = "accept_unproven"
_ACCEPT_RE = re.compile(r"^accepted unproven records of (\S+) through (\d+): ")


def accept_detail(journal: str, through: int, reason: str) -> str:
    """The detail of an accept_unproven record; verification reads acceptances from it."""
    return f"accepted unproven records of {journal} through {through}: {reason}"


def _accepted(con: Tx, proven: dict[str, int]) -> dict[str, int]:
    """journal -> jseq through which an admin accepted unproven records, from acceptance
    records that are themselves proven (a forged acceptance would be unproven)."""
    out: dict[str, int] = {}
    for journal, jseq, detail in con.execute(
            "SELECT journal, jseq, detail FROM audit_log WHERE action = ? AND outcome = 'ok'",
            [ACCEPT_ACTION]).fetchall():
        m = _ACCEPT_RE.match(detail or "")
        if m and jseq <= proven.get(journal, 0):
            out[m.group(1)] = max(out.get(m.group(1), 0), int(m.group(2)))
    return out


def _unread_problem(path: Path, start: int, alive: bool) -> str | None:
    """What is wrong with the bytes of a journal that no ingest took (None: only a live
    writer's fresh lines)."""
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read(1 << 16)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not data:
        return None
    for i, line in enumerate(data.splitlines(keepends=True), start=1):
        if not line.endswith(b"\n"):
            break
        problem = line_problem(line)
        if problem:
            return f"line {i} after the ingested part cannot be ingested ({problem})"
    return None if alive else f"{len(data)} byte(s) after the ingested part were not ingested"


def check_journals(con: Tx, check: JournalCheck,
                   fail: Callable[[str, int | None], None], notes: list[str]) -> None:
    """The journals against the ledger: foreign files, truncated or unreadable journals, seals
    (again in the HSM), and records no valid seal covers (unproven); ``notes`` gets a line
    per range of unproven records an admin accepted (``VerifyReport.accepted``)."""
    names, foreign = journal_files(check.journal_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        fail(f"{len(foreign)} foreign file(s) in {check.journal_dir} ({shown}): not keyledger "
             "journals (name <host>-<pid>-<12 hex>.jsonl); nothing in them is ingested - "
             "investigate and move them away", None)
    offsets = read_offsets(con)

    def seq_of(journal: str, jseq: int) -> int | None:
        return con.execute("SELECT min(seq) FROM audit_log WHERE journal = ? AND jseq = ?",
                           [journal, jseq]).one()[0]

    for name in names:
        path = check.journal_dir / f"{name}{SUFFIX}"
        off = offsets.get(name)
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if off is not None and (size < off.file_offset or not tail_intact(path, off)):
            fail(f"journal {name} no longer holds what was ingested from it (through record "
                 f"{off.tip_jseq}, {off.file_offset} bytes; the file has {size}): it was "
                 "truncated or rewritten, and records written after that are not ingested",
                 seq_of(name, off.tip_jseq))
            continue
        problem = _unread_problem(path, off.file_offset if off else 0, check.alive(name))
        if problem:
            fail(f"journal {name}: {problem}; its records after record "
                 f"{off.tip_jseq if off else 0} are not in the ledger", None)
    proven: dict[str, int] = {}
    # the hashes of the sealed records, all journals in one join (no scan per journal)
    sealed_rows: dict[str, list[str]] = {}
    for journal, h in con.execute(
            """SELECT o.journal, a.hash FROM journal_offsets o JOIN audit_log a
               ON a.journal = o.journal AND a.jseq = o.seal_jseq""").fetchall():
        sealed_rows.setdefault(journal, []).append(h)
    for name, off in offsets.items():
        if off.bad_seal_jseq is not None:
            fail(f"journal {name}: the seal of record {off.bad_seal_jseq} does not verify with "
                 "the HSM seal key (the seal line was altered or forged)",
                 seq_of(name, off.bad_seal_jseq))
        if off.seal_jseq is None:
            continue
        try:
            mac = bytes.fromhex(off.seal_mac or "")
        except ValueError:  # not even hex: altered in the store
            mac = b""
        if not check.check_seal(name, off.seal_jseq, off.seal_hash or "", mac):
            fail(f"journal {name}: its stored seal (record {off.seal_jseq}) does not verify "
                 "with the HSM seal key (journal_offsets was altered)", None)
        elif sealed_rows.get(name) != [off.seal_hash]:
            fail(f"journal {name}: record {off.seal_jseq} is not the record its seal covers "
                 "(records were rewritten before ingest)", seq_of(name, off.seal_jseq))
        else:
            proven[name] = off.seal_jseq
    accepted = _accepted(con, proven)
    for name, off in sorted(offsets.items()):
        first = proven.get(name, 0) + 1
        due = off.tip_jseq if not check.alive(name) else min(off.tip_jseq,
                                                               check.due.get(name, 0))
        if due < first:
            continue
        if accepted.get(name, 0) >= due:
            notes.append(f"records {first}-{due} of journal {name} are unproven "
                         "and were accepted by an admin")
            continue
        first = max(first, accepted.get(name, 0) + 1)
        fail(f"journal {name}: records {first}-{due} are unproven (no valid HSM seal covers "
             "them): either its process stopped before sealing them (e.g. it was killed) or "
             "the lines were not written by keyledger (forged); after investigating, an admin "
             f"can accept them with accept_unproven({name!r}, {due}, reason)",
             seq_of(name, first))


