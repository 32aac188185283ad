"""Dashboard pages as ``Viewer`` classes: Overview, Rotation, Usage, Compliance, Audit.

Each view builds its widgets once and, when the state's filters or ``version`` change, reloads
its frames (``self.frames``, handy in tests) through the cached ``Data`` and sets the widgets'
values, so the page keeps its DOM and nothing flickers. A view that is not on screen only marks
itself stale and reloads when its tab is opened (``activate``).

CSS classes (stable selectors for browser tests) are listed in docs/dashboard.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from .. import analytics as kla
from .. import charts as klc
from ..display import GREEN, RED, ROTATION_COLORS, SEVERITY_COLORS
from ..errors import KeyLedgerError, StoreBusy
from .data import bucket_for, message
from .state import DashboardState

log = logging.getLogger(__name__)

# Vega-Lite version of the JS bundled with Panel: specs say so (no "newer spec" console warning).
VEGA_LITE_SCHEMA = "https://vega.github.io/schema/vega-lite/v6.3.0.json"
FILTER_PARAMS = ["version", "owner", "tag", "key", "time_range"]

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
    if color_column and colors:  # registered once; Tabulator re-applies it to every new value
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


# -- the base view -------------------------------------------------------------------------------
class View(Viewer):
    """A page: reloads its frames when the filters or the data version change."""

    state = param.ClassSelector(class_=DashboardState)
    title = "View"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.frames: dict[str, Any] = {}
        self.active = False
        self.stale = True
        self.updates = 0
        self.error = pn.pane.Alert("", alert_type="danger", visible=False,
                                   css_classes=["kl-view-error"])
        self._layout = pn.Column(self.error, *self._build(), sizing_mode="stretch_width",
                                 css_classes=["kl-page", f"kl-page-{self.title.lower()}"])
        self.state.param.watch(self._changed, self._watched())

    def _watched(self) -> list[str]:
        return list(FILTER_PARAMS)

    def _build(self) -> list[Any]:
        raise NotImplementedError

    def _update(self) -> None:
        raise NotImplementedError

    def _changed(self, *events: param.parameterized.Event) -> None:
        self.stale = True
        if self.active:
            self.update()

    def activate(self, active: bool = True) -> None:
        """Called when the page's tab is shown (or hidden): a stale page reloads now."""
        self.active = active
        if active and self.stale:
            self.update()

    def update(self) -> bool:
        """Reload the frames and widgets; a busy store keeps the old ones (and retries)."""
        try:
            self._update()
        except StoreBusy:
            self.state.report_busy()
            return False
        except KeyLedgerError as exc:
            self.error.object = message(exc)
            self.error.visible = True
            self.stale = False
            return False
        except Exception as exc:  # a bug must not take the page (or the poll) down
            log.exception("the %s page failed to update", self.title)
            self.error.object = message(exc)
            self.error.visible = True
            self.stale = False
            return False
        self.error.visible = False
        self.stale = False
        self.updates += 1
        return True

    def objects(self) -> list[Any]:
        """Every Panel object in this page's layout (recursively): for tests and checks."""
        return list(walk(self._layout))

    def __panel__(self) -> pn.Column:
        return self._layout


def walk(obj: Any) -> Any:
    """Yield ``obj`` and everything nested in it (layouts, Viewers, cards)."""
    yield obj
    if isinstance(obj, Viewer):
        yield from walk(obj.__panel__())
    elif isinstance(obj, pn.layout.base.ListLike | pn.layout.base.NamedListLike):
        for child in obj.objects:
            yield from walk(child)


def has_class(obj: Any, css: str) -> bool:
    return css in (getattr(obj, "css_classes", None) or [])


# -- Overview ------------------------------------------------------------------------------------
class OverviewView(View):
    title = "Overview"

    def _build(self) -> list[Any]:
        self.kpi_keys = KPI("Keys (active of total)", "keys")
        self.kpi_overdue = KPI("Overdue rotations (keys)", "overdue")
        self.kpi_findings = KPI("Open critical/high findings", "findings")
        self.kpi_ops = KPI("Operations, last 24 h (calls)", "ops")
        self.kpi_audit = KPI("Audit verification", "audit", string=True)
        self.states_chart = ChartPane("keys_by_state", "kl-chart-keys-by-state")
        self.ops_chart = ChartPane("operations", "kl-chart-ops-outcome")
        self.rotation_chart = ChartPane("rotation_status", "kl-chart-rotation-overview", top=25)
        return [
            pn.FlexBox(self.kpi_keys, self.kpi_overdue, self.kpi_findings, self.kpi_ops,
                       self.kpi_audit, css_classes=["kl-kpis"]),
            pn.Row(card(None, self.states_chart), card(None, self.ops_chart),
                   sizing_mode="stretch_width"),
            card(None, self.rotation_chart),
        ]

    def _update(self) -> None:
        st, data = self.state, self.state.data
        kf, f = st.key_filters(), st.filters()
        status = data.key_status(kf)
        by_state = kla.keys_by_state(status)
        now = st.now()
        self.frames.update(status=status, by_state=by_state)
        # keys
        active = int((status["state"] == "active").sum())
        new7 = int((status["created_at"] >= pd.Timestamp(now) - pd.Timedelta(days=7)).sum())
        self.kpi_keys.set(active, f"of {len(status):,} keys · {new7:,} created in the last "
                          "7 days")
        # rotations
        overdue = int((status["rotation_status"] == "overdue").sum())
        soon = int((status["rotation_status"] == "due soon").sum())
        self.kpi_overdue.set(overdue, f"{arrow(soon)} more due within 30 days" if soon else
                             "none more due within 30 days",
                             RED if overdue else GREEN)
        self.frames.update(overdue=overdue, due_soon=soon)
        self.states_chart.update(by_state)
        self.rotation_chart.update(status)
        if not st.can_read_audit:
            self.kpi_findings.set(0, "needs the auditor or admin role")
            self.kpi_ops.set(0, "needs the auditor or admin role")
            self.kpi_audit.set("–", "needs the auditor or admin role")
            return
        # findings
        findings = data.filtered_findings(kf)
        severe = findings[findings["severity"].isin(["critical", "high"])]
        new = int((severe["status"] == "new").sum())
        self.kpi_findings.set(len(severe), f"{arrow(new)} new in the last evaluation" if new
                              else "none new in the last evaluation",
                              SEVERITY_COLORS["critical"] if len(severe) else GREEN)
        self.frames.update(findings=findings, severe=len(severe))
        # operations
        numbers = data.overview_numbers(kf)
        act = {k: numbers[k] for k in ("ops", "ops_before", "denied", "failed")}
        change = act["ops"] - act["ops_before"]
        pct = f" ({change / act['ops_before']:+.0%})" if act["ops_before"] else ""
        self.kpi_ops.set(act["ops"], f"{arrow(change, higher_is_worse=False)}{pct} vs the 24 h "
                         f"before · {act['denied']:,} denied · {act['failed']:,} failed")
        self.frames["activity"] = act
        ops = data.ops_per_period(f, by="outcome", bucket=bucket_for(st.time_range))
        self.frames["ops"] = ops
        self.ops_chart.update(ops)
        # audit verification
        ver, total = numbers["verification"], numbers["total"]
        self.frames.update(verification=ver, audit_records=total)
        if ver is None:
            self.kpi_audit.set("never", f"{total:,} records not yet verified", RED)
        else:
            when = pd.Timestamp(ver["time"]).strftime("%Y-%m-%d %H:%M")
            since = max(total - ver["records"], 0)
            ok = ver["ok"]
            self.kpi_audit.set("OK" if ok else "BROKEN",
                               f"{ver['records']:,} records at {when} UTC · "
                               f"{arrow(since)} since", GREEN if ok else RED)


# -- Rotation ------------------------------------------------------------------------------------
NO_KEY = "(choose a key)"  # the action panel's first choice
KEY_COLUMNS = ["name", "state", "rotation_status", "days_to_due", "latest_version", "owner",
               "team", "spec", "next_rotation_due", "deletion_due"]


class RotationView(View):
    title = "Rotation"

    def _watched(self) -> list[str]:
        return [*FILTER_PARAMS, "selected_key"]

    def _build(self) -> list[Any]:
        rot = ROTATION_COLORS
        self.keys_table = table("kl-keys-table", page_size=15, full_pages=True, selectable=1,
                                columns=KEY_COLUMNS,
                                color_column="rotation_status",
                                colors={s: rot[s] for s in ("overdue", "due soon") if s in rot})
        self.keys_table.param.watch(self._selected, "selection")
        self.keys_title = pn.pane.Markdown("#### Keys", margin=(0, 5))
        keys_card = card("", self.keys_table)
        keys_card[0] = self.keys_title
        self.rotation_chart = ChartPane("rotation_status", "kl-chart-rotation", top=50)
        self.timeline_chart = ChartPane("version_timeline", "kl-chart-timeline", top=40)
        self.upcoming_table = table("kl-upcoming-table", page_size=10)
        self.requests_table = table("kl-requests-table", page_size=8, selectable=1)
        self.side = pn.Column(sizing_mode="stretch_width", css_classes=["kl-rotation-side"])
        self.actions: ActionPanel | None = None
        self._sync_actions()
        self.state.param.watch(lambda *e: self._sync_actions(), ["roles", "admin_keys"])
        return [
            keys_card,
            pn.Row(card(None, self.rotation_chart), self.side, sizing_mode="stretch_width"),
            card(None, self.timeline_chart),
            pn.Row(card("Upcoming rotations and deletions, next 30 days", self.upcoming_table),
                   card("Approval requests pending", self.requests_table),
                   sizing_mode="stretch_width"),
        ]

    def _sync_actions(self) -> None:
        """Admins get the action panel; everyone else gets no action controls at all."""
        if self.state.is_admin and self.actions is None:
            self.actions = ActionPanel(state=self.state, requests_table=self.requests_table)
            self.side.objects = [self.actions]
        elif not self.state.is_admin and self.actions is not None:
            self.actions = None
            self.side.objects = []
        if self.actions is not None:
            self.actions.sync_options()

    def _selected(self, event: param.parameterized.Event) -> None:
        df = self.keys_table.value
        if event.new and df is not None and len(df):
            self.state.selected_key = str(df.iloc[event.new[0]]["name"])

    def _update(self) -> None:
        st, data = self.state, self.state.data
        kf = st.key_filters()
        status = data.key_status(kf)
        upcoming = data.upcoming(kf)
        view = status[[c for c in KEY_COLUMNS if c in status.columns]].copy()
        self.frames.update(status=status, upcoming=upcoming, keys=view)
        self.keys_title.object = (f"#### Keys ({len(view):,}; "
                                  f"{int((view['rotation_status'] == 'overdue').sum()):,} overdue)")
        self.keys_table.value = view
        if st.selected_key in set(view["name"]):
            self.keys_table.selection = [int(view.index[view["name"] == st.selected_key][0])]
        self.rotation_chart.update(status)
        # the version timeline: the selected key, or the 40 most urgent keys shown
        names = [st.selected_key] if st.selected_key else list(status["name"][:40])
        timeline = data.version_timeline(kf) if st.can_read_audit else pd.DataFrame(
            columns=["key", "version", "state", "start", "end", "current"])
        timeline = timeline[timeline["key"].isin(names)]
        self.frames["timeline"] = timeline
        self.timeline_chart.update(timeline)
        self.upcoming_table.value = upcoming
        requests = data.requests("pending")
        requests = requests.drop(columns=[c for c in ("executed_at", "executed_by")
                                          if c in requests.columns])
        if "approvers" in requests.columns:
            requests["approvers"] = requests["approvers"].map(
                lambda a: ", ".join(a) if isinstance(a, list | tuple) else str(a))
        self.frames["requests"] = requests
        self.requests_table.value = requests
        if self.actions is not None:
            self.actions.sync_options()


class ActionPanel(Viewer):
    """Rotate, disable, enable, schedule deletion and approve, each confirmed first.

    Only built for admins (``RotationView`` never creates it for anyone else). ``ask(action)``
    shows the confirmation; ``confirm()`` runs it through the ledger as the session's principal.
    """

    state = param.ClassSelector(class_=DashboardState)
    pending = param.String(default=None, allow_None=True, doc="The action awaiting confirmation.")

    ACTIONS = ("rotate", "disable", "enable", "schedule_deletion", "approve")

    def __init__(self, *, requests_table: pn.widgets.Tabulator, **params: Any) -> None:
        super().__init__(**params)
        self.requests_table = requests_table
        # a first "no key" choice: without it Panel picks the first key while it draws the
        # select, which selected that key for the whole page in the middle of drawing it
        self.key_select = pn.widgets.Select(label="Key", options={NO_KEY: ""}, value="",
                                            css_classes=["kl-action-key"])
        self.key_select.param.watch(self._key_chosen, "value")
        self.days = pn.widgets.IntInput(label="Deletion waiting period (days, 7-30)", value=30,
                                        start=7, end=30, css_classes=["kl-action-days"])
        buttons = [("rotate", "Rotate", "primary"), ("disable", "Disable", "warning"),
                   ("enable", "Enable", "success"),
                   ("schedule_deletion", "Schedule deletion", "danger")]
        self.buttons: dict[str, pn.widgets.Button] = {}
        for action, label, kind in buttons:
            self.buttons[action] = self._button(action, label, kind)
        self.buttons["approve"] = self._button("approve", "Approve selected request", "primary")
        self.prompt = pn.pane.Markdown("", css_classes=["kl-confirm-text"])
        self.confirm_button = pn.widgets.Button(label="Confirm", color="danger",
                                                css_classes=["kl-action", "kl-confirm"])
        self.cancel_button = pn.widgets.Button(label="Cancel", color="light",
                                               css_classes=["kl-action", "kl-cancel"])
        self.confirm_button.on_click(lambda e: self.confirm())
        self.cancel_button.on_click(lambda e: self.cancel())
        self.confirm_row = pn.Column(self.prompt, pn.Row(self.confirm_button, self.cancel_button),
                                     visible=False, css_classes=["kl-confirm-box"])
        self.result = pn.pane.Markdown("", css_classes=["kl-action-result"])
        self._layout = card(
            f"Actions (as {self.state.principal})",
            self.key_select,
            pn.Row(self.buttons["rotate"], self.buttons["disable"], self.buttons["enable"]),
            self.days, self.buttons["schedule_deletion"], self.buttons["approve"],
            self.confirm_row, self.result, css="kl-actions", width=420,
            sizing_mode="fixed")
        self.state.param.watch(self._state_key, "selected_key")

    def _button(self, action: str, label: str, kind: str) -> pn.widgets.Button:
        css = f"kl-action-{action.replace('_', '-')}"
        button = pn.widgets.Button(label=label, color=kind, css_classes=["kl-action", css])
        button.on_click(lambda e, a=action: self.ask(a))
        return button

    def keys(self) -> list[str]:
        """The keys this panel acts on (the principal's admin keys)."""
        return [v for v in self.key_select.values if v]

    def sync_options(self) -> None:
        keys = list(self.state.admin_keys)
        if self.keys() != keys:
            chosen = self.key_select.value
            self.key_select.options = {NO_KEY: "", **{k: k for k in keys}}
            if chosen not in keys:
                self.key_select.value = ""
        if self.state.selected_key in keys:
            self.key_select.value = self.state.selected_key

    def _key_chosen(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.state.selected_key:
            self.state.selected_key = event.new

    def _state_key(self, event: param.parameterized.Event) -> None:
        if event.new in self.keys():
            self.key_select.value = event.new

    def selected_request(self) -> str | None:
        df, sel = self.requests_table.value, self.requests_table.selection
        if df is None or not len(df) or not sel:
            return None
        return str(df.iloc[sel[0]]["request_id"])

    def ask(self, action: str) -> None:
        """First step: say exactly what will happen and wait for Confirm."""
        if action not in self.ACTIONS:
            raise ValueError(action)
        key = self.key_select.value
        if action == "approve":
            rid = self.selected_request()
            if rid is None:
                self.result.object = "Select a pending request in the table first."
                return
            row = self.requests_table.value.set_index("request_id").loc[rid]
            text = (f"Approve request **{rid}**: {row['action']} on **{row['key']}** "
                    f"(asked by {row['requested_by']}: {row['reason']})?")
        elif not key:
            self.result.object = "Choose a key first."
            return
        else:
            text = {
                "rotate": f"Rotate **{key}**? A new version becomes current; older versions "
                          "keep decrypting.",
                "disable": f"Disable **{key}**? Every use of the key stops until it is enabled.",
                "enable": f"Enable **{key}** again?",
                "schedule_deletion": f"Schedule **{key}** for deletion in {self.days.value} "
                                     "days? Use stops now; it can be cancelled until then.",
            }[action]
        self.pending = action
        self._target = self.selected_request() if action == "approve" else key
        self.prompt.object = text
        self.confirm_row.visible = True

    def cancel(self) -> None:
        self.pending = None
        self.confirm_row.visible = False
        self.result.object = "Cancelled."

    def confirm(self) -> tuple[bool, str]:
        """Second step: run the pending action as the session's principal."""
        action, target = self.pending, getattr(self, "_target", None)
        self.pending = None
        self.confirm_row.visible = False
        if action is None or target is None:
            return False, "nothing to confirm"
        led = self.state.ledger
        runs: dict[str, tuple[str, Callable[[], Any]]] = {
            "rotate": (f"rotate {target}",
                       lambda: f"now at version {led.rotate(target).latest_version}"),
            "disable": (f"disable {target}", lambda: led.disable(target).state.value),
            "enable": (f"enable {target}", lambda: led.enable(target).state.value),
            "schedule_deletion": (f"schedule deletion of {target}", lambda: _due(
                led.schedule_deletion(target, int(self.days.value)))),
            "approve": (f"approve {target}", lambda: _approval(led.approve(target))),
        }
        label, fn = runs[action]
        ok, text = self.state.run_action(label, fn)
        self.result.object = ("✓ " if ok else "✗ ") + text
        return ok, text

    def __panel__(self) -> pn.Column:
        return self._layout


def _due(key: Any) -> str:
    return f"deletion due {key.deletion_due:%Y-%m-%d %H:%M} UTC" if key.deletion_due else "done"


def _approval(result: dict[str, Any]) -> str:
    done = "executed" if result.get("executed") else "waiting for more approvals"
    return f"{result['approvals']} of {result['quorum']} approvals, {done}"


# -- Usage ---------------------------------------------------------------------------------------
class UsageView(View):
    title = "Usage"

    group_by = param.Selector(default="action", objects=["action", "key", "principal",
                                                         "outcome"])

    def _build(self) -> list[Any]:
        self.by = pn.widgets.RadioButtonGroup.from_param(self.param.group_by, label="Group by",
                                                          css_classes=["kl-usage-by"])
        self.param.watch(self._changed, "group_by")
        self.ops_chart = ChartPane("operations", "kl-chart-ops")
        self.ops_title = pn.pane.Markdown("", margin=(0, 5))
        self.version_chart = ChartPane("version_usage", "kl-chart-version-usage", top=40)
        self.old_versions = table("kl-old-versions-table", page_size=8)
        self.top_chart = ChartPane("top_keys", "kl-chart-top-keys")
        self.unusual_table = table("kl-unusual-table", page_size=10)
        return [
            card(None, pn.Row(pn.pane.Markdown("**Group operations by**", margin=(12, 5)),
                              self.by, self.ops_title), self.ops_chart),
            pn.Row(card(None, self.version_chart),
                   card("Old versions still decrypting in range (calls; retire only at 0)",
                        self.old_versions),
                   sizing_mode="stretch_width"),
            pn.Row(card(None, self.top_chart),
                   card("Unusual activity, last 7 days (new principal on a key, spikes)",
                        self.unusual_table),
                   sizing_mode="stretch_width"),
        ]

    def _update(self) -> None:
        st, data = self.state, self.state.data
        if not st.can_read_audit:
            raise _NoAudit()
        f = st.filters()
        ops = data.ops_per_period(f, by=self.group_by, bucket=bucket_for(st.time_range))
        bucket = ops.attrs.get("bucket", "day")
        self.ops_title.object = f"calls per {bucket}, {st.time_range.lower()}"
        self.ops_chart.update(ops)
        usage = data.version_usage(f)
        self.version_chart.update(usage)
        old = usage[~usage["current"].astype(bool) & (usage["decryptions"] > 0)]
        self.old_versions.value = old.sort_values("decryptions", ascending=False)
        top = data.top_keys(f)
        self.top_chart.update(top)
        unusual = data.unusual_activity(st.key_filters())
        self.unusual_table.value = unusual
        self.frames.update(ops=ops, version_usage=usage, old_versions=old, top_keys=top,
                           unusual=unusual)


class _NoAudit(KeyLedgerError):
    def __init__(self) -> None:
        super().__init__("This page needs the auditor or admin role on every key ('*'); ask an "
                         "admin to run `keyledger grant '*' <you> auditor`.")


# -- Compliance ----------------------------------------------------------------------------------
FINDING_COLUMNS = ["severity", "framework", "control", "rule_id", "title", "key", "version",
                   "principal", "status", "first_seen", "last_seen", "evidence", "remediation"]


class ComplianceView(View):
    title = "Compliance"

    def _build(self) -> list[Any]:
        self.heatmap = ChartPane("compliance_heatmap", "kl-chart-heatmap")
        self.trend_chart = ChartPane("finding_trend", "kl-chart-trend")
        self.findings_table = table(
            "kl-findings-table", page_size=12, full_pages=True, row_content=self._evidence,
            embed_content=False,
            hidden_columns=["evidence", "remediation"], columns=FINDING_COLUMNS,
            color_column="severity", colors=SEVERITY_COLORS)
        self.findings_title = pn.pane.Markdown("#### Findings", margin=(0, 5))
        self.note = pn.pane.Markdown("", css_classes=["kl-compliance-note"])
        self.download = pn.widgets.FileDownload(
            callback=self._report, filename="keyledger-compliance.html",
            label="Download the HTML compliance report", color="primary",
            css_classes=["kl-report-download"], embed=False)
        findings_card = card("", self.note, self.findings_table)
        findings_card[0] = self.findings_title
        return [
            pn.Row(self.download, sizing_mode="stretch_width"),
            pn.Row(card(None, self.heatmap), card(None, self.trend_chart),
                   sizing_mode="stretch_width"),
            findings_card,
        ]

    @staticmethod
    def _evidence(row: pd.Series) -> pn.viewable.Viewable:
        """The drill-down under a finding: its evidence (values and audit seq ids) and fix."""
        try:
            evidence = json.loads(row["evidence"]) if row["evidence"] else {}
        except (TypeError, ValueError):
            evidence = {"evidence": row["evidence"]}
        return pn.Column(
            pn.pane.Markdown(f"**Remediation:** {row.get('remediation') or '-'}"),
            pn.pane.JSON(evidence, depth=2, css_classes=["kl-evidence"]),
            sizing_mode="stretch_width")

    def _report(self) -> str:
        path = self.state.data.compliance_report()
        return str(path)

    def _update(self) -> None:
        st, data = self.state, self.state.data
        if not st.can_read_audit:
            self.download.visible = False
            raise _NoAudit()
        kf = st.key_filters()
        findings = data.filtered_findings(kf)
        matrix = data.compliance_matrix(kf)
        trend = data.compliance_trend()
        self.frames.update(findings=findings, matrix=matrix, trend=trend)
        self.heatmap.update(matrix)
        self.trend_chart.update(trend)
        shown = findings[[c for c in FINDING_COLUMNS if c in findings.columns]]
        rank = {s: i for i, s in enumerate(kla.SEVERITY_ORDER)}
        shown = shown.sort_values(["severity", "framework", "rule_id"],
                                  key=lambda s: s.map(rank) if s.name == "severity" else s)
        # a plain frame with plain Python values: Tabulator has been seen to drop every row of
        # the FindingsFrame subclass with pandas' nullable Int64 versions
        shown = pd.DataFrame(shown).reset_index(drop=True)
        shown["version"] = shown["version"].astype(object).where(shown["version"].notna(), None)
        self.findings_table.value = shown
        self.findings_title.object = (f"#### Findings ({len(findings):,} open; click a row's "
                                      "arrow for its evidence)")
        self.note.object = ("" if len(trend) else
                            "*No compliance evaluation is stored yet: download the report (it "
                            "evaluates), or run `keyledger run-due`.*")


# -- Audit ---------------------------------------------------------------------------------------
ALL = "(all)"


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
            raise _NoAudit()
        f = st.filters()
        facets = data.audit_facets()
        for widget, name in ((self.principal_select, "principal"),
                             (self.action_select, "action"), (self.outcome_select, "outcome")):
            options = [ALL, *facets.get(name, [])]
            if widget.options != options:
                widget.options = options
        args = dict(principal=self.principal, action=self.action, outcome=self.outcome,
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


PAGES: tuple[type[View], ...] = (OverviewView, RotationView, UsageView, ComplianceView,
                                 AuditView)

__all__ = ["PAGES", "ActionPanel", "AuditView", "ComplianceView", "KPI", "OverviewView",
           "RotationView", "UsageView", "View", "chart_spec", "has_class", "walk"]
