"""Read-only SQL a caller hands in (``KeyLedger.query``): checked, run with a time limit in a
transaction that is always rolled back, with DuckDB file access disabled."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import duckdb

from ..errors import InvalidInput
from .db import Database
from .sql import check_read_only

if TYPE_CHECKING:
    import pandas as pd


def check_query(sql: str) -> None:
    """Accept exactly one SELECT-like statement (SELECT, FROM, WITH, DESCRIBE, SUMMARIZE)."""
    check = check_read_only(sql)
    if check.parse_error is not None:
        raise InvalidInput(f"the query does not parse: {check.parse_error}")
    if not check.ok:
        raise InvalidInput(f"query() runs one read-only SELECT statement; this is {check.kinds}")


def run_query(db: Database, sql: str, params: Sequence[object] | Mapping[str, object] | None,
              limit: float) -> pd.DataFrame:
    """Run a checked query; stop it after ``limit`` seconds (it holds the store meanwhile)."""
    with db.snapshot() as tx:  # file access off: DuckDB's read_csv etc. cannot reach files
        try:
            with _interrupt_after(tx.con, limit) as timer:
                return tx.execute(sql, params if params is not None else []).df()
        except duckdb.Error as exc:
            if timer.fired:
                raise InvalidInput(
                    f"the query was stopped after {limit:g} s; narrow it (a WHERE on "
                    "time, fewer joins), or allow longer with query(..., timeout_s=...) "
                    "or [store] query_timeout_s in keyledger.toml") from None
            raise InvalidInput(f"the query failed: {str(exc).splitlines()[0][:300]}"
                               ) from None


class _Timer:
    fired = False


@contextlib.contextmanager
def _interrupt_after(con: duckdb.DuckDBPyConnection, seconds: float) -> Iterator[_Timer]:
    """Interrupt ``con``'s running statement once ``seconds`` have passed (then ``fired``)."""
    state = _Timer()

    def fire() -> None:
        state.fired = True
        con.interrupt()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield state
    finally:
        timer.cancel()
