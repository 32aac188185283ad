"""Rich HTML for notebooks: key info, versions, findings and audit records.

Pure functions that return HTML text (no Altair, no I/O). Every value is escaped with
``html.escape``; HSM handles and other internals are never rendered. The colour palettes live
here (``charts.py`` re-exports them) so a badge in a table and a bar in a chart mean the same:
overdue and critical are the same red everywhere, due soon/high orange, ok green, inactive grey.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd

from .model import SEVERITIES as SEVERITY_ORDER

if TYPE_CHECKING:
    from .model import Key

# -- palette -------------------------------------------------------------------------------------
RED = "#d62728"  # overdue, critical, compromised, failed
ORANGE = "#f28e2b"  # due soon, high, denied, still needed
AMBER = "#e0b000"  # medium, suspended
GREEN = "#2e9e48"  # ok, active, safe
BLUE = "#4e79a7"  # neutral / low / current
GREY = "#9d9d9d"  # not scheduled, info, deactivated
LIGHT_GREY = "#c7c7c7"  # inactive
DARK_GREY = "#5f5f5f"  # destroyed
EMPTY = "#f2f2f2"  # an empty heat-map cell

SEVERITY_COLORS: dict[str, str] = {
    "critical": RED, "high": ORANGE, "medium": AMBER, "low": BLUE, "info": GREY}
ROTATION_COLORS: dict[str, str] = {
    "overdue": RED, "due soon": ORANGE, "ok": GREEN, "not scheduled": GREY,
    "inactive": LIGHT_GREY}
STATE_COLORS: dict[str, str] = {
    "pre-activation": BLUE, "active": GREEN, "suspended": AMBER, "deactivated": GREY,
    "compromised": RED, "pending-deletion": ORANGE, "destroyed": DARK_GREY}
OUTCOME_COLORS: dict[str, str] = {"ok": GREEN, "denied": ORANGE, "failed": RED}
VERSION_COLORS: dict[str, str] = {
    "active": GREEN, "retired": BLUE, "compromised": RED, "destroyed": DARK_GREY}

_FONT = ("font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:13px;"
         "line-height:1.4;color:#1f2328")
_TABLE = "border-collapse:collapse;margin:4px 0"
_TH = ("text-align:left;padding:3px 8px;border-bottom:2px solid #d0d7de;font-weight:600;"
       "white-space:nowrap")
_TD = "text-align:left;padding:3px 8px;border-bottom:1px solid #eaeef2;vertical-align:top"


def _missing(value: object) -> bool:
    """None, NaN or NaT (and not a list or array, whose isna is elementwise)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def esc(value: object) -> str:
    """Escaped text for any value (None, NaN and NaT become an em dash)."""
    if _missing(value):
        return "&mdash;"
    return html.escape(str(value), quote=True)


def _text_color(background: str) -> str:
    """Black or white text, whichever reads better on ``background`` (#rrggbb)."""
    r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "#1f2328" if (0.299 * r + 0.587 * g + 0.114 * b) > 150 else "#ffffff"


def badge(text: object, color: str) -> str:
    """A small coloured label (state, severity, outcome)."""
    return (f"<span style='display:inline-block;padding:0 7px;border-radius:9px;"
            f"background:{color};color:{_text_color(color)};font-size:12px;font-weight:600;"
            f"line-height:18px'>{esc(text)}</span>")


def _when(value: object) -> str:
    if _missing(value):
        return "&mdash;"
    if isinstance(value, (datetime, pd.Timestamp)):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return esc(f"{value:%Y-%m-%d %H:%M} UTC")
    return esc(value)


def _period(period: timedelta | None) -> str:
    if period is None:
        return "not scheduled"
    seconds = int(period.total_seconds())
    if seconds % 86400 == 0:
        days = seconds // 86400
        return f"every {days} day{'s' if days != 1 else ''}"
    if seconds % 3600 == 0:
        return f"every {seconds // 3600} h"
    return f"every {seconds} s"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], *, cls: str = "") -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th style=\"{_TH}\">{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style=\"{_TD}\">{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return (f"<table class='{cls}' style=\"{_TABLE}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _chips(mapping: Mapping[str, object]) -> str:
    if not mapping:
        return "&mdash;"
    return " ".join(
        f"<code style='background:#eef1f4;padding:0 4px;border-radius:3px'>"
        f"{esc(k)}={esc(v)}</code>" for k, v in sorted(mapping.items()))


# -- keys ----------------------------------------------------------------------------------------
def due_text(due: datetime | None, now: datetime | None) -> tuple[str, str | None]:
    """("in 12 days" / "overdue by 3 days" / date, colour) for a rotation due date."""
    if due is None:
        return "not scheduled", GREY
    if now is None:
        return f"{due:%Y-%m-%d %H:%M} UTC", None
    days = (due - now).total_seconds() / 86400
    stamp = f"{due:%Y-%m-%d}"
    if days <= 0:
        return f"overdue by {abs(days):.0f} days ({stamp})", RED
    if days <= 30:
        return f"in {days:.0f} days ({stamp})", ORANGE
    return f"in {days:.0f} days ({stamp})", GREEN


def versions_html(key: Key) -> str:
    """The key's versions: number, state, created, destroyed, and what each may still do."""
    rows = []
    for number in sorted(key.versions, reverse=True):
        v = key.versions[number]
        uses = []
        if number == key.latest_version and v.state == "active":
            uses.append("current: encrypts and decrypts")
        elif v.state == "destroyed":
            uses.append("material destroyed")
        elif number < key.min_decryption_version:
            uses.append("below the minimum decryption version")
        else:
            uses.append("decrypts / verifies old data")
        rows.append([
            f"<b>v{number}</b>" if number == key.latest_version else f"v{number}",
            badge(v.state, VERSION_COLORS.get(v.state, GREY)),
            _when(v.created_at), _when(v.destroyed_at), esc("; ".join(uses)),
        ])
    if not rows:
        return "<p style='margin:2px 0;color:#57606a'>No versions.</p>"
    return _table(["Version", "State", "Created", "Destroyed", "Use"], rows,
                  cls="kl-versions")


def key_html(key: Key, *, now: datetime | None = None) -> str:
    """A card for one key: identity, state, owner, tags, policy, rotation and versions.

    With ``now`` (the ledger's clock), the next rotation shows as "in N days" / "overdue by N
    days" in the rotation colours; without it, as a date.
    """
    state = key.state.value
    due, due_colour = due_text(key.next_rotation_due, now)
    due_cell = (f"<span style='color:{due_colour};font-weight:600'>{esc(due)}</span>"
                if due_colour and due_colour != GREY else esc(due))
    policy = {k: v for k, v in (key.policy or {}).items()}
    rows = [
        ("Spec", esc(key.spec.name)),
        ("Purpose", esc(key.purpose.value)),
        ("Owner", esc(key.owner)),
        ("Tags", _chips(key.tags or {})),
        ("Aliases", esc(", ".join(key.aliases)) if key.aliases else "&mdash;"),
        ("Rotation policy", esc(f"{_period(key.rotation_period)} ({key.rotation_source})")),
        ("Last rotated", _when(key.rotated_at)),
        ("Next rotation due", due_cell),
        ("Created", _when(key.created_at)),
        ("Exportable", "yes" if key.exportable else "no"),
        ("Decrypts from", esc(f"v{key.min_decryption_version}")),
    ]
    if key.deletion_due is not None:
        rows.append(("Deletion due", f"<span style='color:{RED};font-weight:600'>"
                                     f"{_when(key.deletion_due)}</span>"))
    if policy:
        rows.append(("Key policy", _chips({k: json.dumps(v) if not isinstance(v, str) else v
                                           for k, v in policy.items()})))
    body = "".join(f"<tr><th style=\"{_TH};border:0;color:#57606a\">{label}</th>"
                   f"<td style=\"{_TD};border:0\">{value}</td></tr>" for label, value in rows)
    return (
        f"<div class='kl-key' style=\"{_FONT};border:1px solid #d0d7de;border-radius:6px;"
        f"padding:8px 12px;max-width:760px\">"
        f"<div style='font-size:15px;margin-bottom:4px'><b>{esc(key.name)}</b> "
        f"{badge(state, STATE_COLORS.get(state, GREY))} "
        f"<span style='color:#57606a'>v{esc(key.latest_version)} of "
        f"{esc(len(key.versions))}</span></div>"
        f"<table style=\"{_TABLE}\"><tbody>{body}</tbody></table>"
        f"<div style='font-weight:600;margin-top:6px'>Versions</div>{versions_html(key)}</div>")


# -- findings ------------------------------------------------------------------------------------
FINDING_COLUMNS = ("rule_id", "framework", "severity", "title")


def _evidence(text: object, limit: int = 300) -> str:
    """Evidence JSON as a readable list of name: value lines (escaped, long values cut)."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return "&mdash;"
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        data = text
    if not isinstance(data, Mapping):
        value = data if isinstance(data, str) else json.dumps(data, default=str)
        return esc(value[:limit] + ("..." if len(value) > limit else ""))
    items = []
    for name, value in data.items():
        if value is None:
            items.append(f"<li><span style='color:#57606a'>{esc(name)}:</span> &mdash;</li>")
            continue
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(shown) > limit:
            shown = shown[:limit] + "..."
        items.append(f"<li><span style='color:#57606a'>{esc(name)}:</span> {esc(shown)}</li>")
    return (f"<ul style='margin:0;padding-left:16px'>{''.join(items)}</ul>" if items
            else "&mdash;")


def _subject(row: Mapping[str, Any]) -> str:
    parts = []
    key = row.get("key")
    if not _missing(key):
        version = row.get("version")
        has_version = version is not None and not pd.isna(version)
        parts.append(f"key <b>{esc(key)}</b>" + (f" v{esc(int(version))}" if has_version else ""))
    principal = row.get("principal")
    if not _missing(principal):
        parts.append(f"principal <b>{esc(principal)}</b>")
    return "<br>".join(parts) or "home"


def findings_html(findings: pd.DataFrame, *, max_rows: int = 200) -> str:
    """Findings grouped by severity (critical first), each with readable evidence.

    Takes the frame of ``ledger.findings()`` / ``ledger.compliance()``; shows at most
    ``max_rows`` findings and says how many were left out.
    """
    missing = [c for c in FINDING_COLUMNS if c not in findings.columns]
    if missing:
        return pd.DataFrame(findings).to_html(max_rows=max_rows)
    if findings.empty:
        return (f"<div class='kl-findings' style=\"{_FONT}\"><span style='color:{GREEN};"
                f"font-weight:600'>No open findings.</span></div>")
    counts = findings["severity"].astype(str).value_counts()  # the severities present
    order = [s for s in SEVERITY_ORDER if s in counts] + sorted(
        str(s) for s in counts.index if s not in SEVERITY_ORDER)
    summary = ", ".join(f"{int(counts[s])} {esc(s)}" for s in order)
    parts = [f"<div class='kl-findings' style=\"{_FONT}\">"
             f"<div style='font-weight:600'>{len(findings)} open finding"
             f"{'s' if len(findings) != 1 else ''}: {summary}</div>"]
    shown = 0
    for severity in order:
        group = findings[findings["severity"].astype(str) == severity]
        colour = SEVERITY_COLORS.get(severity, GREY)
        take = group.head(max(0, max_rows - shown))
        shown += len(take)
        rows = []
        for row in take.to_dict("records"):
            control = row.get("control")
            framework = esc(row["framework"]) + (f"<br><span style='color:#57606a'>"
                                                 f"{esc(control)}</span>"
                                                 if control is not None and not pd.isna(control)
                                                 else "")
            status = row.get("status")
            rows.append([
                framework,
                f"<code>{esc(row['rule_id'])}</code>",
                esc(row["title"]),
                _subject(row),
                _evidence(row.get("evidence")),
                esc(row.get("remediation")),
                _when(row.get("first_seen")),
                badge(status, BLUE if status == "new" else GREY) if status else "&mdash;",
            ])
        more = len(group) - len(take)
        parts.append(
            f"<details open style='margin:6px 0;border-left:4px solid {colour};padding-left:8px'>"
            f"<summary style='cursor:pointer'>{badge(severity, colour)} "
            f"<b>{len(group)}</b> finding{'s' if len(group) != 1 else ''}</summary>"
            + (_table(["Framework / control", "Rule", "Finding", "Subject", "Evidence",
                       "Remediation", "First seen", "Status"], rows, cls="kl-findings-table")
               if rows else "")
            + (f"<div style='color:#57606a'>... and {more} more</div>" if more else "")
            + "</details>")
    parts.append("</div>")
    return "".join(parts)


# -- audit ---------------------------------------------------------------------------------------
AUDIT_COLUMNS = ("time", "principal", "action", "key", "version", "outcome", "error", "detail")


def audit_html(records: pd.DataFrame, *, max_rows: int = 100) -> str:
    """Audit records as a table with coloured outcomes; at most ``max_rows`` rows."""
    if "action" not in records.columns or "outcome" not in records.columns:
        return pd.DataFrame(records).to_html(max_rows=max_rows)
    if records.empty:
        return f"<div class='kl-audit' style=\"{_FONT};color:#57606a\">No audit records.</div>"
    columns = [c for c in AUDIT_COLUMNS if c in records.columns]
    rows = []
    for row in records.head(max_rows)[columns].to_dict("records"):
        cells = []
        for c in columns:
            value = row[c]
            if c == "outcome":
                cells.append(badge(value, OUTCOME_COLORS.get(str(value), GREY)))
            elif c == "time":
                cells.append(_when(value))
            elif c == "version":
                cells.append("&mdash;" if value is None or pd.isna(value) else esc(int(value)))
            else:
                cells.append(esc(value))
        rows.append(cells)
    more = len(records) - len(rows)
    outcomes = records["outcome"].value_counts()
    summary = ", ".join(f"{int(n)} {esc(o)}" for o, n in outcomes.items())
    return (f"<div class='kl-audit' style=\"{_FONT}\"><div style='font-weight:600'>"
            f"{len(records)} audit record{'s' if len(records) != 1 else ''} ({summary})</div>"
            + _table([esc(c) for c in columns], rows, cls="kl-audit-table")
            + (f"<div style='color:#57606a'>... {more} more not shown</div>" if more else "")
            + "</div>")


# -- frames that display themselves -------------------------------------------------------------
class FindingsFrame(pd.DataFrame):
    """A findings DataFrame that shows itself grouped by severity in a notebook.

    ``compliance()`` / ``findings()`` can return ``FindingsFrame(df)``: it behaves as a
    DataFrame in every other way (slices stay FindingsFrames; frames without the findings
    columns fall back to the ordinary table).
    """

    @property
    def _constructor(self):  # noqa: ANN202 (pandas subclassing protocol)
        return FindingsFrame

    def _repr_html_(self) -> str:
        return findings_html(self)


class AuditFrame(pd.DataFrame):
    """An audit-records DataFrame that shows itself with coloured outcomes in a notebook.

    ``KeyLedger.audit()`` returns one (slices stay AuditFrames: ``ledger.audit().tail()``)."""

    @property
    def _constructor(self):  # noqa: ANN202
        return AuditFrame

    def _repr_html_(self) -> str:
        return audit_html(self)


__all__ = [
    "AUDIT_COLUMNS", "AuditFrame", "FindingsFrame", "OUTCOME_COLORS", "ROTATION_COLORS",
    "SEVERITY_COLORS", "SEVERITY_ORDER", "STATE_COLORS", "VERSION_COLORS", "audit_html",
    "badge", "due_text", "esc", "findings_html", "key_html", "versions_html",
]
