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


def check_before_extend(con: Tx,
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
        if head is not None or con.execute("SELECT count(*) FROM audit_log").one()[0]:
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
    elif con.execute("SELECT coalesce(max(seq), 0) FROM audit_log").one()[0] != last_seq:
        problem = "records were added after the last signed checkpoint"
    elif con.execute(OFFSETS_TIPS_SQL).one()[0] != tips:
        problem = "the ingest bookkeeping does not match the last signed checkpoint"
    if problem:
        raise AuditError(f"the audit ledger does not match its last signed checkpoint "
                         f"({problem}); run `keyledger audit verify` - new records stay safe "
                         "in the journals and are not ingested until this is resolved")


def write_checkpoint(con: Tx, sign: Signer, now: datetime) -> int:
    last = con.execute(
        "SELECT cp_seq, hash FROM checkpoints ORDER BY cp_seq DESC LIMIT 1").fetchone()
    cp_seq, prev = (last[0] + 1, last[1]) if last else (1, ZERO)
    last_seq, n = con.execute("SELECT coalesce(max(seq), 0), count(*) FROM audit_log").one()
    tips = con.execute(OFFSETS_TIPS_SQL).one()[0]
    h = checkpoint_hash(cp_seq, last_seq, n, tips, prev)
    signature = sign(bytes.fromhex(h)).hex()
    con.execute("INSERT INTO checkpoints (cp_seq, time, last_seq, n_records, tips_digest, "
                "prev_hash, hash, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [cp_seq, now.replace(tzinfo=None), last_seq, n, tips, prev, h, signature])
    return cp_seq


def head_value(cp_seq: int, cp_hash: str) -> bytes:
    return cp_seq.to_bytes(8, "big") + bytes.fromhex(cp_hash)


def parse_head(values: list[bytes]) -> tuple[int, str] | None:
    best = max((v for v in values if len(v) == 40), default=None)
    if best is None:
        return None
    return int.from_bytes(best[:8], "big"), best[8:].hex()

