"""KeyGrid: a compact, scrollable, sortable grid with clickable rows (an anywidget).

The grid's JavaScript and CSS (``grid.js``, ``grid.css``) ship in the package and reach the
browser through the kernel, so it draws with no network (no CDN). Rows travel as a synced list
of JSON-safe dicts (``json_rows``: times as ISO strings in UTC, missing values as ``None``, never
NaN or bytes); everything else is a trait the browser and Python both read and write:

- ``selected``: the key (``key_field`` value) of the clicked row, or ``None``;
- ``sort``: ``{"column": field, "descending": bool}`` or ``None``; a header click sets it;
- ``columns``: ``[{"field", "title", "width", "sortable"}]``; ``colors``: ``{field: {value:
  css colour}}`` for cells drawn in a status colour; ``height``: the box height in px.

Text never wraps (ellipsis, the full value in the tooltip); colours come from JupyterLab's CSS
variables, so the grid reads in light and dark themes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import pandas as pd
import traitlets as T

from ._common import fmt

_HERE = Path(__file__).resolve().parent


def json_value(value: Any) -> Any:
    """One cell as a JSON-safe value: int/float/bool/str, ISO time (UTC) or None; anything else
    as its short text (``fmt``). NaN, NaT and <NA> become None; bytes are never sent."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return f"({len(value)} bytes)"
    if isinstance(value, datetime | np.datetime64 | pd.Timestamp):
        stamp = pd.Timestamp(value)
        if pd.isna(stamp):
            return None
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return stamp.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if not isinstance(value, Mapping | list | tuple | set | np.ndarray):
        try:
            if pd.isna(value):
                return None
        except (TypeError, ValueError):
            pass
    return fmt(value) or None


def json_rows(frame: pd.DataFrame, fields: Iterable[str]) -> list[dict[str, Any]]:
    """``frame``'s ``fields`` as a list of JSON-safe dicts (a missing column gives None)."""
    fields = list(fields)
    if frame is None or frame.empty:
        return []
    present = [f for f in fields if f in frame.columns]
    out = []
    for values in frame[present].itertuples(index=False, name=None):
        row = dict.fromkeys(fields)
        row.update((f, json_value(v)) for f, v in zip(present, values, strict=True))
        out.append(row)
    return out


def sorted_rows(rows: list[dict[str, Any]], column: str, descending: bool = False
                ) -> list[dict[str, Any]]:
    """``rows`` by ``column`` (numbers by value, text case-insensitively), stable, with missing
    values last in either direction."""
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]

    def key(row: dict[str, Any]) -> tuple[int, float, str]:
        value = row[column]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (0, float(value), "")
        return (1, 0.0, str(value).lower())

    return sorted(present, key=key, reverse=descending) + missing


def column_specs(columns: Mapping[str, str], widths: Mapping[str, int] | None = None,
                 unsortable: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``{field: title}`` as the grid's ``columns`` trait (default width 100 px)."""
    widths, unsortable = widths or {}, set(unsortable)
    return [{"field": f, "title": t, "width": int(widths.get(f, 100)),
             "sortable": f not in unsortable} for f, t in columns.items()]


class KeyGrid(anywidget.AnyWidget):
    """A fixed-height grid: sticky header, scrolls both ways inside its box, a header click
    sorts, a row click selects. ``sort_rows`` (Python side, not synced): when True the grid
    reorders its own ``rows`` on a sort change; an owner that sorts (and pages) the data
    itself, like ``KeyInventory``, turns it off and reacts to ``sort``."""

    _esm = _HERE / "grid.js"
    _css = _HERE / "grid.css"

    rows = T.List(T.Dict()).tag(sync=True)
    columns = T.List(T.Dict()).tag(sync=True)
    key_field = T.Unicode("name").tag(sync=True)
    selected = T.Unicode(None, allow_none=True).tag(sync=True)
    sort = T.Dict(None, allow_none=True).tag(sync=True)
    colors = T.Dict().tag(sync=True)
    height = T.Int(320).tag(sync=True)
    empty = T.Unicode("nothing to show").tag(sync=True)

    def __init__(self, *, sort_rows: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sort_rows = sort_rows
        self.observe(self._resort, names="sort")

    @property
    def names(self) -> tuple[str | None, ...]:
        """The key of each row, in the order shown (None for a row without one)."""
        return tuple(r.get(self.key_field) for r in self.rows)

    @T.validate("sort")
    def _valid_sort(self, proposal: dict) -> dict | None:
        value = proposal["value"]
        if not value:
            return None
        if not isinstance(value.get("column"), str):
            raise T.TraitError("sort must look like {'column': 'name', 'descending': False}")
        return {"column": value["column"], "descending": bool(value.get("descending", False))}

    def _resort(self, change: dict) -> None:
        sort = change["new"]
        if self.sort_rows and sort:
            self.rows = sorted_rows(list(self.rows), sort["column"], sort["descending"])


__all__ = ["KeyGrid", "column_specs", "json_rows", "json_value", "sorted_rows"]
