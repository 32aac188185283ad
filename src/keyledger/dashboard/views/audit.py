"""The Audit page: ledger verification and the paged audit explorer."""

from __future__ import annotations

from typing import Any, TypedDict

import pandas as pd
import panel as pn
import param

from .base import NoAudit, View
from .widgets import card, table

ALL = "(all)"


class _Query(TypedDict):
    """The page's record filters, as ``Data.audit_window``/``audit_page`` take them."""

    principal: str | None
    action: str | None
    outcome: str | None
    include_reads: bool


class AuditView(View):
    """Audit explorer: newest first, paged below an anchor so pages stay put while records
    arrive; the first page follows the ledger live, « Newest jumps back to it."""

    title = "Audit"

    principal = param.String(default=None, allow_None=True)
    action = param.String(default=None, allow_None=True)
    outcome = param.String(default=None, allow_None=True)
    offset = param.Integer(default=0, bounds=(0, None))
    page_size = param.Integer(default=50, bounds=(1, 1000))
    include_reads = param.Boolean(default=False, doc="show reads (list_keys, query, ...) too")

    def _build(self) -> list[Any]:
        self.anchor: int | None = None
        self.reads_switch = pn.widgets.Checkbox(
            label="show reads (list keys, queries, ...)", value=False,
            css_classes=["kl-audit-reads"])
        self.reads_switch.link(self, value="include_reads")
        self.principal_select = pn.widgets.Select(label="Principal", options=[ALL],
                                                  css_classes=["kl-audit-principal"])
        self.action_select = pn.widgets.Select(label="Action", options=[ALL],
                                               css_classes=["kl-audit-action"])
        self.outcome_select = pn.widgets.Select(label="Outcome", options=[ALL],
                                                css_classes=["kl-audit-outcome"])
        for widget, name in ((self.principal_select, "principal"),
                             (self.action_select, "action"), (self.outcome_select, "outcome")):
            widget.param.watch(lambda e, n=name: self._facet(n, e.new), "value")
        self.first_button = pn.widgets.Button(label="« Newest", css_classes=["kl-audit-first"])
        self.prev_button = pn.widgets.Button(label="‹ Newer", css_classes=["kl-audit-prev"])
        self.next_button = pn.widgets.Button(label="Older ›", css_classes=["kl-audit-next"])
        self.first_button.on_click(lambda e: self.page(first=True))
        self.prev_button.on_click(lambda e: self.page(-1))
        self.next_button.on_click(lambda e: self.page(+1))
        self.range_text = pn.pane.Markdown("", css_classes=["kl-audit-range"])
        self.audit_table = table("kl-audit-table", page_size=None, height=560)
        self.param.watch(self._changed, ["principal", "action", "outcome", "offset",
                                         "include_reads"])
        self.verify_text = pn.pane.Markdown("", css_classes=["kl-verify-status"])
        self.verify_button = pn.widgets.Button(label="Verify the audit ledger now",
                                               color="primary", css_classes=["kl-verify"])
        self.verify_button.on_click(lambda e: self.verify())
        self.verify_box = pn.Column(self.verify_text, sizing_mode="stretch_width")
        self._sync_verify()
        self.state.param.watch(lambda *e: self._sync_verify(), ["roles"])
        return [
            card("Audit verification", self.verify_box, css="kl-verification"),
            card("Audit explorer (newest first, times UTC)",
                 pn.Row(self.principal_select, self.action_select, self.outcome_select),
                 self.reads_switch,
                 pn.Row(self.first_button, self.prev_button, self.next_button, self.range_text),
                 self.audit_table),
        ]

    def _sync_verify(self) -> None:
        """The Verify button exists for admins and auditors only."""
        want = [self.verify_text, self.verify_button] if self.state.can_read_audit else [
            self.verify_text]
        if list(self.verify_box.objects) != want:
            self.verify_box.objects = want

    def _changed(self, *events: param.parameterized.Event) -> None:
        names = {e.name for e in events}
        if names & {"owner", "tag", "key", "time_range", "principal", "action", "outcome",
                    "include_reads"}:
            self.anchor = None  # new filters: back to the live first page
            if self.offset:
                self.offset = 0  # (this triggers the reload)
                return
        super()._changed(*events)

    def _facet(self, name: str, value: str) -> None:
        setattr(self, name, None if value in (None, ALL) else value)

    def page(self, step: int = 0, *, first: bool = False) -> None:
        if first:
            self.anchor = None
            if self.offset == 0:
                self._changed()
            self.offset = 0
            return
        new = self.offset + step * self.page_size
        if 0 <= new < max(self.frames.get("count", 0), 1):
            self.offset = new

    def verify(self) -> None:
        if not self.state.can_read_audit:
            return
        ok, text = self.state.run_action("verify audit", lambda: _verified(
            self.state.ledger.verify_audit()))
        self.verify_text.object = ("✓ " if ok else "✗ ") + text

    def _update(self) -> None:
        st, data = self.state, self.state.data
        if not st.can_read_audit:
            raise NoAudit()
        f = st.filters()
        facets = data.audit_facets()
        for widget, name in ((self.principal_select, "principal"),
                             (self.action_select, "action"), (self.outcome_select, "outcome")):
            options = [ALL, *facets.get(name, [])]
            if widget.options != options:
                widget.options = options
        args = _Query(principal=self.principal, action=self.action, outcome=self.outcome,
                      include_reads=self.include_reads or self.action is not None)
        if self.offset == 0:
            self.anchor = None  # the first page is live
        total, top = data.audit_window(f, **args, anchor=self.anchor)
        if self.anchor is None:
            self.anchor = top
        page = data.audit_page(f, **args, anchor=self.anchor, offset=self.offset,
                               limit=self.page_size)
        self.frames.update(count=total, page=page, facets=facets, anchor=self.anchor)
        self.audit_table.value = page
        end = min(self.offset + len(page), total)
        self.range_text.object = (f"records {self.offset + 1 if total else 0:,}–{end:,} of "
                                  f"{total:,} ({st.time_range.lower()})")
        ver = data.last_verification()
        self.frames["verification"] = ver
        if ver is None:
            self.verify_text.object = "The audit ledger has **never been verified**."
        else:
            state = ("✓ **verified OK**" if ver["ok"] else
                     f"✗ **BROKEN** at record {ver['first_bad_seq']}: {ver['problem']}")
            self.verify_text.object = (f"{state} · {int(ver['records'] or 0):,} records · "
                                       f"{pd.Timestamp(ver['time']):%Y-%m-%d %H:%M} UTC")


def _verified(report: Any) -> str:
    if report.ok:
        return f"verified OK, {report.records:,} records"
    return f"BROKEN: {'; '.join(report.problems)[:300]}"
