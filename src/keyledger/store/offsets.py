"""The ingest bookkeeping of each journal (a row of ``journal_offsets``: how far ingest read
it, its newest ingested record, its newest valid seal) and the journal files it refers to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .db import Tx
from .journal import SEAL_PREFIX, SUFFIX, journal_pid


@dataclass
class Offset:
    """A journal's ingest bookkeeping (a row of journal_offsets)."""

    file_offset: int
    tip_jseq: int
    tip_hash: str
    seal_jseq: int | None = None
    seal_hash: str | None = None
    seal_mac: str | None = None
    bad_seal_jseq: int | None = None


OFFSET_COLUMNS = ("file_offset", "tip_jseq", "tip_hash", "seal_jseq", "seal_hash", "seal_mac",
                   "bad_seal_jseq")


def read_offsets(con: Tx) -> dict[str, Offset]:
    return {j: Offset(*rest) for j, *rest in con.execute(
        f"SELECT journal, {', '.join(OFFSET_COLUMNS)} FROM journal_offsets").fetchall()}


def journal_files(journal_dir: Path) -> tuple[list[str], list[str]]:
    """(journal names, foreign entries) in ``journal_dir``, each sorted by name."""
    try:
        entries = sorted(os.listdir(journal_dir))
    except FileNotFoundError:
        return [], []
    names, foreign = [], []
    for entry in entries:
        name = entry[:-len(SUFFIX)]
        if entry.endswith(SUFFIX) and journal_pid(name) is not None \
                and (journal_dir / entry).is_file():
            names.append(name)
        else:
            foreign.append(entry)
    return names, foreign


def tail_intact(path: Path, off: Offset | None) -> bool:
    """Whether the journal still ends its ingested part with the line ingest last took: the
    tip record (``<tip hash>"]``) or a seal. False: it was truncated or rewritten, and reading
    on from the stored offset would take the wrong bytes."""
    if off is None or off.file_offset == 0:
        return True
    n = min(off.file_offset, 256)
    try:
        with path.open("rb") as fh:
            fh.seek(off.file_offset - n)
            tail = fh.read(n)
    except OSError:
        return False
    if len(tail) != n or not tail.endswith(b'"]\n'):
        return False
    if tail.endswith(off.tip_hash.encode() + b'"]\n'):
        return True
    line_start = tail.rfind(b"\n", 0, n - 1) + 1
    return (line_start > 0 or n == off.file_offset) and tail.startswith(SEAL_PREFIX, line_start)
