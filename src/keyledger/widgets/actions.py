"""KeyActions: lifecycle buttons with a confirmation step for destructive actions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from ..display import key_html
from ..errors import InvalidInput, PolicyViolation
from ..model import SPECS, Key, Purpose, parse_period
from ..service import MAX_DELETION_DAYS, MIN_DELETION_DAYS
from ._common import WidgetView, attempt, dl, message_html, set_status, tried

if TYPE_CHECKING:
    from ..service import KeyLedger
    from .inventory import KeyInventory

DEFAULT = "(default)"
REQUEST_ACTIONS = ("destroy", "trim")  # quorum-guarded actions on one key this widget files
DESTRUCTIVE = ("disable", "schedule_deletion", "request", "approve")


@dataclass
class Armed:
    """A destructive action waiting for its "Confirm" click; ``facts`` (action, key, values,
    reason) are shown with the prompt, so what is confirmed is what runs."""

    action: str
    prompt: str
    run: Callable[[], Any]
    done: Callable[[Any], str]
    facts: tuple[tuple[str, Any], ...] = ()
    key: str | None = None


def parse_tags(text: str) -> dict[str, str]:
    """``"team=pay, env=prod"`` -> ``{"team": "pay", "env": "prod"}``."""
    tags: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise InvalidInput(f"tag {part!r} must look like name=value (e.g. team=payments)")
        tags[name.strip()] = value.strip()
    return tags


class KeyActions(WidgetView):
    """Create, rotate, enable/disable, schedule/cancel deletion, request and approve.

    Destructive actions (disable, schedule deletion, requests to destroy or trim, approvals) are
    armed by their first click and run only on ``confirm_button``; ``cancel_button`` disarms.
    Their values are checked before arming (a refused value arms nothing), and the confirm
    step shows the action, key, values and reason. Editing the key, reason or a value
    disarms. The reason is cleared after every action, so it is never recorded for a later
    one. Failures appear as words in ``status``. After an action the ``inventory`` (if given)
    is refreshed, ``detail`` shows the key as it is now (so does the inventory's detail pane
    when its filters hide the key), and callbacks registered with ``on_success`` run.

    Pieces for scripting and tests: ``key``, ``reason``, ``days``, ``request_action``,
    ``min_version``, ``request_id``, the create fields (``new_name``, ``spec``, ``purpose``,
    ``owner``, ``tags``, ``rotation_period``), ``buttons`` (by action name),
    ``confirm_button``, ``cancel_button``, ``armed``, ``prompt``, ``status`` and ``detail``.
    """

    def __init__(self, ledger: KeyLedger, inventory: KeyInventory | None = None) -> None:
        self.ledger = ledger
        self.inventory = inventory
        self.armed: Armed | None = None
        self._pending: dict[str, Any] = {}
        self.last_result: Any = None
        self._listeners: list[Callable[[str], None]] = []

        wide = dict(layout=W.Layout(width="300px"), style={"description_width": "80px"})
        narrow = dict(layout=W.Layout(width="170px"), style={"description_width": "80px"})
        self.key = W.Combobox(description="key", placeholder="key name", ensure_option=False,
                              **wide)
        self.reason = W.Text(description="reason", placeholder="why (kept in the audit log)",
                             **wide)
        self.days = W.IntText(description="days", value=30, **narrow)
        self.request_action = W.Dropdown(description="request", options=list(REQUEST_ACTIONS),
                                         **narrow)
        self.min_version = W.IntText(description="min version", value=2, **narrow)
        self.request_id = W.Dropdown(description="pending", options=[], **wide)

        self.new_name = W.Text(description="name", placeholder="new key name", **wide)
        self.spec = W.Dropdown(description="spec", options=list(SPECS), value="AES_256", **narrow)
        self.purpose = W.Dropdown(description="purpose",
                                  options=[DEFAULT, *(p.value for p in Purpose)], **narrow)
        self.owner = W.Text(description="owner", placeholder="team or person", **narrow)
        self.tags = W.Text(description="tags", placeholder="team=pay, env=prod", **wide)
        self.rotation_period = W.Text(description="rotation", placeholder="90d (default: policy)",
                                      **narrow)

        def button(label: str, style: str = "", tip: str = "") -> W.Button:
            return W.Button(description=label, button_style=style, tooltip=tip,
                            layout=W.Layout(width="auto"))

        self.buttons: dict[str, W.Button] = {
            "create": button("Create", "primary", "create the key with a first version"),
            "rotate": button("Rotate", "", "add a new version; old data stays decryptable"),
            "enable": button("Enable", "", "allow use again"),
            "disable": button("Disable…", "warning", "suspend all use (asks to confirm)"),
            "schedule_deletion": button("Schedule deletion…", "danger",
                                        "block use now, destroy after the waiting period"),
            "cancel_deletion": button("Cancel deletion", "", "restore the state before"),
            "request": button("Request…", "danger", "ask other admins to approve"),
            "approve": button("Approve…", "warning", "approve the selected request"),
            "reload_requests": button("↻", "", "reload the pending requests"),
        }
        self.confirm_button = button("Confirm", "danger", "run the action named above")
        self.cancel_button = button("Cancel", "", "do nothing")
        self.prompt = W.HTML()
        self.confirm_box = W.HBox([self.prompt, self.confirm_button, self.cancel_button],
                                  layout=W.Layout(display="none"))
        self.status = W.HTML()
        self.detail = W.HTML()  # the key acted on, as it is after the action

        b = self.buttons
        b["create"].on_click(self._safe(lambda _b: self.create()))
        b["rotate"].on_click(self._safe(lambda _b: self._simple("rotate")))
        b["enable"].on_click(self._safe(lambda _b: self._simple("enable")))
        b["cancel_deletion"].on_click(self._safe(lambda _b: self._simple("cancel_deletion")))
        b["disable"].on_click(self._safe(lambda _b: self._arm_disable()))
        b["schedule_deletion"].on_click(self._safe(lambda _b: self._arm_schedule()))
        b["request"].on_click(self._safe(lambda _b: self._arm_request()))
        b["approve"].on_click(self._safe(lambda _b: self._arm_approve()))
        b["reload_requests"].on_click(self._safe(lambda _b: self.reload()))
        self.confirm_button.on_click(self._safe(lambda _b: self.confirm()))
        self.cancel_button.on_click(self._safe(lambda _b: self.cancel()))
        for field in (self.key, self.reason, self.days, self.request_action, self.min_version):
            field.observe(self._safe(lambda _c: self.cancel(quiet=True)), names="value")

        if inventory is not None:
            inventory.on_select(lambda name: setattr(self.key, "value", name or ""))
            if inventory.selected:
                self.key.value = inventory.selected

        self.widget = W.VBox([
            W.HTML("<b>Key</b>"),
            W.HBox([self.key, self.reason]),
            W.HBox([b["rotate"], b["enable"], b["disable"], b["cancel_deletion"],
                    self.days, b["schedule_deletion"]]),
            W.HBox([self.request_action, self.min_version, b["request"]]),
            W.HBox([self.request_id, b["reload_requests"], b["approve"]]),
            self.confirm_box,
            self.status,
            self.detail,
            W.HTML("<b>New key</b>"),
            W.HBox([self.new_name, self.spec, self.purpose]),
            W.HBox([self.owner, self.rotation_period, self.tags]),
            b["create"],
        ])
        self.reload()

    # -- public -----------------------------------------------------------------------------
    def on_success(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(action)`` after every action that succeeded."""
        self._listeners.append(callback)

    def reload(self, *, quiet: bool = False) -> None:
        """Reload the key names and the pending requests (``quiet``: keep the status line)."""
        keys = tried(None, self.ledger.list_keys)
        if keys is not None:
            self.key.options = tuple(keys["name"])
        pending = tried(None if quiet else self.status, self.ledger.requests, "pending",
                        what="requests")
        if pending is None:
            return
        options = [(f"{r.request_id} · {r.action} {r.key} · by {r.requested_by} · "
                    f"{len(r.approvers) if r.approvers is not None else 0}/{r.quorum}",
                    r.request_id) for r in pending.itertuples()]
        current = self.request_id.value
        self.request_id.options = options
        ids = [v for _, v in options]
        self._pending = {r.request_id: r for r in pending.itertuples()}
        self.request_id.value = current if current in ids else (ids[-1] if ids else None)

    def create(self) -> None:
        """Create a key from the "New key" fields."""
        self.cancel(quiet=True)
        name = self.new_name.value.strip()
        checked = tried(self.status, self._create_values, what="create")
        if checked is None:
            return
        tags, period = checked

        def run() -> Any:
            purpose = None if self.purpose.value == DEFAULT else self.purpose.value
            return self.ledger.create_key(
                name, spec=self.spec.value, purpose=purpose,
                owner=self.owner.value.strip() or None, tags=tags or None,
                rotation_period=period)

        self._run("create", run, lambda k: (
            f"created {k.name!r} ({k.spec.name}, {k.purpose.value}), version {k.latest_version}"))

    def confirm(self) -> None:
        """Run the armed destructive action."""
        armed, self.armed = self.armed, None
        self._show_confirm(False)
        if armed is None:
            set_status(self.status, "nothing to confirm")
            return
        self._run(armed.action, armed.run, armed.done, key=armed.key)

    def cancel(self, quiet: bool = False) -> None:
        """Disarm the pending destructive action."""
        if self.armed is not None and not quiet:
            set_status(self.status, f"cancelled: {self.armed.prompt}")
        self.armed = None
        self._show_confirm(False)

    # -- internals --------------------------------------------------------------------------
    def _create_values(self) -> tuple[dict[str, str], str | None]:
        """The tags and rotation period of the "New key" fields, checked before any call."""
        tags = parse_tags(self.tags.value)
        period = self.rotation_period.value.strip() or None
        parse_period(period)  # a bad period string is refused here, with the same words
        return tags, period

    def _name(self) -> str:
        return (self.key.value or "").strip()

    def _reason(self, default: str) -> str:
        return self.reason.value.strip() or default

    def _simple(self, action: str) -> None:
        self.cancel(quiet=True)
        name = self._name()
        fn = getattr(self.ledger, action)
        reasons = {"rotate": "rotation", "enable": "enabled",
                   "cancel_deletion": "deletion cancelled"}
        done = {
            "rotate": lambda k: f"rotated {k.name!r} to version {k.latest_version}",
            "enable": lambda k: f"{k.name!r} is {k.state.value}",
            "cancel_deletion": lambda k: f"deletion of {k.name!r} cancelled; it is "
                                         f"{k.state.value} again",
        }[action]
        self._run(action, lambda: fn(name, reason=self._reason(reasons[action])), done,
                  key=name)

    def _need_key(self) -> str | None:
        name = self._name()
        if not name:
            set_status(self.status, "enter or select a key first", "error")
        return name or None

    def _arm(self, armed: Armed) -> None:
        self.armed = armed
        self.prompt.value = message_html(armed.prompt, "warn") + dl(armed.facts)
        self._show_confirm(True)
        set_status(self.status, "click Confirm to go ahead, or Cancel")

    def _reason_fact(self, default: str | None) -> tuple[str, str]:
        """("reason", what the audit record will say) for the confirm step."""
        typed = self.reason.value.strip()
        if typed or default is None:
            return ("reason", typed)
        return ("reason", f"{default} (default: no reason typed)")

    def _check_days(self) -> int:
        """The deletion waiting period, refused before arming when the policy forbids it."""
        days = self.days.value
        if not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
            raise PolicyViolation(f"the deletion waiting period must be {MIN_DELETION_DAYS} to "
                                  f"{MAX_DELETION_DAYS} days, not {days}; nothing was armed")
        return days

    def _arm_disable(self) -> None:
        if (name := self._need_key()) is None:
            return
        reason = self._reason("disabled")
        self._arm(Armed("disable", f"Disable {name!r}? All use stops until it is enabled again.",
                        lambda: self.ledger.disable(name, reason=reason),
                        lambda k: f"{k.name!r} is {k.state.value}",
                        (("action", "disable"), ("key", name), self._reason_fact("disabled")),
                        name))

    def _arm_schedule(self) -> None:
        if (name := self._need_key()) is None:
            return
        days = tried(self.status, self._check_days, what="schedule deletion")
        if days is None:
            return
        reason = self._reason("scheduled")
        self._arm(Armed(
            "schedule_deletion",
            f"Schedule deletion of {name!r} in {days} days? All use stops now; the key can be "
            "destroyed once the waiting period ends.",
            lambda: self.ledger.schedule_deletion(name, days, reason=reason),
            lambda k: f"{k.name!r} is {k.state.value}; it may be destroyed after "
                      f"{k.deletion_due:%Y-%m-%d %H:%M} UTC",
            (("action", "schedule deletion"), ("key", name), ("waiting period", f"{days} days"),
             self._reason_fact("scheduled")),
            name))

    def _arm_request(self) -> None:
        if (name := self._need_key()) is None:
            return
        action, reason = self.request_action.value, self.reason.value.strip()
        if not reason:
            set_status(self.status, "request: say why in reason (approvers read it); nothing "
                       "was armed", "error")
            return
        params: dict[str, Any] = {}
        facts: list[tuple[str, Any]] = [("action", f"request {action}"), ("key", name)]
        what = f"destruction of {name!r} (every version, for good)"
        if action == "trim":
            if self.min_version.value < 2:
                set_status(self.status, f"request: min version must be 2 or more, not "
                           f"{self.min_version.value}; nothing was armed", "error")
                return
            params["min_version"] = self.min_version.value
            facts.append(("min version", self.min_version.value))
            what = f"trimming {name!r} below version {self.min_version.value}"
        facts.append(("reason", reason))
        self._arm(Armed(
            "request", f"Request {what}? It runs once enough admins approve.",
            lambda: self.ledger.request(action, name, reason, **params),
            self._request_done, tuple(facts), name))

    def _request_done(self, request_id: str) -> str:
        rows = tried(None, self.ledger.requests)
        row = None
        if rows is not None:
            match = rows[rows["request_id"] == request_id]
            row = match.iloc[0] if len(match) else None
        if row is not None and row["status"] == "executed":
            return f"request {request_id} ({row['action']} {row['key']}) was approved and executed"
        if row is not None:
            have = len(row["approvers"]) if row["approvers"] is not None else 1
            return (f"request {request_id} filed ({row['action']} {row['key']}): "
                    f"{have} of {row['quorum']} approvals; ask other admins to approve it")
        return f"request {request_id} filed"

    def _arm_approve(self) -> None:
        request_id = self.request_id.value
        if not request_id:
            set_status(self.status, "no pending request is selected (click ↻ to reload)",
                       "error")
            return
        row = self._pending.get(request_id)
        what = f"{row.action} {row.key!r}, requested by {row.requested_by}" if row else ""
        self._arm(Armed(
            "approve",
            f"Approve request {request_id} ({what})? If this meets the quorum, it runs now.",
            lambda: self.ledger.approve(request_id),
            lambda r: (f"approved {r['request_id']}: {r['approvals']} of {r['quorum']} approvals"
                       + ("; executed" if r["executed"] else "; waiting for more approvals")),
            (("action", "approve"), ("request", request_id),
             ("key", row.key if row else "?"),
             ("reason (of the request)", getattr(row, "reason", None) if row else None)),
            row.key if row else None))

    def _show_key(self, name: str, result: Any = None) -> None:
        """Show key ``name`` as it is now in ``detail``; and in the inventory's detail pane
        when the inventory selects no key (its filters hide the key after the change), since
        its ``refresh`` only redraws a selected key."""
        key = result if isinstance(result, Key) else tried(None, self.ledger.get_key, name)
        self.detail.value = (key_html(key) if key is not None else message_html(
            f"{name!r} can no longer be shown (destroyed, or not visible to you)"))
        inventory = self.inventory
        pane = getattr(inventory, "detail", None)
        if inventory is None or not isinstance(pane, W.HTML) or inventory.selected is not None:
            return
        from .inventory import key_detail_html

        text = tried(None, key_detail_html, self.ledger, name, getattr(inventory, "keys", None))
        if text is not None:
            pane.value = text

    def _show_confirm(self, visible: bool) -> None:
        self.confirm_box.layout.display = "flex" if visible else "none"
        if not visible:
            self.prompt.value = ""

    def _run(self, action: str, run: Callable[[], Any], done: Callable[[Any], str], *,
             key: str | None = None) -> bool:
        set_status(self.status, f"{action.replace('_', ' ')}…")
        try:
            ok, result = attempt(self.status, run, what=action.replace("_", " "))
        finally:
            self.reason.value = ""  # a reason belongs to one action, whatever its outcome
        if ok:
            self.last_result = result
            text = tried(None, done, result)
            set_status(self.status, text if text is not None else f"{action.replace('_', ' ')}: done",
                       "ok")
            key = getattr(result, "name", key)
        # state may have changed even on failure (e.g. an approval that could not execute)
        if self.inventory is not None:
            self.inventory.refresh()
        if key:
            self._show_key(key, result)
        self.reload(quiet=True)
        if ok:
            for callback in list(self._listeners):
                attempt(None, callback, action)
        return ok


__all__ = ["DESTRUCTIVE", "REQUEST_ACTIONS", "KeyActions", "parse_tags"]
