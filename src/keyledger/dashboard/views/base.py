"""The base page: a ``Viewer`` that reloads its frames when the filters or the data change."""

from __future__ import annotations

import logging
from typing import Any

import panel as pn
import param
from panel.viewable import Viewer

from ...errors import KeyLedgerError, StoreBusy
from ..data import message
from ..state import DashboardState

log = logging.getLogger(__name__)

FILTER_PARAMS = ["version", "owner", "tag", "key", "time_range"]


class View(Viewer):
    """A page: reloads its frames when the filters or the data version change."""

    # required (every page and the dashboard get one): NoNone types it non-optional
    state = param.ClassSelector(class_=DashboardState, allow_None=param.parameters.NoNone)
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


class NoAudit(KeyLedgerError):
    """Raised by a page that reads the audit ledger when the principal may not."""

    def __init__(self) -> None:
        super().__init__("This page needs the auditor or admin role on every key ('*'); ask an "
                         "admin to run `keyledger grant '*' <you> auditor`.")
