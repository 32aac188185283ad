"""Compliance engine: rules as data (TOML + SQL), findings with evidence, history, reports.

``KeyLedger.compliance()`` evaluates every rule of the selected frameworks against the store
(keys, versions, transitions, grants, approvals, audit log, usage counters, backups, ...) and
returns one row per finding. Rules live in ``compliance/rules/*.toml`` (one file per framework)
and ``<home>/rules/*.toml``; see ``rules.py`` for the format and docs/compliance.md for the
rule catalogue.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import outputs
from ..errors import AuditError, InvalidInput, PolicyViolation
from ..frames import normalize
from ..model import parse_period
from ..services.context import Service
from ..store import compliance as engine
from ..store.compliance import Evaluation
from .rules import SEVERITIES, Rule, RuleSet, load_rules

if TYPE_CHECKING:
    import pandas as pd

    from ..display import FindingsFrame

# Exceptions are reviewed at least yearly (PCI DSS 12.4 style): no longer expiry is accepted.
MAX_EXCEPTION_DAYS = 366
REPORT_FORMATS = ("html", "md")
_SEVERITY = {"severity": SEVERITIES}  # ordered categorical, most severe first: critical


class ComplianceMixin(Service):
    """The compliance service's calls (services/compliance.py): compliance, compliance_trend,
    accept_finding, compliance_report."""

    # -- evaluation ------------------------------------------------------------------------------
    def compliance(self, frameworks: str | list[str] | None = None,
                   now: datetime | None = None, *, include_accepted: bool = False
                   ) -> pd.DataFrame:
        """Evaluate the rules of ``frameworks`` (all by default) and return the findings.

        One row per finding: rule_id, framework, control, severity, title, key, version,
        principal, evidence (JSON text with values and audit ``seq`` ids), remediation,
        first_seen (when this finding was first seen open) and status (``new`` in this
        evaluation, ``open`` since an earlier one; ``accepted`` rows, hidden unless
        ``include_accepted``, are covered by an unexpired ``accept_finding`` exception).
        Every evaluation is stored, so ``compliance_trend()`` can chart it. ``now`` (default:
        the ledger's clock) is the moment the rules are judged at.
        """
        with self._audited("compliance", None) as rec:
            self._authorize(rec, "compliance", None)
            ev = self.evaluate(frameworks, now)
            df = ev.findings if include_accepted else ev.visible()
            rec.detail = (f"run {ev.run_id}: {len(ev.visible())} findings "
                          f"({_by_severity(ev.visible())}), "
                          f"{int((ev.findings['status'] == 'accepted').sum())} accepted, "
                          f"{len(ev.rules)} rules")[:500]
            return _findings_frame(df)

    def evaluate(self, frameworks: object, now: datetime | None,
                 collect: Any = None) -> Evaluation:
        """Evaluate the rules and store the run (unaudited: the caller's call is audited; due
        work evaluates as part of its run)."""
        when = self._when(now)
        ruleset = load_rules(self.home)
        ruleset.resolve_frameworks(frameworks)  # unknown names fail before any work
        with self._rt.db.hold():  # the ingest and the evaluation share one open of the store
            try:
                self._rt.ingest()
            except AuditError:  # a ledger that fails its checkpoint: evaluate what is there
                pass
            with self._rt.db.write(export=False) as tx:
                ev = engine.evaluate(tx, ruleset, now=when, frameworks=frameworks,
                                     principal=self.principal)
                if collect is not None:
                    collect(tx, ev, ruleset)
        return ev

    def _when(self, now: object) -> datetime:
        if now is None:
            return self._now()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise InvalidInput("now must be a timezone-aware datetime (e.g. datetime.now(UTC))")
        return now

    def compliance_trend(self, frameworks: str | list[str] | None = None
                         ) -> pd.DataFrame:
        """Per stored evaluation, framework and severity: open, opened (new), resolved and
        accepted findings, and the mean/max days the open ones have been open."""
        with self._audited("compliance_trend", None) as rec:
            self._authorize(rec, "compliance", None)
            names = (load_rules(self.home).resolve_frameworks(frameworks)
                     if frameworks is not None else None)
            with self._rt.db.write(export=False) as tx:
                return normalize(engine.trend(tx, names), categories=_SEVERITY)

    def findings(self, frameworks: str | list[str] | None = None, *,
                 include_accepted: bool = False) -> pd.DataFrame:
        """The open findings as of the last stored evaluation, without evaluating again.

        Same columns as ``compliance()`` (``status`` is ``open``, ``new`` when first seen in
        the last run, or ``accepted``) plus ``last_seen``; cheap enough for a dashboard to
        poll. ``run_due`` and ``compliance`` keep the stored evaluation fresh.
        """
        with self._audited("findings", None) as rec:
            self._authorize(rec, "compliance", None)
            ruleset = load_rules(self.home)
            names = (ruleset.resolve_frameworks(frameworks) if frameworks is not None else None)
            with self._rt.db.write(export=False) as tx:
                df = engine.stored_findings(tx, engine.rules_table(list(ruleset.rules.values())),
                                            self._now(), names)
            if not include_accepted:
                df = df[df["status"] != "accepted"].reset_index(drop=True)
            return _findings_frame(df)

    def compliance_rules(self) -> pd.DataFrame:
        """The loaded rules: id, framework, control, severity, title, parameters and source."""
        with self._audited("compliance_rules", None) as rec:
            self._authorize(rec, "compliance", None)
            return normalize(rules_frame(load_rules(self.home)), categories=_SEVERITY)

    # -- exceptions ------------------------------------------------------------------------------
    def accept_finding(self, rule_id: str, key: str | None, reason: str,
                       until: datetime | timedelta | str) -> dict[str, Any]:
        """Document an accepted exception (e.g. a HIPAA addressable decision) until it expires.

        Findings of ``rule_id`` on ``key`` (``None``: the home-wide findings of that rule) are
        hidden from ``compliance()`` until ``until`` (a datetime, or a period such as ``"90d"``
        from now; at most a year), and listed with the reason in reports. Needs the admin role.
        """
        with self._audited("accept_finding", key if isinstance(key, str) else None) as rec:
            ruleset = load_rules(self.home)
            if not isinstance(rule_id, str) or rule_id not in ruleset.rules:
                raise InvalidInput(f"unknown rule {rule_id!r}; see compliance_rules() for the ids")
            rule = ruleset.rules[rule_id]
            if key is None:
                self._authorize(rec, "accept_finding", None)
                name = None
            else:
                name = self._key(rec, key).name
            if not isinstance(reason, str) or not reason.strip():
                raise InvalidInput("say why the finding is accepted and what mitigates it "
                                   "(reason=...); auditors read it")
            now = self._now()
            expires = self._expiry(until, now)
            exception_id = uuid.uuid4().hex[:12]
            with self._rt.db.write(export=False) as tx:
                engine.add_exception(tx, exception_id=exception_id, rule_id=rule.id,
                                     framework=rule.framework, key=name,
                                     reason=reason.strip()[:4000], accepted_by=self.principal,
                                     accepted_at=now, until=expires)
            rec.detail = (f"exception {exception_id}: {rule.id} on {name or 'the home'} accepted "
                          f"until {expires:%Y-%m-%d %H:%M} UTC: {reason.strip()}")[:500]
            return {"exception_id": exception_id, "rule_id": rule.id,
                    "framework": rule.framework, "key": name, "reason": reason.strip(),
                    "accepted_by": self.principal, "accepted_at": now, "until": expires}

    @staticmethod
    def _expiry(until: object, now: datetime) -> datetime:
        if isinstance(until, datetime):
            if until.tzinfo is None:
                raise InvalidInput("until must be a timezone-aware datetime")
            expires = until
        elif isinstance(until, timedelta | str):
            expires = now + parse_period(until)
        else:
            raise InvalidInput("until must be a datetime or a period such as '90d'")
        if expires <= now:
            raise InvalidInput("until must be in the future")
        if expires > now + timedelta(days=MAX_EXCEPTION_DAYS):
            raise PolicyViolation(f"an exception may last at most {MAX_EXCEPTION_DAYS} days; "
                                  "review it and accept it again when it expires")
        return expires

    def compliance_exceptions(self) -> pd.DataFrame:
        """Every accepted exception, with ``active`` true until it expires."""
        with self._audited("compliance_exceptions", None) as rec:
            self._authorize(rec, "compliance", None)
            with self._rt.db.write(export=False) as tx:
                return normalize(engine.exceptions(tx, self._now()))

    # -- report ----------------------------------------------------------------------------------
    def compliance_report(self, path: str | os.PathLike, format: str = "html", *,
                          frameworks: str | list[str] | None = None,
                          now: datetime | None = None, overwrite: bool = False) -> Path:
        """Evaluate and write a self-contained report (``html`` with an inline SVG chart, or
        ``md``) for an auditor: scope, summary by framework and severity, every finding with
        its evidence and remediation, and the accepted exceptions with their expiry.

        ``path`` must lie outside the home and not exist yet (``overwrite=True`` replaces an
        existing file); the report is written privately (0600) and atomically."""
        from . import report

        with self._audited("compliance_report", None) as rec:
            self._authorize(rec, "compliance_report", None)
            if format not in REPORT_FORMATS:
                raise InvalidInput(f"format must be one of {', '.join(REPORT_FORMATS)}, "
                                   f"not {format!r}")
            out = outputs.check_target(path, outputs.protected_paths(self._rt.settings),
                                       overwrite=overwrite, what="report")
            box: dict[str, Any] = {}

            def collect(tx: Any, ev: Evaluation, ruleset: RuleSet) -> None:
                box["data"] = report.collect(tx, ev, ruleset, home=self.home,
                                             principal=self.principal)

            ev = self.evaluate(frameworks, now, collect)
            text = report.render(box["data"], format)
            outputs.write_file(out, text.encode("utf-8"), overwrite=overwrite)
            rec.detail = (f"{format} report of run {ev.run_id} to {out}: "
                          f"{len(ev.visible())} findings")[:500]
            return out


def _findings_frame(df: pd.DataFrame) -> FindingsFrame:
    """Findings as handed out: severity an ordered categorical that sorts critical first."""
    from ..display import FindingsFrame  # pandas-based: loaded with the first findings

    return FindingsFrame(normalize(df.copy(), categories=_SEVERITY))


def _by_severity(df: pd.DataFrame) -> str:
    counts = df["severity"].value_counts()
    parts = [f"{int(counts[s])} {s}" for s in SEVERITIES if s in counts]
    return ", ".join(parts) or "none"


def rules_frame(ruleset: RuleSet) -> pd.DataFrame:
    import pandas as pd

    rows = [{"rule_id": r.id, "framework": r.framework, "control": r.control,
             "severity": r.severity, "title": r.title, "enabled": r.enabled,
             "parameters": dict(r.parameters), "check_from": r.check_from, "source": r.source}
            for r in ruleset.rules.values()]
    return pd.DataFrame(rows, columns=["rule_id", "framework", "control", "severity", "title",
                                       "enabled", "parameters", "check_from", "source"])


__all__ = ["ComplianceMixin", "Evaluation", "Rule", "RuleSet", "load_rules", "rules_frame"]
