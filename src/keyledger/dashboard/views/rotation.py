"""The Rotation page: the keys table, rotation status, version timeline, upcoming work."""

from __future__ import annotations

from typing import Any

import pandas as pd
import panel as pn
import param

from ...display import ROTATION_COLORS
from .actions import ActionPanel
from .base import FILTER_PARAMS, View
from .widgets import ChartPane, card, table

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
