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
from .inventory import KeyInventory

if TYPE_CHECKING:
    from ..service import KeyLedger


class Dashboard(W.Tab):
    """A ``Tab`` with Keys (inventory + actions), Audit and Compliance; the parts are
    attributes: ``inventory``, ``actions``, ``audit``, ``compliance``."""

    def __init__(self, ledger: KeyLedger, *, page_size: int = 50) -> None:
        self.ledger = ledger
        self.inventory = KeyInventory(ledger, page_size=page_size)
        self.actions = KeyActions(ledger, inventory=self.inventory)
        self.audit = AuditBrowser(ledger, page_size=page_size)
        self.compliance = ComplianceView(ledger)
        # what an action changes shows up in the other tabs too
        self.actions.on_success(lambda _action: self.audit.refresh())
        keys = W.VBox([self.inventory.widget, W.HTML("<hr>"), self.actions.widget])
        super().__init__(children=[keys, self.audit.widget, self.compliance.widget])
        for i, title in enumerate(("Keys", "Audit", "Compliance")):
            self.set_title(i, title)

    @property
    def widget(self) -> W.Tab:
        return self


def dashboard(ledger: KeyLedger, *, page_size: int = 50) -> Dashboard:
    """KeyInventory + KeyActions, AuditBrowser and ComplianceView in one ``ipywidgets.Tab``."""
    return Dashboard(ledger, page_size=page_size)


__all__ = ["AuditBrowser", "ComplianceView", "Dashboard", "KeyActions", "KeyInventory",
           "dashboard"]
