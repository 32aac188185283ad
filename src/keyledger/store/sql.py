"""Checks of SQL text that callers hand in: the one read-only check (``KeyLedger.query`` and
compliance rules) and the ``$name`` parameters a statement uses."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import duckdb

_STRING_RE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_COMMENT_RE = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_PARAM_REF_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_POSITIONAL_RE = re.compile(r"\$\d+|\?")


@dataclass(frozen=True)
class ReadOnlyCheck:
    """What a SQL text holds: ``ok`` when it is exactly one SELECT-like statement (SELECT,
    FROM, WITH, DESCRIBE, SUMMARIZE)."""

    parse_error: str | None  # the first line of DuckDB's message, if it does not parse
    kinds: str  # the statement kinds found, e.g. "SELECT" or "SELECT, INSERT" or "nothing"

    @property
    def ok(self) -> bool:
        return self.parse_error is None and self.kinds == "SELECT"


@functools.lru_cache(maxsize=1024)  # rules and dashboards check the same texts again and again
def check_read_only(sql: str) -> ReadOnlyCheck:
    try:
        sql.encode()  # DuckDB takes UTF-8: a lone surrogate ('\udcff') made it raise TypeError
    except UnicodeEncodeError as exc:
        return ReadOnlyCheck(f"the text is not valid Unicode (a lone surrogate at character "
                             f"{exc.start + 1})", "")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        return ReadOnlyCheck(str(exc).splitlines()[0][:300], "")
    if len(statements) == 1 and statements[0].type == duckdb.StatementType.SELECT:
        return ReadOnlyCheck(None, "SELECT")
    return ReadOnlyCheck(None, ", ".join(s.type.name for s in statements) or "nothing")


def without_final_semicolon(sql: str) -> str:
    """One statement's text without the ``;`` that may end it (comments after it go too), so
    it can stand as a subquery; a trailing ``--`` comment is left for the caller to end with a
    newline."""
    tokens = [t for t in duckdb.tokenize(sql) if t[1] != duckdb.token_type.comment]
    if tokens and tokens[-1][1] == duckdb.token_type.operator and sql[tokens[-1][0]] == ";":
        return sql[:tokens[-1][0]]
    return sql


def _bare(sql: str) -> str:
    """The SQL without comments, string literals emptied."""
    return _STRING_RE.sub("''", _COMMENT_RE.sub(" ", sql))


def referenced_parameters(sql: str) -> list[str]:
    """``$name`` references outside string literals and comments, in order, without repeats."""
    seen: list[str] = []
    for name in _PARAM_REF_RE.findall(_bare(sql)):
        if name not in seen:
            seen.append(name)
    return seen


def positional_parameters(sql: str) -> bool:
    """Whether the SQL uses ``?`` or ``$1`` parameters outside literals and comments."""
    return bool(_POSITIONAL_RE.search(_bare(sql)))
