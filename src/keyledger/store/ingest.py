r"""Batch ingest of the journals into the audit ledger in DuckDB.

Ingest moves the complete lines that journals gained since the last ingest into ``audit_log``
in one transaction (Arrow batches, no per-row INSERT), updates usage counters, keeps each
journal's newest valid seal, and appends a signed checkpoint (``checkpoints.py``).

Journal lines are JSON arrays (``journal.LINE_FIELDS``). They are parsed with Arrow's CSV
reader, which is several times faster than a JSON parser here: the writer's JSON string
encoding is CSV with ``"`` quotes and ``\`` escapes, except for the escapes ``\b \f \n \r \t
\uXXXX``; the rare lines that contain one of those are decoded again with ``json.loads``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoints import Newest, Signer, newest, tips_digest, write_checkpoint
from .db import Tx
from .journal import (
    LINE_FIELDS,
    SEAL_PREFIX,
    SUFFIX,
    genesis,
    journal_pid,
    line_problem,
    parse_seal,
    read_range,
)
from .offsets import OFFSET_COLUMNS, Offset, journal_files, read_offsets, tail_intact
from .seals import SealCheck

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

_STRING_FIELDS = ("principal", "action", "key", "key_id", "outcome", "error", "detail",
                  "context")
_JSON_ONLY_ESCAPE = re.compile(rb"\\[bfnrtu]")
_BATCH_BYTES = 128 << 20  # journal bytes per Arrow batch: bounds the memory an ingest needs
_ROW_GROUP_ROWS = 122_880  # DuckDB's row group size


# numpy and pyarrow are imported by the first ingest that has records, not by ``import
# keyledger`` (every CLI run and worker pays for that). Arrays are made with
# ``Array.from_buffers``, never ``pa.array``: that imports pandas (pyarrow 26), which a
# process that hands out no DataFrame never needs.
@functools.cache
def _csv_options() -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    return (pacsv.ReadOptions(column_names=list(LINE_FIELDS), block_size=1 << 22),
            pacsv.ParseOptions(delimiter=",", quote_char='"', escape_char="\\",
                               double_quote=False, newlines_in_values=False,
                               ignore_empty_lines=False),
            pacsv.ConvertOptions(
                column_types={name: pa.int64() if name in ("time_us", "version") else pa.string()
                              for name in LINE_FIELDS},  # jseq arrives as "[123", hash as "<hex>]"
                null_values=["null"], strings_can_be_null=True, quoted_strings_can_be_null=False))


@functools.cache
def _pool() -> pa.MemoryPool:
    """glibc malloc: with Arrow's default (mimalloc) the first touch of fresh memory made
    parsing a large batch about twice as slow."""
    import pyarrow as pa

    return pa.system_memory_pool()


def _int_array(values: np.ndarray) -> pa.Array:
    """A numpy integer array as an Arrow array (no copy)."""
    import numpy as np
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def _bits(flags: np.ndarray) -> pa.Buffer:
    import numpy as np
    import pyarrow as pa

    return pa.py_buffer(np.packbits(flags.astype(bool), bitorder="little"))


def _string_array(values: list[str | None]) -> pa.Array:
    """Python strings (None: null) as an Arrow string array."""
    import numpy as np
    import pyarrow as pa

    data = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    valid = np.array([v is not None for v in values], dtype=bool)
    return pa.Array.from_buffers(pa.string(), len(data),
                                 [None if valid.all() else _bits(valid), pa.py_buffer(offsets),
                                  pa.py_buffer(b"".join(data))])

AUDIT_COLUMNS = ("seq", "journal", "jseq", "time", "principal", "action", "key", "key_id",
                 "version", "outcome", "error", "detail", "context", "pid", "prev", "hash")
_INSERT_SQL = (f"INSERT INTO audit_log ({', '.join(AUDIT_COLUMNS)}) "
               f"SELECT {', '.join(AUDIT_COLUMNS)} FROM kl_batch")


@dataclass
class IngestResult:
    records: int = 0
    journals: int = 0
    checkpoint: int | None = None
    checkpoint_hash: str = ""


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


def backlog_bytes(journal_dir: Path, known: dict[str, int]) -> int:
    """Journal bytes (stat only) past what this process last ingested, over every journal."""
    total = 0
    try:
        with os.scandir(journal_dir) as it:
            for entry in it:
                if entry.name.endswith(SUFFIX):
                    total += max(0, entry.stat().st_size - known.get(entry.name[:-len(SUFFIX)], 0))
    except FileNotFoundError:
        return 0
    return total


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



def _pending(journal_dir: Path, offsets: dict[str, Offset],
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


def _read_batch(todo: list[_Pending], offsets: dict[str, Offset]
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
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

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
    mask_arr = pa.Array.from_buffers(pa.bool_(), len(mask), [None, _bits(mask)])
    for name in _STRING_FIELDS:
        columns[name] = pc.replace_with_mask(columns[name], mask_arr,
                                             _string_array(values[name]),
                                             memory_pool=_pool())


def _hash_columns(column: pa.ChunkedArray, starts: list[str], first_rows: np.ndarray
                  ) -> tuple[pa.Array, pa.Array]:
    """``hash`` and ``prev`` as string views into the reader's buffers (no copy of the hex).

    The reader gives ``<64 hex>]`` for the last field of a line. prev[i] = hash[i - 1], except
    at ``first_rows``, whose prev is the matching entry of ``starts`` (the stored tips).
    """
    import numpy as np
    import pyarrow as pa

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
    import pyarrow as pa
    import pyarrow.csv as pacsv

    _, parse, convert = _csv_options()
    return pacsv.read_csv(pa.BufferReader(pa.py_buffer(data)), read_options=options,
                          parse_options=parse, convert_options=convert,
                          memory_pool=_pool())


def _parse(buf: bytearray, chunks: list[_Chunk], base: int) -> tuple[pa.Table, list[int]]:
    """Journal lines -> an Arrow table with audit_log's columns (seq from ``base + 1``), and
    the row of each chunk's last line."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    pool = _pool()
    data = memoryview(buf)
    counts = np.array([buf.count(b"\n", c.begin, c.end) for c in chunks], dtype=np.int64)
    ends = np.cumsum(counts)
    n = int(ends[-1])
    k = len(chunks)
    try:
        try:
            raw = _read_csv(data, _csv_options()[0])
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
        columns = {name: raw.column(name).combine_chunks(memory_pool=pool)
                   for name in _STRING_FIELDS + ("time_us", "version")}
        if _JSON_ONLY_ESCAPE.search(data):
            _json_fallback(columns, data)
        jseq = pc.cast(pc.utf8_slice_codeunits(raw.column("jseq"), 1, memory_pool=pool),
                       pa.int64(), memory_pool=pool).combine_chunks(memory_pool=pool)
        # prev = the hash of the line before; a chunk's first line links to the stored tip.
        hashes, prevs = _hash_columns(raw.column("hash"), [c.prev for c in chunks],
                                      ends - counts)
    except (pa.ArrowException, ValueError) as exc:
        raise _Unreadable(str(exc).splitlines()[0][:200]) from None
    journal_index = _int_array(np.repeat(np.arange(k, dtype=np.int32), counts))
    columns.update(
        seq=_int_array(np.arange(base + 1, base + 1 + n, dtype=np.int64)),
        journal=pa.DictionaryArray.from_arrays(journal_index,
                                               _string_array([c.journal for c in chunks])),
        jseq=jseq,
        time=columns.pop("time_us").cast(pa.timestamp("us")),
        pid=_int_array(np.repeat(np.array([c.pid for c in chunks], dtype=np.int32), counts)),
        prev=prevs,
        hash=hashes,
    )
    table = pa.table({name: columns[name] for name in AUDIT_COLUMNS})
    # Batches of whole row groups: DuckDB inserts them in parallel without re-packing rows.
    return (pa.Table.from_batches(table.to_batches(max_chunksize=_ROW_GROUP_ROWS)),
            (ends - 1).tolist())


# Usage per (key, version, action): one use per successful record, except a batch record
# (services/batch.py; a rewrap_many record with a key is one chunk of a bulk rewrap), which
# counts the items its detail lists per version ("versions=1:600,2:4") whatever its outcome:
# those items were done in the HSM. Summed by one SELECT over the batch, then written by UPDATE
# (an INSERT for a new triple): an INSERT ... ON CONFLICT over the batch cost ~10-14 ms of CPU
# a round, the SELECT and a one-row UPDATE ~5 ms (bench/ingest_round.py). Not summed in Arrow:
# its group_by imports pyarrow.acero (~55 ms once per process) and ``pa.array`` pandas.
BATCH_ACTIONS = ("encrypt_many", "decrypt_many", "rewrap_many")
_USAGE_SQL = f"""
    SELECT key_id, version, action, sum(n)::BIGINT, max(time) FROM (
        SELECT key_id, version, action, 1 AS n, time FROM kl_batch
        WHERE outcome = 'ok' AND version IS NOT NULL AND key_id IS NOT NULL
          AND action NOT IN {BATCH_ACTIONS}
        UNION ALL
        SELECT key_id, split_part(u, ':', 1)::BIGINT, action, split_part(u, ':', 2)::BIGINT, time
        FROM (SELECT key_id, action, time, unnest(string_split(
                  regexp_extract(detail, 'versions=([0-9:,]+)', 1), ',')) AS u
              FROM kl_batch WHERE action IN {BATCH_ACTIONS} AND key_id IS NOT NULL)
        WHERE u <> '')
    GROUP BY ALL"""
_ROW_STATEMENTS = 2  # up to this many rows change by one UPDATE each, more by one statement
UsageKey = tuple[str, int, str]  # (key_id, version, action)
_USAGE_UPDATE = ("UPDATE usage SET count = count + ?, last_time = greatest(last_time, ?) "
                 "WHERE key_id = ? AND version = ? AND action = ?")
_USAGE_MERGE = """MERGE INTO usage USING (SELECT unnest($k::VARCHAR[]) AS key_id,
        unnest($v::BIGINT[]) AS version, unnest($a::VARCHAR[]) AS action,
        unnest($n::BIGINT[]) AS n, unnest($t::TIMESTAMP[]) AS t) b USING (key_id, version, action)
    WHEN MATCHED THEN UPDATE SET count = usage.count + b.n,
        last_time = greatest(usage.last_time, b.t)
    WHEN NOT MATCHED THEN INSERT (key_id, version, action, count, last_time)
        VALUES (b.key_id, b.version, b.action, b.n, b.t)"""


def add_usage(con: Tx, usage: dict[UsageKey, tuple[int, datetime]]) -> None:
    """Add the counts to the ``usage`` table: a few triples by one-row UPDATEs (an INSERT for a
    triple no row has yet), more by one MERGE."""
    if len(usage) > _ROW_STATEMENTS:
        keys = list(usage)
        con.execute(_USAGE_MERGE, {"k": [k[0] for k in keys], "v": [k[1] for k in keys],
                                   "a": [k[2] for k in keys],
                                   "n": [usage[k][0] for k in keys],
                                   "t": [usage[k][1] for k in keys]})
        return
    for (key_id, version, action), (n, time) in usage.items():
        if not con.execute(_USAGE_UPDATE, [n, time, key_id, version, action]).one()[0]:
            con.execute("INSERT INTO usage (key_id, version, action, count, last_time) "
                        "VALUES (?, ?, ?, ?, ?)", [key_id, version, action, n, time])


def _insert(con: Tx, batch: pa.Table) -> None:
    con.register("kl_batch", batch)
    try:
        con.execute(_INSERT_SQL)
        # records without a key (opens, grants, ...) count no use: skip the aggregate (~3 ms)
        keyless = batch.column("key_id").null_count == batch.num_rows
        usage = {} if keyless else {
            (k, v, a): (n, t) for k, v, a, n, t in con.execute(_USAGE_SQL).fetchall()}
    finally:
        con.unregister("kl_batch")
    add_usage(con, usage)


_OFFSET_TYPES = {"journal": "VARCHAR", "file_offset": "BIGINT", "tip_jseq": "BIGINT",
                 "tip_hash": "VARCHAR", "seal_jseq": "BIGINT", "seal_hash": "VARCHAR",
                 "seal_mac": "VARCHAR", "bad_seal_jseq": "BIGINT"}


class _Ingest:
    """One ingest transaction: batches in, bookkeeping and seals updated per journal."""

    def __init__(self, con: Tx, offsets: dict[str, Offset],
                 check_seal: SealCheck, base: int) -> None:
        self.con, self.offsets, self.check_seal = con, offsets, check_seal
        self.stored = set(offsets)  # the journals journal_offsets has a row for
        self.base = base  # the ledger's newest seq
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
                off = self.offsets.setdefault(chunk.journal, Offset(0, 0, ""))
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

    def take_seals(self, chunk: _Chunk, off: Offset) -> None:
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
        """Write the bookkeeping of the journals this ingest moved: UPDATE the rows that exist
        (one statement per row for a few, else one for all), INSERT the new journals' (no
        ON CONFLICT: an upsert cost ~8-10 ms of CPU a round, a one-row UPDATE ~3 ms)."""
        names = sorted(self.moved)
        old = [j for j in names if j in self.stored]
        if 0 < len(old) <= _ROW_STATEMENTS:
            sets = ", ".join(f"{c} = ?" for c in OFFSET_COLUMNS)
            for j in old:
                self.con.execute(f"UPDATE journal_offsets SET {sets} WHERE journal = ?",
                                 [*(getattr(self.offsets[j], c) for c in OFFSET_COLUMNS), j])
        elif old:
            sets = ", ".join(f"{c} = b.{c}" for c in OFFSET_COLUMNS)
            self.con.execute(f"UPDATE journal_offsets SET {sets} FROM ({self._rows_sql()}) b "
                             "WHERE journal_offsets.journal = b.journal", self._rows(old))
        new = [j for j in names if j not in self.stored]
        if new:
            cols = ", ".join(("journal",) + OFFSET_COLUMNS)
            self.con.execute(f"INSERT INTO journal_offsets ({cols}) {self._rows_sql()}",
                             self._rows(new))

    @staticmethod
    def _rows_sql() -> str:
        """One row per journal: the lists of ``_rows`` side by side (unnest zips them)."""
        return "SELECT " + ", ".join(f"unnest(${c}::{kind}[]) AS {c}"
                                     for c, kind in _OFFSET_TYPES.items())

    def _rows(self, names: list[str]) -> dict[str, list]:
        return {"journal": names, **{c: [getattr(self.offsets[j], c) for j in names]
                                     for c in OFFSET_COLUMNS}}


# Called (in the ingest's transaction) before the ledger is extended, with its newest
# checkpoint and the bookkeeping's tips digest: raises AuditError when they disagree
# (``checkpoints.check_before_extend``).
Guard = Callable[[Newest, str], None]


def _tips(offsets: dict[str, Offset]) -> str:
    return tips_digest([(j, o.tip_jseq, o.tip_hash) for j, o in offsets.items()])


def ingest(con: Tx, journal_dir: Path, sign: Signer, now: datetime, known: dict[str, int],
           check_seal: SealCheck, guard: Guard) -> IngestResult:
    """Move new complete journal lines into audit_log; runs inside the caller's transaction.

    Seal lines are taken out before parsing; the newest valid seal of each journal is kept in
    journal_offsets. Lines that do not parse stop only their own journal (its lines before
    them are ingested); verification names them. A round that finds nothing new reads
    journal_offsets only: no check, no checkpoint, no HSM call. One that does calls ``guard``
    first and writes audit_log, usage, journal_offsets and a checkpoint from what it read
    (no statement that re-reads the ledger).
    """
    offsets = read_offsets(con)
    todo = _pending(journal_dir, offsets, known)
    result = IngestResult()
    if not todo:
        return result
    last = newest(con)
    guard(last, _tips(offsets))
    run = _Ingest(con, offsets, check_seal, last.max_seq or 0)
    run.run(todo)
    result.records = run.records
    if not run.moved:
        return result
    run.store_offsets()
    for journal in run.moved:
        known[journal] = offsets[journal].file_offset
    result.journals = len(run.moved)
    if run.records:
        result.checkpoint, result.checkpoint_hash = write_checkpoint(
            con, sign, now, last, run.records, _tips(offsets))
    return result
