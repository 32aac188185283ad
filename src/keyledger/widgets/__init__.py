"""ipywidgets controls for notebooks: thin views over ``KeyLedger`` and ``keyledger.analytics``.

    import keyledger as kl
    from keyledger.widgets import KeyInventory, KeyActions, AuditBrowser, ComplianceView, dashboard

    ledger = kl.open()
    dashboard(ledger)          # the four together, in tabs

Every class has ``.widget`` (its root ipywidget) and displays as it. Failures inside callbacks
are shown as words in the widget's status line, never as a traceback (see docs/notebooks.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ipywidgets as W

from .actions import KeyActions
from .audit import AuditBrowser
from .compliance import ComplianceView
from .grid import KeyGrid
from .inventory import KeyInventory

if TYPE_CHECKING:
    from ..service import KeyLedger


class Dashboard(W.Tab):
    """A ``Tab`` with Keys (the inventory's grid, with actions and details beside it), Audit and
    Compliance; the parts are attributes: ``inventory``, ``actions``, ``audit``,
    ``compliance``."""

    def __init__(self, ledger: KeyLedger, *, page_size: int = 50) -> None:
        self.ledger = ledger
        self.inventory = KeyInventory(ledger, page_size=page_size)
        self.actions = KeyActions(ledger, inventory=self.inventory)
        self.audit = AuditBrowser(ledger, page_size=page_size)
        self.compliance = ComplianceView(ledger)
        # what an action changes shows up in the other tabs too
        self.actions.on_success(lambda _action: self.audit.refresh())
        keys = self._keys_tab()
        super().__init__(children=[keys, self.audit.widget, self.compliance.widget])
        for i, title in enumerate(("Keys", "Audit", "Compliance")):
            self.set_title(i, title)

    @property
    def widget(self) -> W.Tab:
        return self

    def _keys_tab(self) -> W.VBox:
        """Filters across the top; below them the grid on the left and, beside it, the actions
        and the selected key's details, so list and Rotate share one laptop screen (the side
        column moves under the grid when the output area is too narrow for both)."""
        inv = self.inventory
        side = W.VBox([self.actions.widget, W.HTML("<hr style='margin:4px 0'>"), inv.detail],
                      layout=W.Layout(flex="1 1 400px", min_width="0", overflow="auto"))
        side.add_class("kl-keys-side")  # grid.css wraps its rows of controls
        grid = W.VBox([inv.grid, inv.pager.box],
                      layout=W.Layout(flex="1 1 380px", min_width="0"))
        body = W.HBox([grid, side], layout=W.Layout(flex_flow="row wrap",
                                                    align_items="flex-start"))
        return W.VBox([inv.controls, inv.summary, inv.status, body])


def dashboard(ledger: KeyLedger, *, page_size: int = 50) -> Dashboard:
    """KeyInventory + KeyActions, AuditBrowser and ComplianceView in one ``ipywidgets.Tab``."""
    return Dashboard(ledger, page_size=page_size)


__all__ = ["AuditBrowser", "ComplianceView", "Dashboard", "KeyActions", "KeyGrid", "KeyInventory",
           "dashboard"]
