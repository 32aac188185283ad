"""ComplianceView: open findings by framework and severity, a heat map, evidence on selection."""

from __future__ import annotations

import html
import importlib
import json
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd

from .. import analytics as ka
from ..display import GREY, badge, text_color
from ._common import (
    ALL,
    MUTED_COLOUR,
    Pager,
    WidgetView,
    chosen,
    dl,
    log,
    message_html,
    options_with_all,
    palette,
    section,
    set_status,
    show_object,
    tried,
)

if TYPE_CHECKING:
    from ..service import KeyLedger


def load_charts() -> Any | None:
    """``keyledger.charts`` if it can be imported, else None (the view works without it)."""
    try:
        return importlib.import_module("keyledger.charts")
    except ImportError:
        return None


class ComplianceView(WidgetView):
    """Open findings of the last stored compliance evaluation (``ledger.findings()``), filtered
    by framework, severity and key, counted per framework x severity (table and heat map).
    "Evaluate now" runs ``ledger.compliance()``; selecting a finding shows its evidence
    (pretty-printed JSON) and remediation.

    Pieces for scripting and tests: ``filters`` (framework, severity, key), ``evaluate_button``,
    ``refresh_button``, ``select`` (findings on the page; values are row numbers of ``frame``),
    ``detail`` (HTML), ``matrix`` (HTML counts), ``chart_output`` (Output) and ``chart`` (the
    Altair chart, or None), ``findings`` (every open finding), ``frame`` (after filters),
    ``status`` and ``refresh()``.
    """

    def __init__(self, ledger: KeyLedger, *, page_size: int = 100) -> None:
        self.ledger = ledger
        self.findings = pd.DataFrame()
        self.frame = pd.DataFrame()
        self.chart: Any = None
        self._busy = False

        dd = dict(layout=W.Layout(width="240px"), style={"description_width": "75px"})
        self.filters: dict[str, W.Dropdown] = {
            "framework": W.Dropdown(description="framework", options=[ALL], **dd),
            "severity": W.Dropdown(description="severity", options=[ALL, *ka.SEVERITY_ORDER],
                                   **dd),
            "key": W.Dropdown(description="key", options=[ALL], **dd),
        }
        self.evaluate_button = W.Button(description="Evaluate now", button_style="primary",
                                        tooltip="run every compliance rule now and store the run",
                                        layout=W.Layout(width="130px"))
        self.refresh_button = W.Button(description="Refresh", icon="refresh",
                                       tooltip="reload the last stored evaluation",
                                       layout=W.Layout(width="100px"))
        self.status = W.HTML()
        self.summary = W.HTML()
        self.matrix = W.HTML()
        self.chart_output = W.Output()
        self.select = W.Select(options=[], rows=12, layout=W.Layout(width="100%"))
        self.detail = W.HTML(value=message_html("select a finding to see its evidence"))
        self.pager = Pager(page_size, self._safe(self._render_page), noun="findings")

        for w in self.filters.values():
            w.observe(self._safe(self._filters_changed), names="value")
        self.select.observe(self._safe(self._selected), names="value")
        self.evaluate_button.on_click(self._safe(lambda _b: self.evaluate()))
        self.refresh_button.on_click(self._safe(lambda _b: self.refresh()))

        f = self.filters
        self.widget = W.VBox([
            W.HBox([self.evaluate_button, self.refresh_button, self.summary]),
            self.status,
            W.HBox([self.matrix, self.chart_output]),
            W.HBox([f["framework"], f["severity"], f["key"]]),
            self.pager.box,
            self.select,
            self.detail,
        ])
        self.refresh()

    # -- public -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Reload the open findings of the last stored evaluation."""
        df = tried(self.status, self.ledger.findings, what="loading findings")
        if df is None:
            return
        self.findings = _ordered(df)
        self._busy = True
        try:
            for name in ("framework", "key"):
                widget = self.filters[name]
                options = options_with_all(df[name]) if len(df) else [ALL]
                keep = widget.value if widget.value in options else ALL
                widget.options = options
                widget.value = keep
        finally:
            self._busy = False
        self._render_overview()
        self._apply(reset=False)

    def evaluate(self) -> None:
        """Evaluate the rules now (``ledger.compliance()``), then show the fresh findings."""
        set_status(self.status, "evaluating…")
        df = tried(self.status, self.ledger.compliance, what="evaluate")
        if df is None:
            return
        self.refresh()
        set_status(self.status, f"evaluated: {len(df)} open findings", "ok")

    def select_finding(self, rule_id: str, key: str | None = None) -> None:
        """Select the first finding of ``rule_id`` (on ``key``) among the filtered ones."""
        frame = self.frame
        mask = frame["rule_id"] == rule_id if len(frame) else pd.Series(dtype=bool)
        if key is not None and len(frame):
            mask &= frame["key"] == key
        hits = list(frame.index[mask]) if len(frame) else []
        if not hits:
            set_status(self.status, f"no open finding {rule_id}"
                       + (f" on {key!r}" if key else "") + " matches the filters", "error")
            return
        pos = hits[0]
        self.pager.offset = pos // self.pager.page_size * self.pager.page_size
        self._render_page()
        self.select.value = pos

    # -- internals --------------------------------------------------------------------------
    def _filters_changed(self, _change: object) -> None:
        if not self._busy:
            self._apply(reset=True)

    def _apply(self, *, reset: bool) -> None:
        df = self.findings
        for name in ("framework", "severity", "key"):
            value = chosen(self.filters[name])
            if value is not None and len(df):
                df = df[df[name].astype(str) == value]
        self.frame = df.reset_index(drop=True)
        if reset:
            self.pager.reset()
        self.pager.clamp(len(self.frame))
        self._render_page()

    def _render_page(self) -> None:
        start, size = self.pager.offset, self.pager.page_size
        page = self.frame.iloc[start:start + size]
        options = [(_label(row), int(pos)) for pos, row in page.iterrows()]
        current = self.select.value
        self._busy = True
        try:
            self.select.options = options
            self.select.value = current if current in {v for _, v in options} else None
        finally:
            self._busy = False
        if self.select.value is None:
            self.detail.value = message_html(
                "select a finding to see its evidence" if options else "no open findings match")
        self.pager.update(len(page), len(self.frame))

    def _render_overview(self) -> None:
        df = self.findings
        counts = df["severity"].value_counts() if len(df) else pd.Series(dtype=int)
        parts = [f"{int(counts.get(s, 0))} {s}" for s in ka.SEVERITY_ORDER if counts.get(s, 0)]
        text = (f"{len(df):,} open findings" + (f": {', '.join(parts)}" if parts else "")
                if len(df) else "no open findings in the last evaluation")
        self.summary.value = (f"<span style='padding:0 12px;color:{MUTED_COLOUR}'>"
                              f"{html.escape(text)}</span>")
        matrix = ka.compliance_matrix(df)
        self.matrix.value = matrix_html(matrix)
        self._render_chart(matrix)

    def _render_chart(self, matrix: pd.DataFrame) -> None:
        charts = load_charts()
        builder = getattr(charts, "compliance_heatmap", None) if charts else None
        if builder is None:
            self.chart = None
            self.chart_output.outputs = ()
            return
        try:
            self.chart = builder(matrix)
            show_object(self.chart_output, self.chart)
        except Exception:  # noqa: BLE001 - the counts table is still there
            log.exception("keyledger widget: compliance heat map failed")
            self.chart = None
            self.chart_output.outputs = ()

    def _selected(self, change: dict) -> None:
        if self._busy:
            return
        pos = change["new"]
        if pos is None or pos >= len(self.frame):
            return
        self.detail.value = finding_html(self.frame.iloc[pos])


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df.reset_index(drop=True)
    rank = {s: i for i, s in enumerate(ka.SEVERITY_ORDER)}
    return (df.assign(_rank=df["severity"].map(rank).fillna(len(rank)))
              .sort_values(["_rank", "framework", "rule_id", "key"], na_position="last",
                           kind="mergesort")
              .drop(columns="_rank").reset_index(drop=True))


def _label(row: pd.Series) -> str:
    where = f"{row['key']}" if isinstance(row.get("key"), str) else "home"
    if pd.notna(row.get("version")) and row.get("version") is not None:
        where += f" v{int(row['version'])}"
    if isinstance(row.get("principal"), str):
        where += f" ({row['principal']})"
    return (f"{str(row['severity']).upper():8} {row['framework']} {row['control']} · "
            f"{row['title']} · {where}")


def matrix_html(matrix: pd.DataFrame) -> str:
    """Findings per framework (rows) x severity (columns) as an escaped HTML table."""
    if matrix.empty or int(matrix["findings"].sum()) == 0:
        return message_html("no open findings")
    colours = palette("SEVERITY_COLORS")
    wide = matrix.pivot(index="framework", columns="severity", values="findings")
    cols = [s for s in ka.SEVERITY_ORDER if s in wide.columns]
    head = "".join(f"<th style='padding:2px 8px'>{badge(s, colours.get(s, GREY))}</th>"
                   for s in cols)
    rows = []
    for framework, row in wide.iterrows():
        cells = "".join(
            "<td style='text-align:right;padding:2px 8px;"
            + (f"font-weight:600;color:{text_color(colours.get(s, GREY))}" if row[s]
               else f"color:{MUTED_COLOUR}")
            + f"'>{int(row[s])}</td>" for s in cols)
        rows.append(f"<tr><td style='padding:2px 8px'>{html.escape(str(framework))}</td>"
                    f"{cells}</tr>")
    return ("<table style='border-collapse:collapse;font-size:12px'><thead><tr>"
            f"<th style='text-align:left;padding:2px 8px'>framework</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def finding_html(row: pd.Series) -> str:
    """One finding: what, where, since when, its evidence (pretty JSON) and the remediation."""
    evidence = row.get("evidence")
    try:
        pretty = json.dumps(json.loads(evidence), indent=2, sort_keys=True)
    except (TypeError, ValueError):
        pretty = "" if evidence is None else str(evidence)
    colour = palette("SEVERITY_COLORS").get(str(row.get("severity")), GREY)
    head = (f"<h3 style='margin:8px 0 4px 0'>{html.escape(str(row.get('title')))} "
            f"{badge(row.get('severity'), colour)}</h3>")
    facts = dl([("rule", row.get("rule_id")), ("framework", row.get("framework")),
                ("control", row.get("control")), ("key", row.get("key")),
                ("version", row.get("version")), ("principal", row.get("principal")),
                ("status", row.get("status")), ("first seen", row.get("first_seen")),
                ("last seen", row.get("last_seen"))])
    return (head + facts
            + section("Evidence", f"<pre style='font-size:12px;margin:0'>{html.escape(pretty)}"
                                  "</pre>")
            + section("Remediation", "<div style='white-space:pre-wrap'>"
                                     f"{html.escape(str(row.get('remediation') or ''))}</div>"))


__all__ = ["ComplianceView", "finding_html", "load_charts", "matrix_html"]
