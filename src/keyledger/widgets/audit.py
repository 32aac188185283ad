"""AuditBrowser: filter and page through the audit ledger without loading it; verify it."""

from __future__ import annotations

import html
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd

from .. import analytics as ka
from ._common import (
    ALL,
    ERROR_COLOUR,
    MUTED_COLOUR,
    OK_COLOUR,
    Pager,
    WidgetView,
    attempt,
    chosen,
    dl,
    html_table,
    message_html,
    options_with_all,
    outcome_style,
    set_status,
    tried,
)

if TYPE_CHECKING:
    from ..service import KeyLedger
    from ..store.verify import VerifyReport

COLUMNS = {"seq": "seq", "time": "time (UTC)", "principal": "principal", "action": "action",
           "key": "key", "version": "v", "outcome": "outcome", "error": "error",
           "detail": "detail"}
DETAIL_CHARS = 120


def _day_start(value: date | datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.combine(value, time(0), tzinfo=UTC)


class AuditBrowser(WidgetView):
    """Pages of audit records matching filters (key, principal, action, outcome, date range),
    newest first by default. Counting and paging run in DuckDB (``analytics.audit_window`` and
    ``audit_page``), so a ledger of millions of records is never loaded whole.

    ``verify_button`` runs ``verify_audit()`` and shows OK or the first broken record.

    Pieces for scripting and tests: ``filters`` (dict: key, principal, action, outcome, since,
    until), ``newest_first``, ``pager`` (``.prev``/``.next`` buttons, ``.label``), ``table``,
    ``page`` (DataFrame of the shown page), ``total``, ``status``, ``verify_button``,
    ``verify_result``, ``report`` (the last VerifyReport) and ``refresh()``.
    """

    def __init__(self, ledger: KeyLedger, *, page_size: int = 50) -> None:
        self.ledger = ledger
        self.page = pd.DataFrame()
        self.total = 0
        self.max_seq: int | None = None  # the newest record this browsing session shows
        self.report: VerifyReport | None = None
        self._busy = False

        dd = dict(layout=W.Layout(width="210px"), style={"description_width": "65px"})
        self.filters: dict[str, W.Widget] = {
            "key": W.Combobox(description="key", placeholder="any key", ensure_option=False,
                              continuous_update=False, **dd),
            "principal": W.Dropdown(description="principal", options=[ALL], **dd),
            "action": W.Dropdown(description="action", options=[ALL], **dd),
            "outcome": W.Dropdown(description="outcome", options=[ALL], **dd),
            "since": W.DatePicker(description="from", **dd),
            "until": W.DatePicker(description="to (incl.)", **dd),
        }
        self.newest_first = W.Checkbox(description="newest first", value=True, indent=False,
                                       layout=W.Layout(width="120px"))
        self.refresh_button = W.Button(description="Refresh", icon="refresh",
                                       layout=W.Layout(width="100px"))
        self.verify_button = W.Button(description="Verify ledger", button_style="info",
                                      tooltip="check the hash chain, checkpoints and HSM head",
                                      layout=W.Layout(width="130px"))
        self.verify_result = W.HTML()
        self.status = W.HTML()
        self.table = W.HTML()
        self.pager = Pager(page_size, self._safe(self._load_page), noun="records")

        for w in self.filters.values():
            w.observe(self._safe(self._filters_changed), names="value")
        self.newest_first.observe(self._safe(self._filters_changed), names="value")
        self.refresh_button.on_click(self._safe(lambda _b: self.refresh()))
        self.verify_button.on_click(self._safe(lambda _b: self.verify()))

        f = self.filters
        self.widget = W.VBox([
            W.HBox([f["key"], f["principal"], f["action"], f["outcome"]]),
            W.HBox([f["since"], f["until"], self.newest_first, self.refresh_button]),
            self.status,
            self.pager.box,
            W.Box([self.table], layout=W.Layout(overflow="auto")),
            W.HBox([self.verify_button, self.verify_result]),
        ])
        self.refresh()
        self._show_last_verification()

    # -- public -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Reload the filter menus, the count and the current page."""
        self._load_facets()
        self._apply(reset=False)

    def current_filters(self) -> tuple[ka.Filters, dict[str, Any]]:
        """The ``analytics.Filters`` and the principal/action/outcome arguments now in force."""
        f = self.filters
        key = (f["key"].value or "").strip()
        since = _day_start(f["since"].value)
        until = _day_start(f["until"].value)
        if until is not None and isinstance(f["until"].value, date) and not isinstance(
                f["until"].value, datetime):
            until += timedelta(days=1)  # "to" is inclusive of that day
        filters = ka.Filters(keys=(key,) if key else (), since=since, until=until)
        extra = {"principal": chosen(f["principal"]), "action": chosen(f["action"]),
                 "outcome": chosen(f["outcome"]), "max_seq": self.max_seq}
        return filters, extra

    def verify(self) -> None:
        """Run ``verify_audit()`` and show the result."""
        self.verify_result.value = message_html("verifying…")
        report = tried(self.status, self.ledger.verify_audit, what="verify")
        if report is None:
            self.verify_result.value = message_html("verification could not run; see above",
                                                    "error")
            return
        self.report = report
        self.verify_result.value = verify_html(report)

    # -- internals --------------------------------------------------------------------------
    def _load_facets(self) -> None:
        facets = tried(self.status, ka.audit_facets, self.ledger, what="audit filters")
        if facets is None:
            return
        keys = tried(None, self.ledger.list_keys)
        self._busy = True
        try:
            for name in ("principal", "action", "outcome"):
                widget = self.filters[name]
                options = options_with_all(facets.get(name, []))
                keep = widget.value if widget.value in options else ALL
                widget.options = options
                widget.value = keep
            if keys is not None:
                self.filters["key"].options = tuple(keys["name"])
        finally:
            self._busy = False

    def _filters_changed(self, _change: object) -> None:
        if not self._busy:
            self._apply(reset=True)

    def _apply(self, *, reset: bool) -> None:
        # Count and pin in one query: browsing is itself audited, and records added later
        # must not shift the pages under the reader.
        self.max_seq = None
        parsed = tried(self.status, self.current_filters, what="filters")
        if parsed is None:
            return
        filters, extra = parsed
        window = tried(self.status, ka.audit_window, self.ledger, filters, **extra,
                       what="counting records")
        if window is None:
            return
        total, self.max_seq = window
        extra["max_seq"] = self.max_seq
        set_status(self.status, "")
        if reset:
            self.pager.reset()
        self.total = total
        self.pager.clamp(total)
        self._load_page(parsed)

    def _load_page(self, parsed: tuple[ka.Filters, dict[str, Any]] | None = None) -> None:
        if parsed is None:
            parsed = tried(self.status, self.current_filters, what="filters")
            if parsed is None:
                return
        filters, extra = parsed
        page = tried(self.status, ka.audit_page, self.ledger, filters, **extra,
                     offset=self.pager.offset, limit=self.pager.page_size,
                     newest_first=self.newest_first.value, what="loading records")
        if page is None:
            return
        page = page.copy()
        if "detail" in page:
            page["detail"] = page["detail"].map(
                lambda d: d if not isinstance(d, str) or len(d) <= DETAIL_CHARS
                else d[:DETAIL_CHARS - 1] + "…")
        self.page = page

        def style(col: str, value: object) -> str:
            return outcome_style(value) if col == "outcome" else ""

        self.table.value = html_table(page, COLUMNS, cell_style=style,
                                      empty="no records match the filters")
        self.pager.update(len(page), self.total)

    def _show_last_verification(self) -> None:
        ok, last = attempt(None, ka.last_verification, self.ledger)
        if not ok or not last:
            self.verify_result.value = message_html("not verified in this home yet")
            return
        when = pd.Timestamp(last["time"]).strftime("%Y-%m-%d %H:%M")
        if last.get("ok"):
            text, kind = f"last verified {when} UTC: OK, {int(last['records']):,} records", "info"
        else:
            text, kind = (f"last verification {when} UTC FAILED at seq "
                          f"{last.get('first_bad_seq')}: {last.get('problem') or ''}", "warn")
        self.verify_result.value = message_html(text, kind)


def verify_html(report: VerifyReport) -> str:
    """A verification result as escaped HTML: OK, or the problems and the first bad record."""
    if report.ok:
        return (f"<div style='color:{OK_COLOUR};font-weight:600'>✔ "
                f"{html.escape(str(report))}</div>")
    parts = [f"<div style='color:{ERROR_COLOUR};font-weight:600'>✘ "
             f"{html.escape(str(report))}</div>"]
    if report.first_bad:
        parts.append(f"<div style='color:{MUTED_COLOUR}'>first broken record:</div>")
        parts.append(dl(sorted(report.first_bad.items())))
    return "".join(parts)


__all__ = ["AuditBrowser", "verify_html"]
