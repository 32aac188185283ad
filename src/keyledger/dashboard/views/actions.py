"""The admin-only action panel of the Rotation page: each action confirmed, then run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import panel as pn
import param
from panel.viewable import Viewer

from ...errors import InvalidInput
from ...service import MAX_DELETION_DAYS, MIN_DELETION_DAYS
from ..state import DashboardState
from .widgets import card

NO_KEY = "(choose a key)"  # the action panel's first choice


class ActionPanel(Viewer):
    """Rotate, disable, enable, schedule deletion and approve, each confirmed first.

    Only built for admins (``RotationView`` never creates it for anyone else). ``ask(action)``
    shows the confirmation; ``confirm()`` runs it through the ledger as the session's principal.
    """

    # required (every page and the dashboard get one): NoNone types it non-optional
    state = param.ClassSelector(class_=DashboardState, allow_None=param.parameters.NoNone)
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
        self.confirm_button.on_click(self._confirm_clicked)
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
        button.on_click(lambda e: self.ask(action))
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

    def _confirm_clicked(self, _event: object) -> None:
        self.confirm()  # the result shows in the panel; Panel wants no return value

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
                led.schedule_deletion(target, _days(self.days.value)))),
            "approve": (f"approve {target}", lambda: _approval(led.approve(target))),
        }
        label, fn = runs[action]
        ok, text = self.state.run_action(label, fn)
        self.result.object = ("✓ " if ok else "✗ ") + text
        return ok, text

    def __panel__(self) -> pn.Column:
        return self._layout


def _days(value: int | None) -> int:
    """The days field's waiting period; a field the person emptied is refused in words."""
    if value is None:
        raise InvalidInput(f"enter the deletion waiting period: {MIN_DELETION_DAYS} to "
                           f"{MAX_DELETION_DAYS} days")
    return int(value)


def _due(key: Any) -> str:
    return f"deletion due {key.deletion_due:%Y-%m-%d %H:%M} UTC" if key.deletion_due else "done"


def _approval(result: dict[str, Any]) -> str:
    done = "executed" if result.get("executed") else "waiting for more approvals"
    return f"{result['approvals']} of {result['quorum']} approvals, {done}"
