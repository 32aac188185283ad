"""Due work: which keys must rotate (by time or by usage), be destroyed, or be deactivated.

Pure functions over the catalog and usage counts; ``KeyLedger.run_due`` executes the plan.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .frames import normalize
from .model import Key, KeyState, Purpose, invalid_usage_limit, usage_limit

if TYPE_CHECKING:
    import pandas as pd

# Originator-usage period (NIST SP 800-57 Table 1): after it, a key that is not rotated
# automatically stops applying protection (it is deactivated; it still decrypts/verifies).
DEFAULT_OUP = {Purpose.ENCRYPT: timedelta(days=730), Purpose.WRAP: timedelta(days=730),
               Purpose.MAC: timedelta(days=730), Purpose.SIGN: timedelta(days=1095)}
PROTECT_ACTIONS = ("encrypt", "generate_data_key", "envelope_encrypt", "rewrap", "encrypt_many",
                   "rewrap_many")


@dataclass(frozen=True)
class DueItem:
    action: str  # rotate | destroy | deactivate
    key: str
    reason: str


def plan(keys: list[Key], encryptions: dict[tuple[str, int], int], home_policy: dict,
         now: datetime) -> list[DueItem]:
    """What is due at ``now``: rotations by period or usage, destructions, deactivations."""
    items: list[DueItem] = []
    for key in sorted(keys, key=lambda k: k.name):
        if key.state is KeyState.PENDING_DELETION:
            if key.deletion_due is not None and key.deletion_due <= now:
                items.append(DueItem("destroy", key.name,
                                     f"deletion window ended {key.deletion_due:%Y-%m-%d %H:%M}"))
            continue
        if key.state is not KeyState.ACTIVE:
            continue
        if not key.policy.get("auto_rotate", True):
            oup = DEFAULT_OUP[key.purpose]
            if now >= key.rotated_at + oup:
                items.append(DueItem("deactivate", key.name,
                                     f"originator-usage period of {oup.days} days passed "
                                     "without rotation (auto_rotate is off)"))
            continue
        due = key.next_rotation_due
        used = encryptions.get((key.key_id, key.latest_version), 0)
        limit = usage_limit(key.policy, home_policy)
        if due is not None and due <= now:
            items.append(DueItem("rotate", key.name,
                                 f"rotation period of {_days(key.rotation_period)} reached "
                                 f"({key.rotation_source} policy)"))
        elif key.purpose in (Purpose.ENCRYPT, Purpose.WRAP) and used >= limit:
            items.append(DueItem("rotate", key.name,
                                 f"v{key.latest_version} reached its usage limit "
                                 f"({used:,} of {limit:,} encryptions)"))
    return items


def invalid_usage_limits(keys: list[Key], home_policy: dict) -> list[dict]:
    """Report entries for stored usage limits that are no valid limit (e.g. 2**64 written by an
    older release): they are ignored, and the home's limit or the 2**32 default applies."""
    fix = ("set a limit from 1 to 2**63-1 with set_policy; until then the home's limit or the "
           "default 2**32 applies")
    out = []
    if (bad := invalid_usage_limit(home_policy)) is not None:
        out.append({"action": "usage_limit", "key": "*",
                    "reason": f"the home's stored usage_limit {bad!r} is invalid; {fix}"})
    for key in sorted(keys, key=lambda k: k.name):
        if (bad := invalid_usage_limit(key.policy)) is not None:
            out.append({"action": "usage_limit", "key": key.name,
                        "reason": f"stored usage_limit {bad!r} is invalid; {fix}"})
    return out


def _days(period: timedelta | None) -> str:
    return "-" if period is None else f"{period.days} days"


@dataclass
class DueReport:
    """What ``run_due`` did and what it skipped, and why."""

    now: datetime
    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    compliance: str | None = None  # the compliance evaluation that closed the run

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        rows = [{"outcome": "done", **d} for d in self.done]
        rows += [{"outcome": "skipped", **d} for d in self.skipped]
        return normalize(pd.DataFrame(rows, columns=["outcome", "action", "key", "reason"]))

    def __str__(self) -> str:
        lines = [f"due work at {self.now:%Y-%m-%d %H:%M} UTC: {len(self.done)} done, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  done    {d['action']:<10} {d['key']}: {d['reason']}" for d in self.done]
        lines += [f"  skipped {d['action']:<10} {d['key']}: {d['reason']}" for d in self.skipped]
        if self.compliance:
            lines.append(f"  compliance {self.compliance}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return (f"<b>{html.escape(str(self).splitlines()[0])}</b>"
                + self.to_frame().to_html(index=False))
