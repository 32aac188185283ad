"""What a seeding returns and leaves behind: ``DemoResult``, its samples, and ``demo.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from ..analytics import SEVERITY_ORDER
from ..errors import ConfigError

DEMO_FILE = "demo.json"
EXPECTED = ("decrypts", "key destroyed", "key pending deletion", "key suspended",
            "below min_decryption_version", "tampered")


class Sample(NamedTuple):
    """A ciphertext made during seeding and what decrypting it now must do.

    ``expected`` is ``"decrypts"`` or why it is refused by design: ``key destroyed``, ``key
    pending deletion``, ``key suspended`` or ``below min_decryption_version`` (all
    ``KeyStateError``) or ``tampered`` (``InvalidCiphertext``). ``principal`` may decrypt it.
    """

    ciphertext: bytes
    context: dict[str, str]
    expected: str
    principal: str
    key: str
    version: int


@dataclass
class DemoResult:
    """What ``seed_demo`` built (or found, when the home was already seeded)."""

    home: Path
    keys: int
    records: int
    seconds: float
    principals: dict[str, str]  # name -> roles, as in demo.json
    sample: list[Sample] = field(default_factory=list)
    seed: int = 7
    months: int = 18
    start: datetime | None = None
    generated_at: datetime | None = None  # simulated end of the history
    states: dict[str, int] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)  # open findings by severity
    overdue: list[str] = field(default_factory=list)
    highlights: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds by kind of work
    unexpected: list[str] = field(default_factory=list)  # usage calls that failed (should be none)
    already_seeded: bool = False

    def __str__(self) -> str:
        return "\n".join(summary_lines(self))


def summary_lines(r: DemoResult) -> list[str]:
    span = (f"{r.start:%Y-%m-%d} -> {r.generated_at:%Y-%m-%d %H:%M} UTC"
            if r.start and r.generated_at else "-")
    head = ("demo home already seeded" if r.already_seeded else "seeded the demo estate")
    lines = [f"{head}: {r.home}",
             f"  {r.keys} keys, {r.months} months ({span}), seed {r.seed}"]
    if r.states:
        lines.append("  keys by state: " + ", ".join(f"{s} {n}" for s, n in
                                                       sorted(r.states.items(),
                                                              key=lambda x: -x[1])))
    lines.append(f"  audit records: {r.records:,}")
    if r.overdue:
        lines.append(f"  overdue for rotation: {len(r.overdue)} ({', '.join(r.overdue)})")
    if r.findings:
        lines.append("  open findings: " + ", ".join(f"{s} {r.findings[s]}" for s in SEVERITY_ORDER
                                                     if r.findings.get(s)))
    if r.unexpected:
        lines.append(f"  WARNING: {len(r.unexpected)} usage calls failed unexpectedly, e.g. "
                     f"{r.unexpected[0]}")
    lines.append("  log in as (principal):")
    width = max((len(p) for p in r.principals), default=0)
    lines += [f"    {name:<{width}}  {roles}" for name, roles in r.principals.items()]
    if not r.already_seeded:
        parts = sorted(r.timings.items(), key=lambda kv: -kv[1])
        lines.append(f"  seeded in {r.seconds:.1f} s" + (": " if parts else "") +
                     ", ".join(f"{what} {secs:.1f} s" for what, secs in parts if secs >= 0.05))
    return lines


def read_demo_file(home: Path) -> dict | None:
    path = home / DEMO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def write_demo_file(home: Path, doc: dict) -> None:
    tmp = home / (DEMO_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, home / DEMO_FILE)


def result_from_file(home: Path, doc: dict) -> DemoResult:
    principals = {p["name"]: ", ".join(p["roles"]) for p in doc.get("principals", [])}
    return DemoResult(
        home=home, keys=doc.get("keys", 0), records=doc.get("records", 0),
        seconds=doc.get("seconds", 0.0), principals=principals, seed=doc.get("seed", 0),
        months=doc.get("months", 0),
        start=datetime.fromisoformat(doc["start"]) if doc.get("start") else None,
        generated_at=(datetime.fromisoformat(doc["generated_at"])
                      if doc.get("generated_at") else None),
        states=doc.get("states", {}), findings=doc.get("findings", {}),
        overdue=doc.get("overdue", []), highlights=doc.get("highlights", {}),
        already_seeded=True)


def demo_doc(r: DemoResult) -> dict:
    return {
        "status": "complete", "seed": r.seed, "keys": r.keys, "months": r.months,
        "start": r.start.isoformat() if r.start else None,
        "generated_at": r.generated_at.isoformat() if r.generated_at else None,
        "records": r.records, "seconds": round(r.seconds, 1),
        "principals": [{"name": n, "roles": roles.split(", ")} for n, roles in
                       r.principals.items()],
        "states": r.states, "findings": r.findings, "overdue": r.overdue,
        "highlights": r.highlights,
        "timings": {k: round(v, 1) for k, v in r.timings.items()},
        "unexpected": r.unexpected,
    }
