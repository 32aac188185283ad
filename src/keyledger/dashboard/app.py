"""The app: one template with the global filters in the sidebar and one tab per page.

``build_app(home, principal)`` opens one ``KeyLedger`` for the browser session (closed when the
session ends), builds the ``DashboardState`` and the views, and, when served, polls the home
every second so changes made anywhere show without a reload.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import panel as pn
import param
from panel.viewable import Viewer

from ..errors import ConfigError
from ..runtime import SIMULATION_LABEL
from .data import TIME_RANGES
from .state import DashboardState, local_principal
from .views import PAGES, View

TITLE = "keyledger"
APP_SCRIPT = "keyledger_dashboard.py"
POLL_MS = 1000
HEADER_COLOR = "#1f3a5f"
EXTENSIONS = ("tabulator", "vega")


def configure() -> None:
    """Load the Panel extensions the pages use. Everything is served by the Panel server
    itself (Bootstrap design and the bundled JS/CSS): nothing is fetched from a CDN. In a
    notebook kernel the JS/CSS is inlined into the output instead (keyledger.notebook)."""
    from ..notebook import in_kernel

    offline = {"inline": True} if in_kernel() else {}
    pn.extension(*EXTENSIONS, design="bootstrap", sizing_mode="stretch_width",
                 notifications=False, **offline)


def auth_enabled() -> bool:
    """Whether Panel authentication (basic auth or OAuth) is on for this server."""
    return bool(pn.config.basic_auth or pn.config.oauth_provider)


def session_principal(explicit: str | None = None) -> str:
    """The logged-in user when Panel authentication is on, else ``--principal``,
    ``KEYLEDGER_PRINCIPAL`` or the OS user."""
    if auth_enabled():
        user = pn.state.user if pn.state.curdoc is not None else None
        if not user:
            raise ConfigError("authentication is on but this session has no logged-in user; "
                              "log in again")
        return user
    return local_principal(explicit)


def main(argv: list[str] | None = None) -> None:
    """Entry of ``panel serve dashboards/keyledger_dashboard.py [--args --home H
    --principal P]``; the home and principal may also come from KEYLEDGER_HOME and
    KEYLEDGER_PRINCIPAL."""
    parser = argparse.ArgumentParser(prog=APP_SCRIPT)
    parser.add_argument("--home")  # None: kl.open's default ($KEYLEDGER_HOME or ./.keyledger)
    parser.add_argument("--principal")  # None: session_principal's default
    parser.add_argument("--url", default=os.environ.get("KEYLEDGER_URL") or None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    build_app(args.home, args.principal, url=args.url).servable(title=TITLE)


class Dashboard(Viewer):
    """State, pages, sidebar and template of one session."""

    # required (every page and the dashboard get one): NoNone types it non-optional
    state = param.ClassSelector(class_=DashboardState, allow_None=param.parameters.NoNone)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        st = self.state
        self.views: list[View] = [page(state=st) for page in PAGES]
        # Each tab starts as an empty slot and gets its page only once the page holds its data,
        # so the browser builds every table with its rows. (With Panel's dynamic tabs the page
        # was drawn first and its rows followed as a patch, which Tabulator drops while it is
        # still being built: an empty table, about one page in ten.)
        self.slots = [pn.Column(sizing_mode="stretch_width") for _ in self.views]
        self.tabs = pn.Tabs(*[(v.title, slot) for v, slot in zip(self.views, self.slots,
                                                                  strict=True)],
                            css_classes=["kl-tabs"], sizing_mode="stretch_width")
        self.tabs.param.watch(self._tab, "active")
        self.filters = self._filters()
        self.status = pn.pane.Alert(st.status or "Loading…", alert_type="info",
                                    css_classes=["kl-status"], margin=(10, 5))
        st.param.watch(self._status, ["status", "status_level"])
        self.who = pn.pane.Markdown(self._who(), css_classes=["kl-principal"])
        st.param.watch(lambda *e: setattr(self.who, "object", self._who()), ["roles",
                                                                             "admin_keys"])
        self.banner = pn.pane.Alert(f"**{SIMULATION_LABEL}**: this home was created as a "
                                    "simulation; its times may not be real.",
                                    alert_type="warning", css_classes=["kl-simulation"],
                                    visible=st.simulation, margin=(10, 5))
        self.sidebar = pn.Column(self.banner, self.who, *self.filters.values(), self.status,
                                 pn.pane.Markdown(f"<small>home: {st.home}</small>",
                                                  css_classes=["kl-home"]),
                                 sizing_mode="stretch_width")

    # -- sidebar ---------------------------------------------------------------------------------
    def _filters(self) -> dict[str, pn.widgets.Widget]:
        st = self.state
        widgets: dict[str, pn.widgets.Widget] = {
            "owner": pn.widgets.MultiChoice(label="Owner", options=st.owner_options,
                                            value=list(st.owner), placeholder="all owners",
                                            css_classes=["kl-filter", "kl-filter-owner"]),
            "tag": pn.widgets.MultiChoice(label="Tags (all must match)", options=st.tag_options,
                                          value=list(st.tag), placeholder="any tags",
                                          css_classes=["kl-filter", "kl-filter-tag"]),
            "key": pn.widgets.MultiChoice(label="Keys", options=st.key_options,
                                          value=list(st.key), placeholder="all keys",
                                          css_classes=["kl-filter", "kl-filter-key"]),
            "time_range": pn.widgets.Select(label="Time range", options=list(TIME_RANGES),
                                            value=st.time_range,
                                            css_classes=["kl-filter", "kl-filter-range"]),
        }
        for name, widget in widgets.items():
            widget.param.watch(lambda e, n=name: self._filter_set(n, e.new), "value")
            st.param.watch(lambda e, w=widget: self._filter_shown(w, e.new), name)
        for name in ("owner", "tag", "key"):
            st.param.watch(lambda e, w=widgets[name]: setattr(w, "options", list(e.new)),
                           f"{name}_options")
        return widgets

    def _filter_set(self, name: str, value: Any) -> None:
        value = list(value) if isinstance(value, list | tuple) else value
        if getattr(self.state, name) != value:
            setattr(self.state, name, value)

    @staticmethod
    def _filter_shown(widget: pn.widgets.Widget, value: Any) -> None:
        if widget.value != value:
            widget.value = list(value) if isinstance(value, list | tuple) else value

    def _status(self, *events: param.parameterized.Event) -> None:
        self.status.object = self.state.status
        self.status.alert_type = self.state.status_level

    def _who(self) -> str:
        st = self.state
        roles = ", ".join(st.roles) or ("admin of some keys" if st.admin_keys else "no role")
        return f"Signed in as **{st.principal}** · {roles}"

    # -- pages -----------------------------------------------------------------------------------
    def _tab(self, event: param.parameterized.Event) -> None:
        self._show(event.new)

    def _show(self, index: int) -> None:
        """Activate page ``index`` (a stale page reloads) and then put it in its slot."""
        for i, view in enumerate(self.views):
            view.activate(i == index)
        slot = self.slots[index]
        if not slot.objects:
            slot.objects = [self.views[index]]

    def start(self) -> None:
        """First load: roles and options, then the visible page."""
        self.state.refresh(force=True)
        self._show(self.tabs.active)

    @property
    def title(self) -> str:
        return f"{TITLE} \u2014 {SIMULATION_LABEL}" if self.state.simulation else TITLE

    def template(self) -> pn.template.BootstrapTemplate:
        header = [pn.pane.HTML(f'<span class="kl-simulation-banner" style="color:#ffd54f;'
                               f'font-weight:bold">{SIMULATION_LABEL}</span>')] \
            if self.state.simulation else []
        return pn.template.BootstrapTemplate(
            title=self.title, sidebar=[self.sidebar], main=[self.tabs], header=header,
            header_background=HEADER_COLOR, sidebar_width=320,
            # the 1 s live poll would make the header spinner flicker forever; the sidebar's
            # "Live - updated" line says when data last changed instead
            busy_indicator=None)

    def __panel__(self) -> pn.Row:
        return pn.Row(self.sidebar, self.tabs)


def build_app(home: str | os.PathLike | None = None, principal: str | None = None, *,
              clock: Callable[[], datetime] | None = None, poll_ms: int = POLL_MS,
              ledger: Any = None, url: str | None = None) -> pn.template.BootstrapTemplate:
    """The dashboard of one browser session, as a servable template.

    Opens one ``KeyLedger`` (``ledger`` may be passed instead, e.g. in tests) for the session's
    principal and closes it when the session ends. With ``url``, the ledger is a client of
    ``keyledger serve`` there (``kl.connect``; the access key's principal): this process then
    never holds the PIN or opens the home.
    """
    import keyledger as kl

    configure()
    if ledger is None and url is not None:
        ledger, owned = kl.connect(url, region=os.environ.get("KEYLEDGER_REGION", "us-east-1")), True
    elif ledger is None:
        ledger = kl.open(home, principal=session_principal(principal), clock=clock)
        owned = True
    else:
        owned = False
    dash = Dashboard(state=DashboardState(ledger))
    dash.start()
    template = dash.template()
    # for tests and for scripts that embed it (an attribute of ours Panel does not declare)
    template.dashboard = dash
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        state = dash.state

        def poll() -> None:  # Panel's callbacks return nothing; poll's "changed" is for tests
            state.poll()

        callback = pn.state.add_periodic_callback(poll, period=poll_ms)

        def closed(context: Any) -> None:
            callback.stop()
            if owned:
                ledger.close()

        pn.state.on_session_destroyed(closed)
    return template


__all__ = ["Dashboard", "auth_enabled", "build_app", "configure", "main", "session_principal"]
