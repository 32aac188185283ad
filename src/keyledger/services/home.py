"""The home as a whole: opening it (first admin, repairs), the HSM's capabilities,
reconciliation with the HSM, a version's HSM attributes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from ..errors import KeyStateError
from ..hsm.backend import Capabilities
from ..model import validate_bool, validate_version
from ..runtime import ReconcileReport, naive
from ..store import grants as grants_repo
from .context import Service


class HomeService(Service):
    """Opening a home for a principal, and the calls about the home and its HSM."""

    def open(self, clock: Callable[[], datetime] | None) -> ReconcileReport:
        """The audited ``open``: accept the clock, make the first principal the admin of a new
        home, repair what an interrupted HSM change left behind (reported to the caller)."""
        with self._audited("open", None) as rec:
            self.ctx.accept_clock(clock)
            notes = [self._rt.mode_note] if self._rt.mode_note else []
            self._rt.mode_note = None
            if self.bootstrap_admin(self._now()):
                notes.insert(0, f"{self.principal} initialised the home and is its first admin")
            report = self._rt.reconcile(self.principal, now=self._now())
            if not report.clean:
                notes.append(str(report))
            rec.detail = "; ".join(notes)[:500] or None
            return report

    def bootstrap_admin(self, now: datetime) -> bool:
        """Make the first principal ever to open this home its admin (deny by default after)."""
        if self._rt.catalog.grants_now():
            return False
        with self._rt.db.write() as tx:
            if grants_repo.count(tx):
                return False
            grants_repo.add(tx, scope="*", principal=self.principal, role="admin",
                            granted_by=self.principal, now=naive(now))
        self._rt.catalog.refresh(force=True)
        return True

    def capabilities(self) -> Capabilities:
        """What the HSM module supports (e.g. SoftHSM 2.6.1 lacks RSA-OAEP-SHA256)."""
        with self._audited("capabilities", None) as rec:
            self._authorize(rec, "capabilities", None)
            return self._rt.backend.capabilities()

    def reconcile(self, *, full: bool = True) -> ReconcileReport:
        """Repair interrupted operations and (``full``) check every version's HSM material."""
        with self._audited("reconcile", None) as rec:
            self._authorize(rec, "reconcile", None)
            report = self._rt.reconcile(self.principal, full=validate_bool(full, "full"),
                                        now=self._now())
            rec.detail = str(report)[:500]
            return report

    def key_attributes(self, name: str, *, version: int | None = None):
        """CKA_SENSITIVE / CKA_EXTRACTABLE of a version as the HSM reports them."""
        with self._audited("key_attributes", name) as rec:
            key = self._key(rec, name)
            v = key.versions.get(validate_version(version) or key.latest_version)
            if v is None or v.state == "destroyed":
                raise KeyStateError(f"version {version} of {key.name!r} is destroyed or unknown; "
                                    f"its versions are 1 to {key.latest_version}")
            rec.version = v.version
            return self._rt.backend.attributes(v.handle)
