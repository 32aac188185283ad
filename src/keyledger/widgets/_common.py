"""Shared pieces of the notebook widgets: safe calls, status lines, escaped HTML tables, paging."""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import ipywidgets as W
import pandas as pd

from ..display import OUTCOME_COLORS, ROTATION_COLORS, SEVERITY_COLORS, text_color_on
from ..errors import KeyLedgerError

log = logging.getLogger("keyledger.widgets")
T = TypeVar("T")

# Text colours follow the notebook theme (JupyterLab's CSS variables; light fallbacks elsewhere).
OK_COLOUR = "var(--jp-success-color1, #1a7f37)"
ERROR_COLOUR = "var(--jp-error-color1, #cf222e)"
MUTED_COLOUR = "var(--jp-ui-font-color2, #57606a)"
WARN_COLOUR = "var(--jp-warn-color1, #9a6700)"
RULE_COLOUR = "var(--jp-border-color1, #d0d7de)"
HIGHLIGHT_BACKGROUND = "var(--jp-layout-color2, #fff8c5)"
# Fallback palettes: display's (which keyledger.charts re-exports), so tables match charts.
_ROTATION_COLOURS, _SEVERITY_COLOURS = dict(ROTATION_COLORS), dict(SEVERITY_COLORS)
ALL = "(all)"


def palette(name: str) -> dict[str, str]:
    """A colour palette of keyledger.charts (ROTATION_COLORS, SEVERITY_COLORS, ...) if available."""
    try:
        from .. import charts  # imported lazily: optional for the widgets
        found = getattr(charts, name, None)
        if isinstance(found, Mapping) and found:
            return dict(found)
    except Exception:  # noqa: BLE001 - charts missing or broken: the widgets still work
        pass
    return dict(_ROTATION_COLOURS if name == "ROTATION_COLORS" else _SEVERITY_COLOURS)


# -- status line and safe calls ----------------------------------------------------------------
def message_html(text: str, kind: str = "info") -> str:
    colour = {"ok": OK_COLOUR, "error": ERROR_COLOUR, "warn": WARN_COLOUR}.get(kind, MUTED_COLOUR)
    weight = "600" if kind in ("ok", "error") else "400"
    return (f"<div style='color:{colour};font-weight:{weight};white-space:pre-wrap'>"
            f"{html.escape(text)}</div>")


def set_status(widget: W.HTML, text: str, kind: str = "info") -> None:
    widget.value = message_html(text, kind)


def error_text(exc: BaseException) -> str:
    """The words a person sees for a failure: a keyledger error's own message, or a short
    line naming an unexpected error (never a traceback)."""
    if isinstance(exc, KeyLedgerError):
        return str(exc) or type(exc).__name__
    first = (str(exc).splitlines() or [""])[0][:300]
    return (f"unexpected error ({type(exc).__name__}{': ' + first if first else ''}); "
            "details are in the keyledger.widgets log")


def attempt(status: W.HTML | None, fn: Callable[..., T], *args: Any, what: str = "",
            **kwargs: Any) -> tuple[bool, T | None]:
    """Call ``fn``; on failure show the error as words in ``status`` and return (False, None).

    KeyLedgerError: its message. Anything else: a short message, and the traceback goes to the
    ``keyledger.widgets`` logger (never into the notebook output).
    """
    try:
        return True, fn(*args, **kwargs)
    except KeyLedgerError as exc:
        text = error_text(exc)
    except Exception as exc:  # noqa: BLE001 - a widget callback must never show a traceback
        log.exception("keyledger widget: %s failed", what or getattr(fn, "__name__", "call"))
        text = error_text(exc)
    if status is not None:
        set_status(status, f"{what}: {text}" if what else text, "error")
    return False, None


def tried(status: W.HTML | None, fn: Callable[..., T | None], *args: Any, what: str = "",
          **kwargs: Any) -> T | None:
    """``attempt`` for a call that returns a value (never None): the value, or None when the
    call failed (and ``status`` says why)."""
    return attempt(status, fn, *args, what=what, **kwargs)[1]


# -- display ----------------------------------------------------------------------------------
class WidgetView:
    """Base of the widget classes: ``.widget`` is the root ipywidget; displaying the object
    displays it."""

    widget: W.Widget
    status: W.HTML

    def _safe(self, fn: Callable[..., Any], what: str = "") -> Callable[..., None]:
        """``fn`` as a widget callback: whatever it raises ends up as words in ``status``."""
        def callback(*args: Any) -> None:
            attempt(getattr(self, "status", None), fn, *args, what=what)
        return callback

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        return self.widget._repr_mimebundle_(include=include, exclude=exclude)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def show_object(out: W.Output, obj: Any) -> None:
    """Replace ``out``'s content with ``obj`` (e.g. an Altair chart), kernel or not. Charts
    are drawn by an offline renderer (``keyledger.notebook.ensure_setup``), never from a CDN."""
    from ..notebook import ensure_setup

    ensure_setup()
    data: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    bundle = getattr(obj, "_repr_mimebundle_", None)
    if bundle is not None:
        result = bundle(include=None, exclude=None)
        if isinstance(result, tuple):
            data, metadata = dict(result[0] or {}), dict(result[1] or {})
        elif isinstance(result, Mapping):
            data = dict(result)
    data.setdefault("text/plain", repr(obj))
    out.outputs = ({"output_type": "display_data", "data": data, "metadata": metadata},)


# -- formatting -------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """A cell value as short text (times to the minute in UTC, empties as blank)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
    if isinstance(value, pd.Timestamp | type(pd.NaT)):
        if pd.isna(value):
            return ""
        return value.strftime("%Y-%m-%d %H:%M")
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def html_table(df: pd.DataFrame, columns: Iterable[str] | Mapping[str, str], *,
               cell_style: Callable[[str, Any], str] | None = None, empty: str = "nothing to show",
               highlight: Callable[[pd.Series], bool] | None = None) -> str:
    """``df`` as an escaped HTML table of ``columns`` (a list, or {column: heading})."""
    cols = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    if df is None or df.empty:
        return message_html(empty)
    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{html.escape(h)}</th>"
                   for h in cols.values())
    rows = []
    for _, row in df.iterrows():
        cells = []
        for col in cols:
            value = row.get(col)
            style = cell_style(col, value) if cell_style else ""
            cells.append(f"<td style='padding:2px 8px;{style}'>{html.escape(fmt(value))}</td>")
        bg = f" style='background:{HIGHLIGHT_BACKGROUND}'" if highlight is not None and highlight(row) else ""
        rows.append(f"<tr{bg}>{''.join(cells)}</tr>")
    return ("<table style='border-collapse:collapse;font-size:12px'>"
            f"<thead><tr style='border-bottom:1px solid {RULE_COLOUR}'>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def outcome_style(value: object) -> str:
    """Cell style for an audit outcome: the charts' colour (display.OUTCOME_COLORS) as the
    background with a contrasting text colour, so denied/failed read the same in tables and
    charts, in light and dark themes; "ok" stays plain."""
    colour = OUTCOME_COLORS.get(str(value))
    if colour is None or value == "ok":
        return ""
    return f"background:{colour};color:{text_color_on(colour)};font-weight:600"


def section(title: str, body_html: str) -> str:
    return (f"<h4 style='margin:8px 0 4px 0'>{html.escape(title)}</h4>{body_html}")


def dl(items: Iterable[tuple[str, Any]]) -> str:
    """A compact escaped definition list."""
    rows = "".join(f"<tr><td style='color:{MUTED_COLOUR};padding:1px 8px 1px 0'>{html.escape(k)}"
                   f"</td><td style='padding:1px 0'>{html.escape(fmt(v))}</td></tr>"
                   for k, v in items)
    return f"<table style='font-size:12px'>{rows}</table>"


def range_label(offset: int, shown: int, total: int, noun: str = "records") -> str:
    """"records 51–100 of 1,234,567" (or "no records match")."""
    if total <= 0 or shown <= 0:
        return f"no {noun} match"
    return f"{noun} {offset + 1:,}–{offset + shown:,} of {total:,}"


class Pager:
    """Prev/next buttons and a label over ``total`` items in pages of ``page_size``."""

    def __init__(self, page_size: int, on_change: Callable[[], None], noun: str = "records"):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError("page_size must be a positive whole number")
        self.page_size, self.noun, self._on_change = page_size, noun, on_change
        self.offset, self.total = 0, 0
        self.prev = W.Button(description="◀ prev", layout=W.Layout(width="80px"),
                             tooltip="previous page")
        self.next = W.Button(description="next ▶", layout=W.Layout(width="80px"),
                             tooltip="next page")
        self.label = W.HTML()
        self.prev.on_click(lambda _b: self.move(-1))
        self.next.on_click(lambda _b: self.move(+1))
        self.box = W.HBox([self.prev, self.next, self.label])
        self.update(0)

    @property
    def page(self) -> int:
        return self.offset // self.page_size

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.page_size))

    def move(self, step: int) -> None:
        new = self.offset + step * self.page_size
        if 0 <= new < max(self.total, 1):
            self.offset = new
            self._on_change()

    def reset(self) -> None:
        self.offset = 0

    def clamp(self, total: int) -> None:
        """Keep the offset on the last page when the total shrank."""
        self.total = total
        if self.offset >= total:
            self.offset = max(0, (math.ceil(total / self.page_size) - 1) * self.page_size)

    def update(self, shown: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.prev.disabled = self.offset <= 0
        self.next.disabled = self.offset + self.page_size >= self.total
        self.label.value = (f"<span style='padding:0 8px'>"
                            f"{html.escape(range_label(self.offset, shown, self.total, self.noun))}"
                            f"</span>")

    @property
    def text(self) -> str:
        return range_label(self.offset, min(self.page_size, self.total - self.offset), self.total,
                           self.noun)


def options_with_all(values: Iterable[Any]) -> list[str]:
    return [ALL, *sorted({str(v) for v in values if v is not None and fmt(v) != ""})]


def chosen(dropdown: W.Dropdown) -> str | None:
    """A filter dropdown's value, or None for "(all)"."""
    value = dropdown.value
    return None if value in (None, ALL, "") else value
