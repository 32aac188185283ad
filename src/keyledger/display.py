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
from typing import Any

import pandas as pd

from .model import ALLOWED_USES, Key, Use
from .model import SEVERITIES as SEVERITY_ORDER

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

# Text and rule colours follow the notebook's theme: JupyterLab's CSS variables, with the
# light-theme value as fallback (VS Code, exported HTML). Status colours as *text* use the
# theme's error/warn/success colours (lighter in the dark theme); as *backgrounds* (badges)
# they use the palette above, with a text colour chosen for contrast (``text_color_on``).
FG = "var(--jp-ui-font-color1, #1f2328)"
MUTED = "var(--jp-ui-font-color2, #57606a)"
RULE = "var(--jp-border-color1, #d0d7de)"
RULE_LIGHT = "var(--jp-border-color2, #eaeef2)"
CODE_BG = "var(--jp-layout-color2, #eef1f4)"
TEXT_COLORS: dict[str, str] = {  # a palette colour -> the theme-aware text colour meaning it
    RED: f"var(--jp-error-color1, {RED})", ORANGE: f"var(--jp-warn-color1, {ORANGE})",
    AMBER: f"var(--jp-warn-color1, {AMBER})", GREEN: f"var(--jp-success-color1, {GREEN})",
    BLUE: f"var(--jp-info-color1, {BLUE})"}

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
         "line-height:1.4;color:" + FG)
_TABLE = "border-collapse:collapse;margin:4px 0"
_TH = (f"text-align:left;padding:3px 8px;border-bottom:2px solid {RULE};font-weight:600;"
       "white-space:nowrap")
_TD = f"text-align:left;padding:3px 8px;border-bottom:1px solid {RULE_LIGHT};vertical-align:top"
FINDINGS_MAX_HEIGHT = 600  # px: the findings repr scrolls inside a box this tall
EVIDENCE_OPEN_ITEMS = 3  # evidence with more fields than this (or long values) starts collapsed


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


def text_color(color: str) -> str:
    """``color`` (a palette colour) as a text colour that stays readable in light and dark
    notebook themes."""
    return TEXT_COLORS.get(color, MUTED)


def text_color_on(background: str) -> str:
    """Black or white text, whichever reads better on ``background`` (#rrggbb): fixed, since
    the background is fixed too (a badge looks the same in every theme)."""
    r, g, b = (int(background[i:i + 2], 16) for i in (1, 3, 5))
    return "#1f2328" if (0.299 * r + 0.587 * g + 0.114 * b) > 150 else "#ffffff"


def badge(text: object, color: str) -> str:
    """A small coloured label (state, severity, outcome)."""
    return (f"<span style='display:inline-block;padding:0 7px;border-radius:9px;"
            f"background:{color};color:{text_color_on(color)};font-size:12px;font-weight:600;"
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
        f"<code style='background:{CODE_BG};color:{FG};padding:0 4px;border-radius:3px'>"
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


# What a key in each state lets its versions do (model.ALLOWED_USES is the rule; these are
# the words). Verbs per purpose: (protect, process).
_VERBS: dict[str, tuple[str, str]] = {
    "encrypt": ("encrypts", "decrypts"), "sign": ("signs", "verifies"),
    "mac": ("computes MACs", "verifies MACs"), "wrap": ("wraps", "unwraps")}
_STATE_WORDS: dict[str, str] = {
    "pre-activation": "not yet active", "suspended": "suspended",
    "deactivated": "deactivated", "compromised": "compromised",
    "pending-deletion": "pending deletion", "destroyed": "destroyed"}


def version_use(key: Key, number: int) -> str:
    """What version ``number`` of ``key`` may do now, in words that follow the key's state
    (a suspended key's current version neither encrypts nor decrypts)."""
    v = key.versions.get(number)
    if v is None or v.state == "destroyed":
        return "material destroyed"
    protect, process = _VERBS.get(key.purpose.value, ("protects", "processes"))
    allowed = ALLOWED_USES.get(key.state, frozenset())
    state = _STATE_WORDS.get(key.state.value, key.state.value)
    if number < key.min_decryption_version:
        return f"below the minimum decryption version: neither {protect} nor {process}"
    if not allowed:
        return f"{state}: neither {protect} nor {process}"
    current = number == key.latest_version and number >= key.min_encryption_version
    if Use.PROTECT in allowed and current and v.state == "active":
        return f"current: {protect} and {process}"
    if key.state.value != "active":
        return f"{state}: {process} existing data only"
    return f"{process} old data only"


def versions_html(key: Key) -> str:
    """The key's versions: number, state, created, destroyed, and what each may still do."""
    rows = []
    for number in sorted(key.versions, reverse=True):
        v = key.versions[number]
        rows.append([
            f"<b>v{number}</b>" if number == key.latest_version else f"v{number}",
            badge(v.state, VERSION_COLORS.get(v.state, GREY)),
            _when(v.created_at), _when(v.destroyed_at), esc(version_use(key, number)),
        ])
    if not rows:
        return f"<p style='margin:2px 0;color:{MUTED}'>No versions.</p>"
    return _table(["Version", "State", "Created", "Destroyed", "Use"], rows,
                  cls="kl-versions")


def key_html(key: Key, *, now: datetime | None = None) -> str:
    """A card for one key: identity, state, owner, tags, policy, rotation and versions.

    With ``now`` (the ledger's clock), the next rotation shows as "in N days" / "overdue by N
    days" in the rotation colours; without it, as a date.
    """
    state = key.state.value
    due, due_colour = due_text(key.next_rotation_due, now)
    due_cell = (f"<span style='color:{text_color(due_colour)};font-weight:600'>{esc(due)}</span>"
                if due_colour and due_colour != GREY else esc(due))
    policy = {k: v for k, v in (key.policy or {}).items()}
    rows = [
        ("Use now", esc(version_use(key, key.latest_version))),
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
        rows.append(("Deletion due", f"<span style='color:{text_color(RED)};font-weight:600'>"
                                     f"{_when(key.deletion_due)}</span>"))
    if policy:
        rows.append(("Key policy", _chips({k: json.dumps(v) if not isinstance(v, str) else v
                                           for k, v in policy.items()})))
    body = "".join(f"<tr><th style=\"{_TH};border:0;color:{MUTED}\">{label}</th>"
                   f"<td style=\"{_TD};border:0\">{value}</td></tr>" for label, value in rows)
    return (
        f"<div class='kl-key' style=\"{_FONT};border:1px solid {RULE};border-radius:6px;"
        f"padding:8px 12px;max-width:760px\">"
        f"<div style='font-size:15px;margin-bottom:4px'><b>{esc(key.name)}</b> "
        f"{badge(state, STATE_COLORS.get(state, GREY))} "
        f"<span style='color:{MUTED}'>v{esc(key.latest_version)} of "
        f"{esc(len(key.versions))}</span></div>"
        f"<table style=\"{_TABLE}\"><tbody>{body}</tbody></table>"
        f"<div style='font-weight:600;margin-top:6px'>Versions</div>{versions_html(key)}</div>")


Key.html_card = key_html  # a Key in a notebook shows this card (model.Key._repr_html_)


# -- findings ------------------------------------------------------------------------------------
FINDING_COLUMNS = ("rule_id", "framework", "severity", "title")
# The columns findings_html lays out itself (every other column is drawn as plain text).
_LAID_OUT = frozenset({"rule_id", "framework", "control", "severity", "title", "key", "version",
                       "principal", "evidence", "remediation", "first_seen", "status"})


def _collapsed(summary: str, body: str) -> str:
    """``body`` folded under a one-line ``summary`` (both already escaped)."""
    return (f"<details><summary style='cursor:pointer;color:{MUTED}'>{summary}</summary>"
            f"{body}</details>")


def _evidence(text: object, limit: int = 300) -> str:
    """Evidence JSON as a readable list of name: value lines (escaped, long values cut); more
    than ``EVIDENCE_OPEN_ITEMS`` lines, or long ones, start collapsed under a one-line summary."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return "&mdash;"
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        data = text
    if not isinstance(data, Mapping):
        value = data if isinstance(data, str) else json.dumps(data, default=str)
        cut = esc(value[:limit] + ("..." if len(value) > limit else ""))
        return cut if len(value) <= 80 else _collapsed(esc(value[:60] + "..."), cut)
    items, length = [], 0
    for name, value in data.items():
        if value is None:
            items.append(f"<li><span style='color:{MUTED}'>{esc(name)}:</span> &mdash;</li>")
            continue
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        length += len(shown)
        if len(shown) > limit:
            shown = shown[:limit] + "..."
        items.append(f"<li><span style='color:{MUTED}'>{esc(name)}:</span> {esc(shown)}</li>")
    if not items:
        return "&mdash;"
    listing = f"<ul style='margin:0;padding-left:16px'>{''.join(items)}</ul>"
    if len(items) <= EVIDENCE_OPEN_ITEMS and length <= 160:
        return listing
    names = ", ".join(str(n) for n in list(data)[:EVIDENCE_OPEN_ITEMS])
    more = len(data) - EVIDENCE_OPEN_ITEMS
    return _collapsed(esc(f"{len(data)} fields: {names}" + (f", +{more}" if more > 0 else "")),
                      listing)


def _present(value: object) -> bool:
    return not _missing(value)


def _subject(row: Mapping[str, Any]) -> str:
    parts = []
    key = row.get("key")
    if _present(key):
        version: Any = row.get("version")  # a DuckDB value: int, float or NaN
        parts.append(f"key <b>{esc(key)}</b>"
                     + (f" v{esc(int(version))}" if _present(version) else ""))
    principal = row.get("principal")
    if _present(principal):
        parts.append(f"principal <b>{esc(principal)}</b>")
    return "<br>".join(parts) or "home"


def _framework(row: Mapping[str, Any]) -> str:
    control = row.get("control")
    parts = [esc(row["framework"])] if "framework" in row else []
    if _present(control):
        parts.append(f"<span style='color:{MUTED}'>{esc(control)}</span>")
    return "<br>".join(parts) or "&mdash;"


def _remediation(value: object) -> str:
    if not _present(value) or len(str(value)) <= 160:
        return esc(value)
    return _collapsed(esc(str(value)[:80] + "..."), esc(value))


def _status(value: object) -> str:
    return badge(value, BLUE if value == "new" else GREY) if _present(value) else "&mdash;"


# (heading, the frame columns it shows (drawn if any is present), cell builder)
_FINDING_LAYOUT: tuple[tuple[str, tuple[str, ...], Any], ...] = (
    ("Framework / control", ("framework", "control"), _framework),
    ("Rule", ("rule_id",), lambda r: f"<code>{esc(r['rule_id'])}</code>"),
    ("Finding", ("title",), lambda r: esc(r["title"])),
    ("Subject", ("key", "principal"), _subject),
    ("Evidence", ("evidence",), lambda r: _evidence(r["evidence"])),
    ("Remediation", ("remediation",), lambda r: _remediation(r["remediation"])),
    ("First seen", ("first_seen",), lambda r: _when(r["first_seen"])),
    ("Status", ("status",), lambda r: _status(r["status"])),
)


def _finding_columns(columns: Iterable[str]) -> list[tuple[str, Any]]:
    """(heading, cell builder) for the columns the frame has, in display order; columns
    findings_html does not lay out itself come last as plain text."""
    have = list(columns)
    out = [(heading, build) for heading, sources, build in _FINDING_LAYOUT
           if any(c in have for c in sources)]
    for c in have:
        if c not in _LAID_OUT:
            out.append((str(c), lambda r, c=c: _when(r[c]) if isinstance(
                r[c], (datetime, pd.Timestamp)) else esc(r[c])))
    return out


def findings_html(findings: pd.DataFrame, *, max_rows: int = 200) -> str:
    """Findings grouped by severity (critical first), each with readable evidence.

    Takes the frame of ``ledger.findings()`` / ``ledger.compliance()`` or any column selection
    of it that keeps ``severity``: only the frame's columns are drawn. Long evidence starts
    collapsed; the groups scroll inside a box ``FINDINGS_MAX_HEIGHT`` px tall; at most
    ``max_rows`` findings are shown and the rest counted.
    """
    if "severity" not in findings.columns:
        return pd.DataFrame(findings).to_html(max_rows=max_rows)
    if findings.empty:
        return (f"<div class='kl-findings' style=\"{_FONT}\"><span style='font-weight:600;"
                f"color:{text_color(GREEN)}'>No open findings.</span></div>")
    layout = _finding_columns(findings.columns)
    counts = findings["severity"].astype(str).value_counts()
    order = [s for s in SEVERITY_ORDER if s in counts] + sorted(
        str(s) for s in counts.index if s not in SEVERITY_ORDER)
    summary = ", ".join(f"{int(counts[s])} {esc(s)}" for s in order)
    parts = [f"<div class='kl-findings' style=\"{_FONT}\">"
             f"<div style='font-weight:600'>{len(findings)} open finding"
             f"{'s' if len(findings) != 1 else ''}: {summary}</div>"
             f"<div class='kl-findings-scroll' style='max-height:{FINDINGS_MAX_HEIGHT}px;"
             "overflow:auto'>"]
    shown = 0
    for severity in order:
        group = findings[findings["severity"].astype(str) == severity]
        colour = SEVERITY_COLORS.get(severity, GREY)
        take = group.head(max(0, max_rows - shown))
        shown += len(take)
        rows = [[build(row) for _, build in layout] for row in take.to_dict("records")]
        more = len(group) - len(take)
        parts.append(
            f"<details open style='margin:6px 0;border-left:4px solid {colour};padding-left:8px'>"
            f"<summary style='cursor:pointer'>{badge(severity, colour)} "
            f"<b>{len(group)}</b> finding{'s' if len(group) != 1 else ''}</summary>"
            + (_table([esc(h) for h, _ in layout], rows, cls="kl-findings-table")
               if rows and layout else "")
            + (f"<div style='color:{MUTED}'>... and {more} more</div>" if more else "")
            + "</details>")
    parts.append("</div></div>")
    return "".join(parts)


# -- audit ---------------------------------------------------------------------------------------
AUDIT_COLUMNS = ("time", "principal", "action", "key", "version", "outcome", "error", "detail")


def audit_html(records: pd.DataFrame, *, max_rows: int = 100) -> str:
    """Audit records as a table with coloured outcomes; at most ``max_rows`` rows."""
    if "action" not in records.columns or "outcome" not in records.columns:
        return pd.DataFrame(records).to_html(max_rows=max_rows)
    if records.empty:
        return f"<div class='kl-audit' style=\"{_FONT};color:{MUTED}\">No audit records.</div>"
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
            + (f"<div style='color:{MUTED}'>... {more} more not shown</div>" if more else "")
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
