"""Dashboard pages as ``Viewer`` classes: Overview, Rotation, Usage, Compliance, Audit.

Each view builds its widgets once and, when the state's filters or ``version`` change, reloads
its frames (``self.frames``, handy in tests) through the cached ``Data`` and sets the widgets'
values, so the page keeps its DOM and nothing flickers. A view that is not on screen only marks
itself stale and reloads when its tab is opened (``activate``).

CSS classes (stable selectors for browser tests) are listed in docs/dashboard.md.

One module per page (``overview``, ``rotation``, ``usage``, ``compliance``, ``audit``), the
admin-only ``actions`` panel, the shared ``base.View`` and the ``widgets`` they are built from.
"""

from __future__ import annotations

from .actions import ActionPanel
from .audit import AuditView
from .base import View, has_class, walk
from .compliance import ComplianceView
from .overview import OverviewView
from .rotation import RotationView
from .usage import UsageView
from .widgets import KPI, chart_spec

PAGES: tuple[type[View], ...] = (OverviewView, RotationView, UsageView, ComplianceView,
                                 AuditView)

__all__ = ["PAGES", "ActionPanel", "AuditView", "ComplianceView", "KPI", "OverviewView",
           "RotationView", "UsageView", "View", "chart_spec", "has_class", "walk"]
