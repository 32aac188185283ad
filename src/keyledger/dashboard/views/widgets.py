"""Building blocks of the dashboard pages: cards, tables, charts, KPI tiles and trend arrows."""

from __future__ import annotations

from typing import Any

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ... import charts as klc
from ...display import GREEN, RED

# Vega-Lite version of the JS bundled with Panel: specs say so (no "newer spec" console warning).
VEGA_LITE_SCHEMA = "https://vega.github.io/schema/vega-lite/v6.3.0.json"

CARD_CSS = """
:host {
  border-radius: 6px;
  box-shadow: rgba(50, 50, 93, 0.18) 0px 3px 8px -2px, rgba(0, 0, 0, 0.18) 0px 2px 5px -2px;
  padding: 6px 12px 10px 12px;
  margin: 6px;
  background: var(--panel-background-color, #fff);
}
"""

def chart_spec(builder: str, df: pd.DataFrame, **kwargs: Any) -> dict:
    """A Vega-Lite dict from ``keyledger.charts.<builder>``, sized for a dashboard card."""
    # charts.py builds valid specs (its tests validate them); skipping Altair's schema
    # validation here saves ~0.1 s per chart on every refresh.
    spec = getattr(klc, builder)(df, width="container", **kwargs).to_dict(validate=False)
    spec["$schema"] = VEGA_LITE_SCHEMA
    # fit the width only: heights are the builders' own (often a step per bar, which "fit"
    # would drop with a console warning)
    spec["autosize"] = {"type": "fit-x", "contains": "padding"}
    # room on the left: the browser draws axis labels a little wider than Vega measured them,
    # which clipped their first letter ("SO/IEC 27001" for "ISO/IEC 27001")
    spec["padding"] = {"left": 20, "top": 5, "right": 5, "bottom": 5}
    return spec


def card(title: str | None, *objects: Any, css: str | None = None, **kwargs: Any) -> pn.Column:
    """A white box; ``title`` (None for charts, which carry their own) as a heading."""
    classes = ["kl-card"] + ([css] if css else [])
    head = [pn.pane.Markdown(f"#### {title}", margin=(0, 5))] if title is not None else []
    return pn.Column(*head, *objects,
                     stylesheets=[CARD_CSS], css_classes=classes,
                     sizing_mode=kwargs.pop("sizing_mode", "stretch_width"), **kwargs)


# Column headings with units (times are UTC everywhere).
TITLES = {
    "rotation_status": "rotation", "days_to_due": "days to due (d)",
    "latest_version": "version", "next_rotation_due": "rotation due (UTC)",
    "deletion_due": "deletion due (UTC)", "due": "due (UTC)", "time": "time (UTC)",
    "first_seen": "first seen (UTC)", "last_seen": "last seen (UTC)",
    "requested_at": "requested (UTC)", "expires_at": "expires (UTC)",
    "last_decrypt": "last decrypt (UTC)", "last_used": "last used (UTC)",
    "below_min_decryption": "below min. decryption version", "rule_id": "rule",
    "operations": "operations (calls)", "encryptions": "encryptions (calls)",
    "decryptions": "decryptions (calls)", "count": "calls", "baseline": "baseline (calls/day)",
}


def table(css: str, *, page_size: int | None = 15, columns: list[str] | None = None,
          color_column: str | None = None, colors: dict[str, str] | None = None,
          **kwargs: Any) -> pn.widgets.Tabulator:
    """A read-only Tabulator; ``color_column`` values are coloured with ``colors``."""
    # "basic" vertical rendering: Tabulator's virtual renderer sizes itself from the element,
    # which is 0 while a tab is hidden, and then intermittently showed no rows at all; pages
    # here are small (at most 50 rows), so rendering every row of a page costs nothing.
    opts: dict[str, Any] = dict(disabled=True, show_index=False, sizing_mode="stretch_width",
                                css_classes=["kl-table", css], layout="fit_data_stretch",
                                titles=TITLES, theme_classes=["table-sm"],
                                configuration={"renderVertical": "basic"})
    if page_size:
        opts.update(pagination="local", page_size=page_size)
    if kwargs.pop("full_pages", False) and page_size:
        # A fixed height: a paginated table laid out while its tab is hidden otherwise keeps
        # a zero-height body when shown (rows present but invisible; seen intermittently).
        opts["height"] = 95 + 35 * page_size
    opts.update(kwargs)
    widget = pn.widgets.Tabulator(pd.DataFrame(columns=columns or []), **opts)
    # registered once; Tabulator re-applies it to every new value (style is None only without one)
    if color_column and colors and widget.style is not None:
        widget.style.map(lambda v: f"color: {colors[v]}; font-weight: bold" if v in colors
                         else "", subset=[color_column])
    return widget


class ChartPane(Viewer):
    """A Vega chart from a ``keyledger.charts`` builder, or a short note when charts are
    unavailable; ``update(df)`` swaps the data."""

    builder = param.String()

    def __init__(self, builder: str, css: str, **kwargs: Any) -> None:
        super().__init__(builder=builder)
        self._kwargs = kwargs
        self.pane = pn.pane.Vega(None, sizing_mode="stretch_width", css_classes=["kl-chart", css])

    def update(self, df: pd.DataFrame, **kwargs: Any) -> None:
        self.pane.object = chart_spec(self.builder, df, **{**self._kwargs, **kwargs})

    def __panel__(self) -> pn.pane.Vega:
        return self.pane


class KPI(Viewer):
    """A number with its comparison underneath (the "trend" line)."""

    def __init__(self, name: str, slug: str, *, string: bool = False,
                 fmt: str = "{value:,.0f}") -> None:
        super().__init__()
        common: dict[str, Any] = dict(label=name, font_size="30pt", title_size="11pt",
                                      margin=(0, 5))
        self.indicator: pn.indicators.String | pn.indicators.Number
        if string:
            self.indicator = pn.indicators.String(value="–", **common)
        else:
            self.indicator = pn.indicators.Number(value=0, format=fmt, **common)
        self.delta = pn.pane.Markdown("", margin=(0, 8), css_classes=["kl-kpi-delta"])
        self._layout = pn.Column(self.indicator, self.delta, stylesheets=[CARD_CSS], width=196,
                                 min_height=150, css_classes=["kl-kpi", f"kl-kpi-{slug}"])

    def set(self, value: Any, delta: str, color: str | None = None) -> None:
        self.indicator.value = value
        self.indicator.default_color = color or "currentcolor"
        self.delta.object = delta

    def __panel__(self) -> pn.Column:
        return self._layout


def arrow(change: float, *, higher_is_worse: bool = True) -> str:
    """▲/▼ with the colour that means good or bad for this metric."""
    if change == 0:
        return "<span style='color:#7f7f7f'>■ no change</span>"
    worse = (change > 0) == higher_is_worse
    color = RED if worse else GREEN
    sign = "▲" if change > 0 else "▼"
    return f"<span style='color:{color}'>{sign} {abs(change):,.0f}</span>"
