r"""The audit ledger in DuckDB: batch ingest of journals, signed checkpoints, verification.

Ingest moves the complete lines that journals gained since the last ingest into ``audit_log``
in one transaction (Arrow batches, no per-row INSERT), updates usage counters, and appends a
checkpoint: a digest of every journal's tip, chained to the previous checkpoint and signed by
the HSM-held audit key. The newest checkpoint's hash is also kept in the HSM as a data object,
so deleting the newest rows together with their checkpoints is still detected.

Journal lines are JSON arrays (``journal.LINE_FIELDS``). They are parsed with Arrow's CSV
reader, which is several times faster than a JSON parser here: the writer's JSON string
encoding is CSV with ``"`` quotes and ``\`` escapes, except for the escapes ``\b \f \n \r \t
\uXXXX``; the rare lines that contain one of those are decoded again with ``json.loads``.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import AuditError
from .db import Tx
from .journal import (
    LINE_FIELDS,
    SEAL_PREFIX,
    SEP,
    SUFFIX,
    genesis,
    journal_pid,
    line_problem,
    parse_seal,
    read_range,
)

_STRING_FIELDS = ("principal", "action", "key", "key_id", "outcome", "error", "detail",
                  "context")
_CSV_READ = pacsv.ReadOptions(column_names=list(LINE_FIELDS), block_size=1 << 22)
_CSV_PARSE = pacsv.ParseOptions(delimiter=",", quote_char='"', escape_char="\\",
                                double_quote=False, newlines_in_values=False,
                                ignore_empty_lines=False)
_CSV_CONVERT = pacsv.ConvertOptions(
    column_types={name: pa.int64() if name in ("time_us", "version") else pa.string()
                  for name in LINE_FIELDS},  # jseq arrives as "[123", hash as "<hex>]"
    null_values=["null"], strings_can_be_null=True, quoted_strings_can_be_null=False)
_JSON_ONLY_ESCAPE = re.compile(rb"\\[bfnrtu]")
_BATCH_BYTES = 128 << 20  # journal bytes per Arrow batch: bounds the memory an ingest needs
_ROW_GROUP_ROWS = 122_880  # DuckDB's row group size
# glibc malloc: with Arrow's default (mimalloc) the first touch of fresh memory made parsing a
# large batch about twice as slow
_POOL = pa.system_memory_pool()

AUDIT_COLUMNS = ("seq", "journal", "jseq", "time", "principal", "action", "key", "key_id",
                 "version", "outcome", "error", "detail", "context", "pid", "prev", "hash")
_INSERT_SQL = (f"INSERT INTO audit_log ({', '.join(AUDIT_COLUMNS)}) "
               f"SELECT {', '.join(AUDIT_COLUMNS)} FROM kl_batch")

# SQL twin of journal.record_hash: recomputes each row's hash from its columns. concat() reads
# NULL as '' and numbers as decimal text, exactly like record_hash.
_HASHED = ("journal", "jseq", "epoch_us(time)", "principal", "action", "key", "key_id",
           "version", "outcome", "error", "detail", "context", "pid", "prev")
ROW_HASH_SQL = f"sha256(concat({f', chr({ord(SEP)}), '.join(_HASHED)}))"

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
# (journal, jseq, tip hash, mac) -> whether the MAC was made with the home's HSM seal key
SealCheck = Callable[[str, int, str, bytes], bool]


def checkpoint_hash(cp_seq: int, last_seq: int, n_records: int, tips: str, prev: str) -> str:
    text = SEP.join((str(cp_seq), str(last_seq), str(n_records), tips, prev))
    return hashlib.sha256(text.encode()).hexdigest()


def tips_digest(tips: list[tuple[str, int, str]]) -> str:
    """``TIPS_SQL``'s digest of (journal, jseq, hash) tips, computed in Python."""
    if not tips:
        return ""
    text = "\n".join(f"{j}:{s}:{h}" for j, s, h in sorted(tips))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class IngestResult:
    records: int = 0
    journals: int = 0
    checkpoint: int | None = None


def pending_bytes(journal_dir: Path, known: dict[str, int], skip: str | None = None) -> bool:
    """Cheap check (stat only) whether any journal (but ``skip``) grew past what this process
    last ingested."""
    try:
        with os.scandir(journal_dir) as it:
            for entry in it:
                if entry.name.endswith(SUFFIX):
                    name = entry.name[:-len(SUFFIX)]
                    if name != skip and entry.stat().st_size > known.get(name, 0):
                        return True
    except FileNotFoundError:
        return False
    return False


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


@dataclass
class _Offset:
    """A journal's ingest bookkeeping (a row of journal_offsets)."""

    file_offset: int
    tip_jseq: int
    tip_hash: str
    seal_jseq: int | None = None
    seal_hash: str | None = None
    seal_mac: str | None = None
    bad_seal_jseq: int | None = None


_OFFSET_COLUMNS = ("file_offset", "tip_jseq", "tip_hash", "seal_jseq", "seal_hash", "seal_mac",
                   "bad_seal_jseq")


def read_offsets(con: Tx) -> dict[str, _Offset]:
    return {j: _Offset(*rest) for j, *rest in con.execute(
        f"SELECT journal, {', '.join(_OFFSET_COLUMNS)} FROM journal_offsets").fetchall()}


@dataclass
class _Pending:
    journal: str
    pid: int
    path: Path
    start: int  # file offset of the first byte not yet ingested
    size: int
    capped: bool = True  # False: read to the end even beyond the batch budget


@dataclass
class _Chunk:
    journal: str
    pid: int
    begin: int  # position in the batch buffer
    end: int  # just past its last complete record line (seal lines removed)
    file_start: int  # file offset of its first byte
    file_end: int  # file offset just past its last complete line
    prev: str  # hash of the journal's record before the chunk's first
    path: Path
    seals: list[tuple[int, str, bytes]] = field(default_factory=list)  # (jseq, hash, mac)


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


def _pending(journal_dir: Path, offsets: dict[str, _Offset],
             known: dict[str, int]) -> list[_Pending]:
    """The journals that grew since their offsets, in journal (name) order.

    Foreign files and journals shorter than what was ingested from them (truncated) are left
    alone: verification reports them (``check_journals``); they never block other journals.
    """
    names, foreign = journal_files(journal_dir)
    for entry in foreign:  # pending_bytes need not look at them again until they grow
        try:
            known[entry[:-len(SUFFIX)]] = os.stat(journal_dir / entry).st_size
        except OSError:
            pass
    todo = []
    for name in names:
        path = journal_dir / f"{name}{SUFFIX}"
        start = offsets[name].file_offset if name in offsets else 0
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            continue
        if size <= start or not tail_intact(path, offsets.get(name)):
            known[name] = size
            continue
        todo.append(_Pending(name, journal_pid(name) or 0, path, start, size))
    return todo


def tail_intact(path: Path, off: _Offset | None) -> bool:
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


def _take_seals(buf: bytearray, begin: int, end: int) -> tuple[int, list[tuple[int, str, bytes]]]:
    """Move the seal lines out of the complete lines ``buf[begin:end]`` (in place); returns the
    new end of the record lines and the seals. Raises ValueError for a malformed seal line."""
    starts = [begin] if buf.startswith(SEAL_PREFIX, begin, end) else []
    i = buf.find(b"\n" + SEAL_PREFIX, begin, end)
    while i != -1:
        starts.append(i + 1)
        i = buf.find(b"\n" + SEAL_PREFIX, i + 1, end)
    if not starts:
        return end, []
    seals, write = [], starts[0]
    for k, start in enumerate(starts):
        stop = buf.index(b"\n", start, end) + 1
        seals.append(parse_seal(bytes(buf[start:stop])))
        upto = starts[k + 1] if k + 1 < len(starts) else end
        buf[write:write + upto - stop] = buf[stop:upto]
        write += upto - stop
    return write, seals


_MALFORMED = (0, "", b"")


class _Unreadable(ValueError):
    """Journal lines the fast parser cannot take: ingest salvages the good lines before them."""


def _good_prefix(path: Path, start: int, end: int) -> int:
    """File offset just past the complete lines of ``start:end`` before the first bad one."""
    data = read_range(path, start, end)
    if data is None:
        return start
    pos = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n") or line_problem(line) is not None:
            break
        pos += len(line)
    return start + pos


def _read_batch(todo: list[_Pending], offsets: dict[str, _Offset]
                ) -> tuple[bytearray, list[_Chunk], list[_Pending]]:
    """Complete lines of the pending journals, back to back in one buffer of about
    ``_BATCH_BYTES`` at most; returns the buffer, its chunks and what is left to read."""
    plan, left, total = [], [], 0
    for i, p in enumerate(todo):
        if total >= _BATCH_BYTES:
            left = todo[i:]
            break
        length = p.size - p.start if not p.capped else min(p.size - p.start, _BATCH_BYTES)
        plan.append((p, length))
        total += length
    buf = bytearray(total)
    view = memoryview(buf)
    chunks: list[_Chunk] = []
    pos = 0
    for p, length in plan:
        try:
            with open(p.path, "rb") as fh:
                fh.seek(p.start)
                got = fh.readinto(view[pos:pos + length])
        except FileNotFoundError:
            continue
        end = buf.rfind(b"\n", pos, pos + got) + 1  # a torn tail waits for its rest
        if end <= pos:
            if got == length < p.size - p.start:  # one line longer than a batch
                left.append(_Pending(p.journal, p.pid, p.path, p.start, p.size, capped=False))
            continue
        file_end = p.start + end - pos
        prev = offsets[p.journal].tip_hash if p.journal in offsets else genesis(p.journal)
        chunk = _Chunk(p.journal, p.pid, pos, end, p.start, file_end, prev, p.path)
        try:
            chunk.end, chunk.seals = _take_seals(buf, pos, end)
        except ValueError:
            chunk.seals = [_MALFORMED]  # ingest salvages the lines before it
        chunks.append(chunk)
        if got == length < p.size - p.start:  # capped: the rest goes into a later batch
            left.append(_Pending(p.journal, p.pid, p.path, file_end, p.size))
        pos = chunk.end
    view.release()
    del buf[pos:]
    return buf, chunks, left


def _json_fallback(columns: dict[str, pa.Array], data: memoryview) -> None:
    """Re-decode, with a real JSON parser, the lines holding escapes the CSV reader misreads."""
    line_ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)
    rows = sorted({int(np.searchsorted(line_ends, m.start()))
                   for m in _JSON_ONLY_ESCAPE.finditer(data)})
    values: dict[str, list] = {name: [] for name in _STRING_FIELDS}
    for row in rows:
        begin = int(line_ends[row - 1]) + 1 if row else 0
        record = dict(zip(LINE_FIELDS, json.loads(bytes(data[begin:int(line_ends[row])])),
                          strict=True))
        for name in _STRING_FIELDS:
            values[name].append(record[name])
    mask = np.zeros(len(line_ends), dtype=bool)
    mask[rows] = True
    mask_arr = pa.array(mask)
    for name in _STRING_FIELDS:
        columns[name] = pc.replace_with_mask(columns[name], mask_arr,
                                             pa.array(values[name], pa.string()),
                                             memory_pool=_POOL)


def _hash_columns(column: pa.ChunkedArray, starts: list[str], first_rows: np.ndarray
                  ) -> tuple[pa.Array, pa.Array]:
    """``hash`` and ``prev`` as string views into the reader's buffers (no copy of the hex).

    The reader gives ``<64 hex>]`` for the last field of a line. prev[i] = hash[i - 1], except
    at ``first_rows``, whose prev is the matching entry of ``starts`` (the stored tips).
    """
    views: list[np.ndarray] = []
    buffers: list[pa.Buffer] = []
    for arr in column.chunks:
        n = len(arr)
        if not n:
            continue
        if arr.null_count:
            raise ValueError("a record has no hash")
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, np.int32, n + 1, arr.offset * 4)
        if not (np.diff(offsets) == 65).all():
            raise ValueError("a record's hash is not 64 characters")
        rows = np.frombuffer(data_buf, np.uint8, 65 * n, int(offsets[0])).reshape(n, 65)
        if not (rows[:, 64] == ord("]")).all():
            raise ValueError("a record does not end with its hash")
        # a view: length, first 4 bytes, buffer index, offset (Arrow's string_view layout)
        v = np.empty((n, 4), np.int32)
        v[:, 0] = 64
        v[:, 1] = rows[:, :4].copy().view("<i4")[:, 0]
        v[:, 2] = len(buffers)
        v[:, 3] = offsets[:-1]
        views.append(v)
        buffers.append(data_buf)
    hashes = np.concatenate(views)
    if any(len(h) != 64 or not h.isascii() for h in starts):
        raise ValueError("a stored tip hash is not 64 hex digits")
    start_bytes = "".join(starts).encode()
    start_views = np.empty((len(starts), 4), np.int32)
    start_views[:, 0] = 64
    start_views[:, 1] = np.frombuffer(start_bytes, "<i4")[::16]
    start_views[:, 2] = len(buffers)
    start_views[:, 3] = np.arange(len(starts)) * 64
    prevs = np.empty_like(hashes)
    prevs[1:] = hashes[:-1]
    prevs[first_rows] = start_views
    n = len(hashes)
    return (pa.Array.from_buffers(pa.string_view(), n, [None, pa.py_buffer(hashes), *buffers]),
            pa.Array.from_buffers(pa.string_view(), n,
                                  [None, pa.py_buffer(prevs), *buffers,
                                   pa.py_buffer(start_bytes)]))


def _read_csv(data: memoryview, options: pacsv.ReadOptions) -> pa.Table:
    return pacsv.read_csv(pa.BufferReader(pa.py_buffer(data)), read_options=options,
                          parse_options=_CSV_PARSE, convert_options=_CSV_CONVERT,
                          memory_pool=_POOL)


def _parse(buf: bytearray, chunks: list[_Chunk], base: int) -> tuple[pa.Table, list[int]]:
    """Journal lines -> an Arrow table with audit_log's columns (seq from ``base + 1``), and
    the row of each chunk's last line."""
    data = memoryview(buf)
    counts = np.array([buf.count(b"\n", c.begin, c.end) for c in chunks], dtype=np.int64)
    ends = np.cumsum(counts)
    n = int(ends[-1])
    k = len(chunks)
    try:
        try:
            raw = _read_csv(data, _CSV_READ)
        except pa.ArrowInvalid as exc:
            if "straddl" not in str(exc):
                raise
            # a line longer than a block (a huge context or name): one block for all
            raw = _read_csv(data, pacsv.ReadOptions(column_names=list(LINE_FIELDS),
                                                    block_size=len(data) + 1))
        if raw.num_rows != n:
            raise ValueError(f"{raw.num_rows} records in {n} lines")
        # One contiguous chunk per column: DuckDB inserts that about twice as fast as the
        # reader's many blocks.
        columns = {name: raw.column(name).combine_chunks(memory_pool=_POOL)
                   for name in _STRING_FIELDS + ("time_us", "version")}
        if _JSON_ONLY_ESCAPE.search(data):
            _json_fallback(columns, data)
        jseq = pc.cast(pc.utf8_slice_codeunits(raw.column("jseq"), 1, memory_pool=_POOL),
                       pa.int64(), memory_pool=_POOL).combine_chunks(memory_pool=_POOL)
        # prev = the hash of the line before; a chunk's first line links to the stored tip.
        hashes, prevs = _hash_columns(raw.column("hash"), [c.prev for c in chunks],
                                      ends - counts)
    except (pa.ArrowException, ValueError) as exc:
        raise _Unreadable(str(exc).splitlines()[0][:200]) from None
    journal_index = pa.array(np.repeat(np.arange(k, dtype=np.int32), counts))
    columns.update(
        seq=pa.array(np.arange(base + 1, base + 1 + n, dtype=np.int64)),
        journal=pa.DictionaryArray.from_arrays(journal_index,
                                               pa.array([c.journal for c in chunks])),
        jseq=jseq,
        time=columns.pop("time_us").cast(pa.timestamp("us")),
        pid=pa.array(np.repeat(np.array([c.pid for c in chunks], dtype=np.int32), counts)),
        prev=prevs,
        hash=hashes,
    )
    table = pa.table({name: columns[name] for name in AUDIT_COLUMNS})
    # Batches of whole row groups: DuckDB inserts them in parallel without re-packing rows.
    return (pa.Table.from_batches(table.to_batches(max_chunksize=_ROW_GROUP_ROWS)),
            (ends - 1).tolist())


def _insert(con: Tx, batch: pa.Table) -> None:
    con.register("kl_batch", batch)
    try:
        con.execute(_INSERT_SQL)
        con.execute(
            """INSERT INTO usage (key_id, version, action, count, last_time)
               SELECT key_id, version, action, count(*), max(time)
               FROM kl_batch
               WHERE outcome = 'ok' AND version IS NOT NULL AND key_id IS NOT NULL
               GROUP BY ALL
               ON CONFLICT DO UPDATE SET count = usage.count + excluded.count,
                   last_time = greatest(usage.last_time, excluded.last_time)""")
    finally:
        con.unregister("kl_batch")


class _Ingest:
    """One ingest transaction: batches in, bookkeeping and seals updated per journal."""

    def __init__(self, con: Tx, offsets: dict[str, _Offset],
                 check_seal: SealCheck) -> None:
        self.con, self.offsets, self.check_seal = con, offsets, check_seal
        self.base = con.execute("SELECT coalesce(max(seq), 0) FROM audit_log").one()[0]
        self.records = 0
        self.moved: set[str] = set()

    def run(self, todo: list[_Pending]) -> None:
        while todo:
            buf, chunks, todo = _read_batch(todo, self.offsets)
            if not chunks:
                continue
            try:
                self.batch(buf, chunks)
            except _Unreadable:  # take each journal's good lines alone; the rest stays put
                del buf
                for chunk in chunks:
                    self.salvage(chunk)
                # what a capped journal had left continues only where its ingest stopped
                todo = [p for p in todo if p.start == self.offset_of(p.journal)]

    def offset_of(self, journal: str) -> int:
        off = self.offsets.get(journal)
        return off.file_offset if off else 0

    def salvage(self, chunk: _Chunk) -> None:
        """Ingest the lines of ``chunk`` before its first bad one (verification names that)."""
        good = _good_prefix(chunk.path, chunk.file_start, chunk.file_end)
        if good <= chunk.file_start:
            return
        buf, chunks, _ = _read_batch([_Pending(chunk.journal, chunk.pid, chunk.path,
                                               chunk.file_start, good, capped=False)],
                                     self.offsets)
        try:
            if chunks:
                self.batch(buf, chunks)
        except _Unreadable:  # the exact check and the fast parser disagree: leave it all
            pass

    def batch(self, buf: bytearray, chunks: list[_Chunk]) -> None:
        if any(_MALFORMED in c.seals for c in chunks):
            raise _Unreadable("a malformed seal line")
        records = [c for c in chunks if c.end > c.begin]
        if records:
            # Journals in name order, lines in jseq order: seq numbers the batch in
            # (journal, jseq) order without sorting it.
            batch, last_rows = _parse(buf, records, self.base)
            _insert(self.con, batch)
            jseq, hashes = batch.column("jseq"), batch.column("hash")
            for chunk, row in zip(records, last_rows, strict=True):
                off = self.offsets.setdefault(chunk.journal, _Offset(0, 0, ""))
                off.tip_jseq, off.tip_hash = jseq[row].as_py(), hashes[row].as_py()
            self.base += batch.num_rows
            self.records += batch.num_rows
        for chunk in chunks:
            moved = self.offsets.get(chunk.journal)
            if moved is None:  # seal lines without any record: verification reports them
                continue
            moved.file_offset = chunk.file_end
            self.take_seals(chunk, moved)
            self.moved.add(chunk.journal)

    def take_seals(self, chunk: _Chunk, off: _Offset) -> None:
        """Keep the newest seal whose MAC the HSM confirms; note the first one it refutes.
        One valid seal proves every record before it, so older seals need no HSM call."""
        for jseq, tip, mac in reversed(chunk.seals):
            if off.seal_jseq is not None and jseq <= off.seal_jseq:
                return
            if self.check_seal(chunk.journal, jseq, tip, mac):
                off.seal_jseq, off.seal_hash, off.seal_mac = jseq, tip, mac.hex()
                return
            off.bad_seal_jseq = min(jseq, off.bad_seal_jseq or jseq)

    def store_offsets(self) -> None:
        names = sorted(self.moved)
        columns = {name: [getattr(self.offsets[j], name) for j in names]
                   for name in _OFFSET_COLUMNS}
        self.con.register("kl_offsets", pa.table({
            "journal": names, **columns}, schema=pa.schema(
                [("journal", pa.string()), ("file_offset", pa.int64()), ("tip_jseq", pa.int64()),
                 ("tip_hash", pa.string()), ("seal_jseq", pa.int64()), ("seal_hash", pa.string()),
                 ("seal_mac", pa.string()), ("bad_seal_jseq", pa.int64())])))
        cols = ", ".join(("journal",) + _OFFSET_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _OFFSET_COLUMNS)
        try:
            self.con.execute(f"INSERT INTO journal_offsets ({cols}) SELECT {cols} FROM kl_offsets "
                             f"ON CONFLICT DO UPDATE SET {updates}")
        finally:
            self.con.unregister("kl_offsets")


def ingest(con: Tx, journal_dir: Path, sign: Signer,
           now: datetime, known: dict[str, int], check_seal: SealCheck) -> IngestResult:
    """Move new complete journal lines into audit_log; runs inside the caller's transaction.

    Seal lines are taken out before parsing; the newest valid seal of each journal is kept in
    journal_offsets. Lines that do not parse stop only their own journal (its lines before
    them are ingested); verification names them.
    """
    offsets = read_offsets(con)
    todo = _pending(journal_dir, offsets, known)
    result = IngestResult()
    if not todo:
        return result
    run = _Ingest(con, offsets, check_seal)
    run.run(todo)
    result.records = run.records
    if not run.moved:
        return result
    run.store_offsets()
    for journal in run.moved:
        known[journal] = offsets[journal].file_offset
    result.journals = len(run.moved)
    if run.records:
        result.checkpoint = write_checkpoint(con, sign, now)
    return result


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
                   fail: Callable[[str, int | None], None], report: VerifyReport) -> None:
    """The journals against the ledger: foreign files, truncated or unreadable journals, seals
    (again in the HSM), and records no valid seal covers (unproven)."""
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
            report.accepted.append(f"records {first}-{due} of journal {name} are unproven "
                                   "and were accepted by an admin")
            continue
        first = max(first, accepted.get(name, 0) + 1)
        fail(f"journal {name}: records {first}-{due} are unproven (no valid HSM seal covers "
             "them): either its process stopped before sealing them (e.g. it was killed) or "
             "the lines were not written by keyledger (forged); after investigating, an admin "
             f"can accept them with accept_unproven({name!r}, {due}, reason)",
             seq_of(name, first))


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
    cursor = getattr(con, "con", con).cursor()
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
        check_journals(con, journals, fail, report)
    if bad and report.first_bad is None:
        first = min(bad)
        rec = con.execute("SELECT seq, journal, jseq, time, action, key FROM audit_log "
                          "WHERE seq = ?", [first]).fetchone()
        if rec:
            report.first_bad = dict(zip(("seq", "journal", "jseq", "time", "action", "key"),
                                        rec, strict=True))
    return report
