"""The dashboard's ``param`` state: global filters, the principal and its roles, liveness.

One ``DashboardState`` per browser session. Views watch its parameters: the filters (``owner``,
``tag``, ``key``, ``time_range``) and ``version``, which moves whenever ``refresh`` saw new data
(a change made anywhere: this dashboard, a notebook, a script). ``poll`` is cheap (file
metadata only) and is what the app calls every second.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd
import param

from .. import analytics as kla
from ..access import WILDCARD
from ..errors import KeyLedgerError, StoreBusy
from .data import (
    DEFAULT_RANGE,
    TIME_RANGES,
    ChangeDetector,
    Data,
    RemoteChangeDetector,
    Token,
    detector_for,
    message,
    note_local_change,
    range_filters,
)

if TYPE_CHECKING:
    from ..service import KeyLedger

BUSY_MESSAGE = "store busy, retrying"
# Another process's audit activity alone (no catalog change) refreshes at most this often, so two
# dashboards reading each other's audited queries do not keep each other busy.
ACTIVITY_REFRESH_S = 3.0


def local_principal(explicit: str | None = None) -> str:
    """The principal of a dashboard without a login: ``--principal``, ``KEYLEDGER_PRINCIPAL``
    or the OS user."""
    return explicit or os.environ.get("KEYLEDGER_PRINCIPAL") or getpass.getuser()


def derive_roles(grants: pd.DataFrame, principal: str, key_names: list[str]
                 ) -> tuple[list[str], list[str]]:
    """(home-wide roles, keys this principal may administer) from ``ledger.grants()``.

    Home-wide roles are those granted on ``*`` to the principal or to everyone (``*``); a key
    may be administered with admin on ``*`` or on that key.
    """
    mine = grants[grants["principal"].isin([principal, WILDCARD])]
    home_roles = sorted(set(mine.loc[mine["key"] == WILDCARD, "role"]))
    if "admin" in home_roles:
        return home_roles, sorted(key_names)
    admin_on = set(mine.loc[(mine["key"] != WILDCARD) & (mine["role"] == "admin"), "key"])
    return home_roles, sorted(k for k in key_names if k in admin_on)


class DashboardState(param.Parameterized):
    """Filters, principal, roles and the data version one dashboard session works with."""

    owner = param.List(default=[], item_type=str, doc="Owners to show (empty: all).")
    tag = param.List(default=[], item_type=str, doc='Tags "name=value" that must all match.')
    key = param.List(default=[], item_type=str, doc="Keys to show (empty: all).")
    time_range: param.Selector[str] = param.Selector(
        default=DEFAULT_RANGE, objects=list(TIME_RANGES),
        doc="Time range of audit-based views, ending now.")
    selected_key = param.String(default=None, allow_None=True,
                                doc="The key the actions and drill-downs are about.")

    principal = param.String(default="", constant=True, doc="Who is looking (audited as).")
    roles = param.List(default=[], item_type=str, doc="Home-wide roles of the principal.")
    admin_keys = param.List(default=[], item_type=str, doc="Keys the principal may manage.")

    owner_options = param.List(default=[], item_type=str)
    tag_options = param.List(default=[], item_type=str)
    key_options = param.List(default=[], item_type=str)

    version = param.Integer(default=0, doc="Moves whenever refresh() saw new data.")
    status = param.String(default="", doc="One line for the status area.")
    status_level: param.Selector[str] = param.Selector(
        default="info", objects=["info", "success", "warning", "danger"])

    def __init__(self, ledger: KeyLedger, *,
                 detector: ChangeDetector | RemoteChangeDetector | None = None,
                 data: Data | None = None, **params: Any) -> None:
        params.setdefault("principal", ledger.principal)
        super().__init__(**params)
        self.ledger = ledger
        self.home = getattr(ledger, "url", None) or ledger.home  # a RemoteLedger: its URL
        self.detector = detector or detector_for(ledger)
        self.data = data or Data(ledger)
        self._token: Token | None = None
        self._retry = False
        self._last_refresh = 0.0

    # -- derived ---------------------------------------------------------------------------------
    @property
    def is_admin(self) -> bool:
        """May manage at least one key (admin on ``*`` or on a key): sees action controls."""
        return "admin" in self.roles or bool(self.admin_keys)

    @property
    def simulation(self) -> bool:
        """The home was created as a simulation: its times may come from a simulated clock."""
        return bool(getattr(self.ledger, "simulation", False))

    @property
    def can_read_audit(self) -> bool:
        """Admin or auditor home-wide: analytics, audit and compliance are readable."""
        return bool({"admin", "auditor"} & set(self.roles))

    def now(self) -> datetime:
        return self.ledger.now()

    def key_filters(self) -> kla.Filters:
        """The owner/tag/key filters (no time range)."""
        return kla.Filters(keys=tuple(self.key), owners=tuple(self.owner), tags=tuple(self.tag))

    def filters(self) -> kla.Filters:
        """The global filters including the time range (ending now)."""
        return range_filters(self.key_filters(), self.time_range, self.now())

    # -- refresh ---------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Refresh if the home changed since the last refresh (or a view asked to retry).
        Cheap when nothing changed: called every second by the app."""
        try:
            token = self.detector.token()
        except OSError:
            return False
        if token == self._token and not self._retry:
            return False
        if (not self._retry and not token.catalog_changed(self._token)
                and time.monotonic() - self._last_refresh < ACTIVITY_REFRESH_S):
            return False  # only audit activity elsewhere: batched, at most every few seconds
        return self.refresh(token=token)

    def refresh(self, force: bool = False, token: Token | None = None) -> bool:
        """Reload keys, grants and roles for the current token (``poll`` passes the one it just
        read) and move ``version`` so the views reload. On a busy store keep everything as it
        was and say so in ``status``."""
        token = token if token is not None else self.detector.token()
        if token == self._token and not force and not self._retry:
            return False
        old = self.data.token
        self.data.token = token
        try:
            keys = self.data.keys()
            grants = self.data.grants()
        except StoreBusy:
            self.data.token = old
            self.report_busy()
            return False
        except KeyLedgerError as exc:
            self.data.token = old
            self.set_status(message(exc), "danger")
            return False
        names = sorted(keys["name"])
        roles, admin_keys = derive_roles(grants, self.principal, names)
        tags = sorted({f"{k}={v}" for t in keys["tags"] for k, v in (t or {}).items()})
        owners = sorted({o for o in keys["owner"].dropna()})
        with param.parameterized.batch_call_watchers(self):
            self.owner_options, self.tag_options, self.key_options = owners, tags, names
            # filters on things that no longer exist would hide everything: drop them
            self.owner = [o for o in self.owner if o in owners]
            self.tag = [t for t in self.tag if t in tags]
            self.key = [k for k in self.key if k in names]
            if self.selected_key is not None and self.selected_key not in names:
                self.selected_key = None
            self.roles, self.admin_keys = roles, admin_keys
        self._token = token
        self._retry = False
        self._last_refresh = time.monotonic()
        self.version += 1
        if not self._retry:  # a view that hit a busy store during the update asks again
            self.set_status(f"Live · updated {datetime.now():%H:%M:%S}", "success")
        return True

    def report_busy(self) -> None:
        """A read met a busy store: keep the data shown, say so, and retry on the next poll."""
        self._retry = True
        self.set_status(BUSY_MESSAGE, "warning")

    def set_status(self, text: str, level: str = "info") -> None:
        with param.parameterized.batch_call_watchers(self):
            self.status_level = level
            self.status = text

    # -- actions ---------------------------------------------------------------------------------
    def run_action(self, label: str, fn: Callable[[], Any]) -> tuple[bool, str]:
        """Run one ledger action for this principal, then refresh every session of the process.

        Returns (ok, message); failures come back as the error's sentence, never raised.
        """
        try:
            result = fn()
        except KeyLedgerError as exc:
            text = f"{label} failed: {message(exc)}"
            self.set_status(text, "danger")
            return False, text
        note_local_change(self.home)
        self.refresh(force=True)
        text = f"{label}: done" if result is None else f"{label}: {result}"
        self.set_status(text, "success")
        return True, text


__all__ = ["ACTIVITY_REFRESH_S", "BUSY_MESSAGE", "DashboardState", "derive_roles",
           "local_principal"]
