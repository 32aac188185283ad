"""What a seeding measured (calls, wall time by kind of work, samples, unexpected failures) and
the estate as it reads back at the end."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from ..errors import KeyLedgerError
from .plan import AUDITOR, PLATFORM_ADMIN, SECURITY_LEAD, TEAMS
from .result import DemoResult, Sample

if TYPE_CHECKING:
    from .sim import Simulation


@dataclass
class Metrics:
    """Counted while seeding; the traffic workers' results are added in by ``WorkerPool``."""

    samples: list[Sample] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # the first 20 unexpected failures
    unexpected_count: int = 0
    calls: int = 0
    # wall seconds by kind of work
    timings: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))


def read_back(sim: Simulation) -> DemoResult:
    """Read back what the estate looks like (as the auditor), verify the ledger, label samples."""
    t0 = time.perf_counter()
    sim.clock.now = sim.end - timedelta(minutes=5)
    anna = sim.ledger(AUDITOR)
    df = anna.list_keys()
    states = Counter(df["state"])
    end = sim.end
    overdue = sorted(df[(df["state"] == "active") & (df["next_rotation_due"].notna()) &
                        (df["next_rotation_due"] <= end)]["name"])
    findings: dict[str, int] = {}
    trend = anna.compliance_trend()
    if len(trend):
        last = trend[trend["run_id"] == trend.loc[trend["time"].idxmax(), "run_id"]]
        for sev, n in last.groupby("severity")["open"].sum().items():
            findings[str(sev)] = int(n)
    sim.clock.now = sim.end - timedelta(minutes=1)
    anna.flush_audit()
    report = anna.verify_audit()
    if not report.ok:
        raise KeyLedgerError(f"the demo's audit ledger does not verify: {report}")
    sim.clock.now = sim.end
    by_name = {r.name: r for r in df.itertuples()}
    samples: list[Sample] = []
    # in (key, version) order: the same whichever worker made which ciphertext when
    for i, s in enumerate(sorted(sim.metrics.samples, key=lambda s: (s.key, s.version))):
        row = by_name[s.key]
        if row.state == "destroyed":
            why = "key destroyed"
        elif row.state == "pending-deletion":
            why = "key pending deletion"
        elif row.state == "suspended":
            why = "key suspended"
        elif s.version < row.min_decryption_version:
            why = "below min_decryption_version"
        else:
            why = "decrypts"
        samples.append(s._replace(expected=why))
        if why == "decrypts" and i % 8 == 3:
            blob = s.ciphertext
            samples.append(s._replace(ciphertext=blob[:-1] + bytes([blob[-1] ^ 0x5A]),
                                      expected="tampered"))
    p = sim.plan
    sim.story.highlights.update({
        "compromised": p.compromised_open.name,
        "compromised_and_replaced": p.compromised_rotated.name,
        "near_usage_limit": p.usage_limited.name, "stale": p.stale.name,
        "neglected": [k.name for k in p.neglected], "overdue": overdue,
        "pending_deletion": [k.name for k in p.pending] + [p.pending_request.name],
        "destroyed": [p.destroyed_due.name, p.destroyed_dual.name],
        "suspended": p.disabled.name, "pre_activation": p.preactivation.name,
        "exportable": p.exportable.name,
        "pending_request": sim.story.highlights.get("requests", {}).get(p.pending_request.name),
    })
    sim.metrics.timings["read back and verify"] += time.perf_counter() - t0
    return DemoResult(home=sim.home, keys=len(df), records=report.records, timings=dict(sim.metrics.timings),
                      seconds=0.0, principals=principals_summary(sim),  # seed_demo sets it last
                      sample=samples, seed=sim.seed, months=sim.months, start=sim.start,
                      generated_at=sim.end, states=dict(states), findings=findings,
                      overdue=overdue, highlights=sim.story.highlights,
                      unexpected=sim.metrics.unexpected + ([f"... {sim.metrics.unexpected_count} in all"]
                                                   if sim.metrics.unexpected_count > 20 else []))


def principals_summary(sim: Simulation) -> dict[str, str]:
    """name -> a short description of the roles, admins first."""
    out: dict[str, str] = {}
    for who, grants in sim.story.grants.items():
        star = [g for g in grants if g.endswith(" on *")]
        per = Counter(g.split(" on ")[0] for g in grants if not g.endswith(" on *"))
        parts = star + [f"{role} on {n} key{'s' if n > 1 else ''}" for role, n in per.items()]
        out[who] = ", ".join(parts)
    order = {SECURITY_LEAD: 0, PLATFORM_ADMIN: 1, AUDITOR: 2}
    admins = {t.admin for t in TEAMS}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 3 if kv[0] in admins else
                                                            4 if kv[0].startswith("svc-") else 5),
                                                    kv[0])))
