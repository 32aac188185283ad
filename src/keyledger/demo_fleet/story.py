"""The story of the estate: the lifecycle events of the whole history, scheduled and then played.

``schedule`` puts every event on the simulation's calendar (creations, weekly due work, manual
rotations, incidents, denied and failed calls); each event is a method here, run at its
simulated time through the public API as the principal who would make it.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import AccessDenied, InvalidCiphertext, KeyLedgerError
from .plan import AUDITOR, DEVELOPERS, PLATFORM_ADMIN, SECURITY_LEAD, TEAMS, DemoKey

if TYPE_CHECKING:
    from .sim import Simulation

DEMO_PASSPHRASE = "keyledger-demo-backups"  # demo only: printed in docs/demo.md
# run_due evaluates compliance every 4th Monday (weekly at the end and in short histories)
COMPLIANCE_EVERY_WEEKS = 4
USAGE_LIMIT_DAYS = 14  # the near-limit key's usage limit: about this many days of encryptions


class Story:
    """The lifecycle events, played by the simulation ``sim`` at their simulated times."""

    def __init__(self, sim: Simulation) -> None:
        self.ledger, self.at, self.day_at = sim.ledger, sim.at, sim.day_at
        self.plan, self.rng, self.days = sim.plan, sim.rng, sim.days
        self.start, self.day0, self.clock = sim.start, sim.day0, sim.clock
        self.backups_dir, self.by_name = sim.backups_dir, sim.by_name
        self.metrics, self.model = sim.metrics, sim.model
        self.grants: dict[str, list[str]] = {}  # principal -> "role on key", for demo.json
        self.highlights: dict[str, Any] = {}

    def acknowledge_custody(self, admin: str) -> None:
        self.ledger(admin).acknowledge_custody()

    def grant(self, name: str, who: str, role: str, by: str = SECURITY_LEAD) -> None:
        self.ledger(by).grant(name, who, role)
        self.grants.setdefault(who, []).append(f"{role} on {name}")

    # -- building the story ------------------------------------------------------------------
    def schedule(self) -> None:
        p, rng, days = self.plan, self.rng, self.days
        self.at(self.start, self.setup_home)
        for i, k in enumerate(p.keys):
            when = (self.day_at(k.created_day, 9 + rng.random() * 6) if k.created_day
                    else self.start + timedelta(minutes=5 + 2 * i))
            self.at(when, partial(self.create, k), "create keys, grants, policies")
        # weekly due work (Monday 02:00), audit verification, backups
        # (quarterly at first, weekly in the last weeks: the SOC 2 finding gets resolved)
        # run_due evaluates compliance every fourth week and every week of the last four (a
        # trend point each time; an evaluation costs ~0.4 s, the rotations alone much less)
        verify_weekly_from, last_verify = days - min(28, days // 3), 0
        mondays, every = 0, max(1, min(COMPLIANCE_EVERY_WEEKS, days // 7 // 12))
        for d in range(1, days + 1):
            if (self.day0 + timedelta(days=d)).weekday() == 0:
                if d >= verify_weekly_from or d - last_verify >= 91:
                    self.at(self.day_at(d, 1.5), self.verify)
                    last_verify = d
                evaluate = mondays % every == 0 or d >= days - 28
                self.at(self.day_at(d, 2), partial(self.run_due, compliance=evaluate),
                        "run due")
                mondays += 1
        self.at(self.day_at(days - 14, 3), self.backup)
        self.at(self.day_at(days - 13, 4), self.restore_test)
        # custodian acknowledgements (three team admins never give theirs: a PCI finding)
        # (renewed yearly, as PCI DSS 3.7.8 asks)
        firsts = [(SECURITY_LEAD, 1), (PLATFORM_ADMIN, 2)] + [
            (t.admin, 3 + i + min(k.created_day for k in p.keys if k.team is t and k.owner))
            for i, t in enumerate(TEAMS[:5])]
        for admin, first in firsts:
            for d in range(first, days, 360):
                self.at(self.day_at(d, 9.5), partial(self.acknowledge_custody, admin),
                        "other lifecycle events")
        self._schedule_rotations()
        self._schedule_incidents()
        self._schedule_noise()

    def _schedule_rotations(self) -> None:
        p, rng, days = self.plan, self.rng, self.days
        ordinary = [k for k in p.keys if k.role is None and not k.spec.startswith("RSA")]
        for _ in range(max(2, len(p.keys) * days // 3300)):
            k = rng.choice(ordinary)
            d = rng.randint(k.created_day + 3, max(k.created_day + 3, days - 2))
            if d < days:
                reason = rng.choice(("rotated early: engineer left the team",
                                     "rotated early: key id seen in a support ticket",
                                     "rotated early: service migration",
                                     "rotated early: quarterly hygiene"))
                self.at(self.day_at(d, 10 + rng.random() * 7),
                        partial(self.rotate, k, k.team.admin, reason), "manual rotations")
        for i, k in enumerate(p.neglected):  # rotated by hand a few times, then forgotten
            period = 30 if days < 180 else 90
            overdue = 12 + 25 * i
            d = period - 5
            while d + period < days - overdue:
                self.at(self.day_at(d, 11), partial(self.rotate, k, k.team.admin,
                                                    "manual rotation"),
                        "manual rotations")
                d += period - 5

    def _schedule_incidents(self) -> None:
        p, days = self.plan, self.days
        # a key compromised, replaced, its data re-encrypted and the old version retired
        c = p.compromised_rotated
        d = max(c.created_day + 8, round(days * 0.55))
        self.at(self.day_at(d, 14.5), lambda: self.compromise(c, "API token and key id leaked "
                                                                 "in a public CI log"))
        self.at(self.day_at(d + 1, 9.5), lambda: self.rotate(c, c.team.admin,
                                                             "replace the compromised version"))
        self.at(self.day_at(d + 2, 10), lambda: self.rewrap(c))
        self.at(self.day_at(d + 7, 10), lambda: self.raise_min_decryption(c))
        # compromised a few days ago, not replaced yet (a compliance finding)
        o = p.compromised_open
        self.at(self.day_at(days - 4, 16), lambda: self.compromise(
            o, "signing key found on a decommissioned build agent"))
        # destroyed by run_due once its waiting period passed (no dual control: a finding)
        self.at(self.day_at(round(days * 0.4), 11), lambda: self.schedule_deletion(
            p.destroyed_due, 7, "service retired"))
        # destroyed with dual control: quorum 2, a request and a second admin's approval
        q = p.destroyed_dual
        d = round(days * 0.3)
        self.at(self.day_at(d, 11), lambda: self.schedule_deletion(q, 7, "vendor contract ended"))
        self.at(self.day_at(d + 8, 10), lambda: self.request_destroy(q))
        self.at(self.day_at(d + 8, 15), lambda: self.approve_pending(q))
        # pending deletions, and a destroy request with one approval of two
        for i, k in enumerate(p.pending):
            self.at(self.day_at(days - 10 - 5 * i, 11),
                    partial(self.schedule_deletion, k, 30, "replaced by a new key"))
        r = p.pending_request
        self.at(self.day_at(days - 14, 11), lambda: self.schedule_deletion(
            r, 7, "data migrated to the new store"))
        self.at(self.day_at(days - 1, 15), lambda: self.request_destroy(r))
        # suspended, an unjustified HIPAA exception for it, a KEK exception with a reason
        s = p.disabled
        d = round(days * 0.8)
        self.at(self.day_at(d, 12), lambda: self.disable(s))
        self.at(self.day_at(d + 2, 12), lambda: self.accept(
            "hipaa.phi-without-encryption", s.name, "vendor does it", "180d"))
        kek = next((k for k in p.keys if k.purpose == "wrap" and k.role is None), None)
        if kek is not None:
            self.at(self.day_at(max(kek.created_day + 1, days - 60), 12), lambda: self.accept(
                "cis.symmetric-rotation", kek.name, "KEKs rotate yearly by design; the data "
                "keys they wrap rotate every 90 days (risk review RR-114)", "365d"))
        # an admin who also uses one of the team's keys
        self.at(self.day_at(max(p.sod.created_day + 2, days // 5), 16), lambda: self.grant(
            p.sod.name, p.sod.team.admin, "user"))
        self.highlights["separation_of_duties"] = {"principal": p.sod.team.admin,
                                                   "key": p.sod.name}

    def _schedule_noise(self) -> None:
        """Denied calls (no grant) and failed decrypts (tampered data, wrong context)."""
        rng, days, keys = self.rng, self.days, self.plan.keys
        everyone = [s for t in TEAMS for s in t.services] + list(DEVELOPERS)
        for d in range(1, days):
            for _ in range(rng.choice((0, 0, 1, 1, 2))):
                k = rng.choice(keys)
                who = rng.choice([p for p in everyone if p not in k.users])
                self.at(self.day_at(d, 8 + rng.random() * 10),
                        partial(self.denied, k, who), "denied and failed calls")
            if rng.random() < 0.3:
                k = rng.choice(keys)
                self.at(self.day_at(d, 8 + rng.random() * 10),
                        partial(self.tampered, k, rng.random() < 0.5),
                        "denied and failed calls")
        # one afternoon a misconfigured deployment hammers a key it has no grant on
        d = round(days * 0.62)
        k = next(k for k in keys if k.purpose == "encrypt" and k.created_day < d and
                 "svc-mobile-api" not in k.users)

        def hammer() -> None:  # eight denied encrypts in a row
            for _ in range(8):
                self.denied(k, "svc-mobile-api", encrypt=True)

        for i in range(30):
            self.at(self.day_at(d, 13 + i / 20), hammer, "denied and failed calls")

    # -- lifecycle events --------------------------------------------------------------------------
    def setup_home(self) -> None:
        lead = self.ledger(SECURITY_LEAD)  # the first principal becomes the home's admin
        lead.set_policy("*", creator_is_user=False, rotation_by_tag={"env=dev": "180d"},
                        rotation_by_purpose={"encrypt": "90d", "mac": "90d", "wrap": "365d",
                                             "sign": "365d"})
        self.grants[SECURITY_LEAD] = ["admin on *"]
        self.grant("*", PLATFORM_ADMIN, "admin")
        self.grant("*", AUDITOR, "auditor")

    def create(self, k: DemoKey) -> None:
        lead = self.ledger(SECURITY_LEAD)
        lead.create_key(k.name, spec=k.spec, purpose=k.purpose, owner=k.owner, tags=k.tags,
                        rotation_period=k.rotation_period, exportable=k.role == "exportable",
                        activate=k.role != "pre-activation")
        k.state = "pre-activation" if k.role == "pre-activation" else "active"
        if k.owner:
            self.grant(k.name, k.team.admin, "admin")
        if k.role in ("pre-activation", "stale"):
            return
        for who in k.users:
            self.grant(k.name, who, "user")
        if k.role == "neglected":
            lead.set_policy(k.name, auto_rotate=False)
        elif k.role in ("destroyed-dual-control", "pending-destroy-request"):
            lead.set_policy(k.name, quorum=2)
        elif k.role == "usage-limited":
            k.limit = int(max(200, round(self.model.stream_rate(k) * 0.45 * USAGE_LIMIT_DAYS, -2)))
            k.cap = k.limit
            lead.set_policy(k.name, usage_limit=k.limit)
        self.model.add_streams(k)

    def rotate(self, k: DemoKey, who: str, reason: str) -> None:
        if k.state not in ("active", "compromised"):
            return
        self.ledger(who).rotate(k.name, reason=reason)
        k.version += 1
        k.state = "active"
        k.count = 0

    def compromise(self, k: DemoKey, reason: str) -> None:
        self.ledger(SECURITY_LEAD).mark_compromised(k.name, reason)
        k.state = "compromised"

    def rewrap(self, k: DemoKey) -> None:
        """The service re-encrypts the data it keeps under the current version."""
        for i, (blob, ctx, version, who) in enumerate(list(k.pool)):
            if version < k.version:
                new = self.ledger(who).rewrap(blob, context=ctx)
                k.pool[i] = (new, ctx, k.version, who)
        k.pool_rev += 1

    def raise_min_decryption(self, k: DemoKey) -> None:
        self.ledger(k.team.admin).set_policy(k.name, min_decryption_version=k.version)
        k.min_dec = k.version
        k.pool = [e for e in k.pool if e[2] >= k.min_dec]
        k.pool_i = 0
        k.pool_rev += 1

    def schedule_deletion(self, k: DemoKey, days: int, reason: str) -> None:
        if k.state in ("active", "suspended", "compromised", "deactivated"):
            self.ledger(k.team.admin).schedule_deletion(k.name, days, reason=reason)
            k.state = "pending-deletion"

    def request_destroy(self, k: DemoKey) -> None:
        rid = self.ledger(k.team.admin).request("destroy", k.name, "waiting period over; "
                                                "nothing decrypts with it any more")
        self.highlights.setdefault("requests", {})[k.name] = rid

    def approve_pending(self, k: DemoKey) -> None:
        rid = self.highlights["requests"][k.name]
        if self.ledger(SECURITY_LEAD).approve(rid)["executed"]:
            k.state = "destroyed"

    def disable(self, k: DemoKey) -> None:
        if k.state == "active":
            self.ledger(k.team.admin).disable(k.name, reason="fax gateway integration paused")
            k.state = "suspended"

    def accept(self, rule: str, name: str, reason: str, until: str) -> None:
        self.ledger(SECURITY_LEAD).accept_finding(rule, name, reason, until)

    def run_due(self, compliance: bool = True) -> None:
        report = self.ledger(PLATFORM_ADMIN).run_due(compliance=compliance)
        for item in report.done:
            k = self.by_name.get(item["key"])
            if k is None:
                continue
            if item["action"] == "rotate":
                k.version += 1
                k.count = 0
            elif item["action"] == "destroy":
                k.state = "destroyed"
            elif item["action"] == "deactivate":
                k.state = "deactivated"

    def verify(self) -> None:
        report = self.ledger(AUDITOR).verify_audit()
        if not report.ok:
            raise KeyLedgerError(f"the demo's audit ledger does not verify: {report}")

    def backup(self) -> None:
        self.backups_dir.mkdir(parents=True, exist_ok=True)
        path = self.backups_dir / f"keyledger-{self.clock.now:%Y%m%d-%H%M}.klbk"
        info = self.ledger(SECURITY_LEAD).backup(path, passphrase=DEMO_PASSPHRASE)
        self.highlights.setdefault("backups", []).append(str(info.path))

    def restore_test(self) -> None:
        path = self.highlights["backups"][-1]
        report = self.ledger(SECURITY_LEAD).restore_test(path, passphrase=DEMO_PASSPHRASE)
        self.highlights["restore_test_ok"] = report.ok

    def denied(self, k: DemoKey, who: str, encrypt: bool = False) -> None:
        if k.state == "new":  # not created yet
            return
        led = self.ledger(who)
        try:
            if k.pool and not encrypt:
                blob, ctx, _, _ = k.pool[0]
                led.decrypt(blob, context=ctx)
            elif k.purpose in ("encrypt", "wrap"):
                led.encrypt(k.name, b"not allowed", context={"app": who})
            elif k.purpose == "mac":
                led.mac(k.name, b"not allowed")
            else:
                led.sign(k.name, b"not allowed")
        except AccessDenied:
            return
        self.metrics.unexpected.append(f"{who} was not denied on {k.name}")

    def tampered(self, k: DemoKey, wrong_context: bool) -> None:
        if not k.pool or not k.process_ok:
            return
        blob, ctx, _, who = k.pool[-1]
        try:
            if wrong_context:
                self.ledger(who).decrypt(blob, context={**ctx, "tenant": "someone-else"})
            else:
                self.ledger(who).decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), context=ctx)
        except InvalidCiphertext:
            return
        self.metrics.unexpected.append(f"a tampered ciphertext of {k.name} decrypted")
