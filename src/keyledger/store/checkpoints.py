"""Signed checkpoints of the audit ledger and the head kept in the HSM.

A checkpoint is a digest of every journal's tip, chained to the previous checkpoint and signed
by the HSM-held audit key (``write_checkpoint``, at the end of each ingest). The newest
checkpoint's hash is also kept in the HSM as a data object (``head_value``/``parse_head``), so
deleting the newest rows together with their checkpoints is still detected. Before extending
the ledger, ingest checks that the store still matches the last checkpoint
(``check_before_extend``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ..errors import AuditError
from .db import Tx
from .journal import SEP

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


def tips_digest(tips: list[tuple[str, int, str]]) -> str:
    """``TIPS_SQL``'s digest of (journal, jseq, hash) tips, computed in Python."""
    if not tips:
        return ""
    text = "\n".join(f"{j}:{s}:{h}" for j, s, h in sorted(tips))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Newest:
    """The newest checkpoint's row (``NEWEST_SQL``'s columns; None: no checkpoint yet) and the
    ledger's newest seq (None: no record), read together in one statement per ingest round."""

    checkpoint: tuple | None
    max_seq: int | None


# the newest checkpoint by max(cp_seq), not ORDER BY ... LIMIT 1: a top-N sort of the whole
# table (one row per ingest round) cost ~8 ms at 100,000 checkpoints, this ~2 ms
NEWEST_SQL = """SELECT (SELECT max(seq) FROM audit_log), c.cp_seq, c.last_seq, c.n_records,
    c.tips_digest, c.prev_hash, c.hash, c.signature
    FROM (SELECT max(cp_seq) AS top FROM checkpoints) t LEFT JOIN checkpoints c ON c.cp_seq = t.top"""


def newest(con: Tx) -> Newest:
    max_seq, *checkpoint = con.execute(NEWEST_SQL).fetchall()[0]
    return Newest(tuple(checkpoint) if checkpoint[0] is not None else None, max_seq)


def check_before_extend(con: Tx,
                        verify_signature: Callable[[bytes, bytes], bool],
                        head: tuple[int, str] | None, last: Newest | None = None,
                        offsets_tips: str | None = None) -> None:
    """Refuse to sign a new checkpoint on top of a store that no longer matches the last one.

    Without this, a forger who rewrites records and recomputes every hash would have the next
    ingest sign the forgery. The newest checkpoint must carry a valid HSM signature, match the
    head kept in the HSM, and its tips digest must equal the ingest bookkeeping's.
    ``last`` and ``offsets_tips`` (the bookkeeping's ``tips_digest``): as ingest already read
    them in this transaction (read here when not given).
    """
    last = newest(con) if last is None else last
    if last.checkpoint is None:
        if head is not None or last.max_seq is not None:
            raise AuditError("the audit ledger lost its checkpoints; run `keyledger audit "
                             "verify` - new records stay safe in the journals")
        return
    cp_seq, last_seq, n, tips, prev, h, sig = last.checkpoint
    if offsets_tips is None:
        offsets_tips = con.execute(OFFSETS_TIPS_SQL).one()[0]
    problem = None
    if checkpoint_hash(cp_seq, last_seq, n, tips, prev) != h:
        problem = f"checkpoint {cp_seq} was altered"
    elif not verify_signature(bytes.fromhex(h), bytes.fromhex(sig)):
        problem = f"checkpoint {cp_seq} does not carry a valid HSM signature"
    elif head is not None and (head[0] > cp_seq or (head[0] == cp_seq and head[1] != h)):
        problem = f"the HSM-held head (checkpoint {head[0]}) does not match the store"
    elif (last.max_seq or 0) != last_seq:
        problem = "records were added after the last signed checkpoint"
    elif offsets_tips != tips:
        problem = "the ingest bookkeeping does not match the last signed checkpoint"
    if problem:
        raise AuditError(f"the audit ledger does not match its last signed checkpoint "
                         f"({problem}); run `keyledger audit verify` - new records stay safe "
                         "in the journals and are not ingested until this is resolved")


def write_checkpoint(con: Tx, sign: Signer, now: datetime, last: Newest, added: int,
                     tips: str) -> tuple[int, str]:
    """Sign and append the checkpoint after an ingest that added ``added`` records (seq after
    ``last.max_seq``) to the ledger ``last`` describes (checked by ``check_before_extend`` in
    the same transaction), ``tips`` being the bookkeeping's new ``tips_digest``: one INSERT,
    no re-read of the ledger. Returns (cp_seq, hash)."""
    cp_seq, n, prev = 0, 0, ZERO
    if last.checkpoint:
        cp_seq, _, n, _, _, prev, _ = last.checkpoint  # the newest one's hash chains this one
    cp_seq, last_seq, n = cp_seq + 1, (last.max_seq or 0) + added, n + added
    h = checkpoint_hash(cp_seq, last_seq, n, tips, prev)
    signature = sign(bytes.fromhex(h)).hex()
    con.execute("INSERT INTO checkpoints (cp_seq, time, last_seq, n_records, tips_digest, "
                "prev_hash, hash, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [cp_seq, now.replace(tzinfo=None), last_seq, n, tips, prev, h, signature])
    return cp_seq, h


def head_value(cp_seq: int, cp_hash: str) -> bytes:
    return cp_seq.to_bytes(8, "big") + bytes.fromhex(cp_hash)


def parse_head(values: list[bytes]) -> tuple[int, str] | None:
    best = max((v for v in values if len(v) == 40), default=None)
    if best is None:
        return None
    return int.from_bytes(best[:8], "big"), best[8:].hex()

