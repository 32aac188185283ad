"""Compliance reports for auditors: self-contained HTML (inline SVG chart, no scripts) or Markdown.

``collect`` gathers everything a report shows inside the evaluation's transaction; ``render``
turns it into text. Nothing here touches the network or needs a browser.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ..runtime import SIMULATION, SIMULATION_LABEL
from ..store.compliance import Evaluation, exceptions, naive, report_facts
from .rules import SEVERITIES, Framework, RuleSet

CARD_LIMIT = 25  # findings of one rule shown as cards; more become table rows
SEVERITY_COLORS = {"critical": "#991b1b", "high": "#dc2626", "medium": "#d97706",
                   "low": "#2563eb", "info": "#6b7280"}
SEVERITY_MEANING = {
    "critical": "key material or the audit trail is exposed or untrustworthy now; act today",
    "high": "a required control is missing on a key in use; fix within days",
    "medium": "a documentation or governance gap; fix within the review cycle",
    "low": "hygiene: inventory that adds risk without need",
    "info": "advance notice (for example a rotation coming due); no gap yet",
}
# keyledger states vs KMIP (which has no Suspended) and NIST SP 800-57.
KMIP_STATES = [
    ("pre-activation", "Pre-Active", "Pre-activation"),
    ("active", "Active", "Active"),
    ("suspended", "no equivalent (closest: Deactivated, but keyledger can enable it again)",
     "Suspended"),
    ("deactivated", "Deactivated", "Deactivated"),
    ("compromised", "Compromised", "Compromised"),
    ("pending-deletion", "no equivalent (a waiting period before Destroyed)",
     "Deactivated, destruction scheduled"),
    ("destroyed", "Destroyed (Destroyed Compromised if it was compromised)", "Destroyed"),
]
SIMULATION_NOTE = (f"{SIMULATION_LABEL}: this home was created as a simulation; its times "
                   "come from a simulated clock, so this report is not evidence of real key "
                   "management.")
ABOUT = (
    "keyledger is a key-management toolkit. It creates and uses cryptographic keys inside a "
    "hardware security module (HSM, through the PKCS#11 interface), so key material is "
    "generated there and never leaves it in clear unless a key was explicitly created "
    "exportable. It keeps a catalog of every key - owner, purpose, algorithm, lifecycle state, "
    "versions, access grants and multi-person approvals - in a DuckDB database, and records "
    "every operation (allowed, denied or failed) in an append-only audit log whose records are "
    "hash-chained and whose checkpoints are signed by a key held in the HSM, so any change to "
    "the log is detectable. This report was produced by evaluating compliance rules - SQL "
    "queries kept as data, one file per framework - against that catalog and audit log."
)


@dataclass
class ReportData:
    now: datetime
    run_id: int
    principal: str
    home: str
    home_id: str | None
    frameworks: list[Framework]
    findings: pd.DataFrame  # visible findings
    accepted: pd.DataFrame  # findings hidden by an active exception
    rules: pd.DataFrame  # rule_id, framework, control, severity, title, findings, accepted
    exceptions: pd.DataFrame
    scope: dict[str, Any] = field(default_factory=dict)
    trend: pd.DataFrame = field(default_factory=pd.DataFrame)
    rationale: dict[str, str] = field(default_factory=dict)
    simulation: bool = False  # a simulation home: times may come from a simulated clock


def collect(tx: Any, ev: Evaluation, ruleset: RuleSet, *, home: Path | str,
            principal: str) -> ReportData:
    """Everything the report shows, read in the evaluation's transaction."""
    from ..version import __version__

    df = ev.findings.copy()
    df["open_days"] = ((pd.Timestamp(ev.time, tz="UTC") - df["first_seen"]).dt.total_seconds()
                       / 86400).round(1)
    visible = df[df["status"] != "accepted"].reset_index(drop=True)
    accepted = df[df["status"] == "accepted"].reset_index(drop=True)
    rules = pd.DataFrame([{"rule_id": r.id, "framework": r.framework, "control": r.control,
                           "severity": r.severity, "title": r.title} for r in ev.rules],
                         columns=["rule_id", "framework", "control", "severity", "title"])
    rules["findings"] = rules["rule_id"].map(visible["rule_id"].value_counts()).fillna(0) \
        .astype(int)
    rules["accepted"] = rules["rule_id"].map(accepted["rule_id"].value_counts()).fillna(0) \
        .astype(int)
    exc = exceptions(tx, ev.time)
    if len(exc):
        covered = accepted.groupby(["rule_id", accepted["key"].fillna("")]).size()
        exc["covers"] = [int(covered.get((r, k or ""), 0)) if a else 0
                         for r, k, a in zip(exc["rule_id"], exc["key"], exc["active"], strict=True)]
    else:
        exc["covers"] = pd.Series(dtype=int)
    facts = report_facts(tx, naive(ev.time))
    scope = {**facts.scope, "rules": len(ev.rules), "rule_files": ruleset.sources}
    trend = facts.trend
    return ReportData(
        now=ev.time, run_id=ev.run_id, principal=principal, home=str(home),
        home_id=facts.home_id,
        frameworks=[ruleset.frameworks[n] for n in ev.frameworks], findings=visible,
        accepted=accepted, rules=rules, exceptions=exc, scope={**scope, "version": __version__},
        trend=trend.reset_index(drop=True), rationale={r.id: r.rationale for r in ev.rules},
        simulation=facts.home_mode == SIMULATION)


def render(data: ReportData, fmt: str) -> str:
    return render_html(data) if fmt == "html" else render_markdown(data)


# -- shared helpers ---------------------------------------------------------------------------
def _ts(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NaT:
        return "-"
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.tz_convert("UTC").strftime("%Y-%m-%d %H:%M UTC")


def _na(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return str(value)


def _exception_status(x: Any, now: datetime) -> str:
    if x.active:
        return "active"
    return "expired" if pd.Timestamp(x.until) <= pd.Timestamp(naive(now), tz="UTC") else \
        "not yet valid"


def summary_counts(data: ReportData) -> pd.DataFrame:
    """framework x severity counts of open findings (every evaluated framework, zeros kept)."""
    names = [f.name for f in data.frameworks]
    table = pd.DataFrame(0, index=names, columns=list(SEVERITIES), dtype=int)
    for (fw, sev), n in data.findings.groupby(["framework", "severity"]).size().items():
        table.loc[fw, sev] = int(n)
    table["total"] = table[list(SEVERITIES)].sum(axis=1)
    return table


def _evidence_items(text: str | None) -> list[tuple[str, Any]]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return [("evidence", text)]
    if isinstance(value, dict):
        return list(value.items())
    return [("items", value)]


def _plain(value: Any) -> str | None:
    """A one-line rendering for scalars and flat lists; None when it needs a block."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float | str):
        return str(value)
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join("-" if v is None else str(v) for v in value) or "(none)"
    return None


def _scope_lines(data: ReportData) -> list[str]:
    s = data.scope
    states = ", ".join(f"{n} {st}" for st, n in s["keys_by_state"].items()) or "none"
    ver = s["verification"]
    verified = ("never run" if ver is None else
                f"{_ts(ver[0])}, {'passed' if ver[1] else 'FAILED: ' + (ver[2] or '')}")
    return [
        f"Evaluation time: {_ts(data.now)} (evaluation run {data.run_id}, by {data.principal})",
        f"keyledger home: {data.home}" + (f" (home id {data.home_id})" if data.home_id else ""),
        f"Frameworks: {', '.join(f.name for f in data.frameworks)}; {s['rules']} rules",
        f"Keys in scope: {s['keys']} ({states}); {s['versions']} key versions; "
        f"{s['principals']} principals with grants",
        f"Audit records: {s['audit_records']:,} from {_ts(s['audit_first'])} to "
        f"{_ts(s['audit_last'])}; last integrity verification: {verified}",
        f"Last successful backup: {_ts(s['last_backup'])}; last successful restore test: "
        f"{_ts(s['last_restore_test'])}",
    ]


# -- SVG chart --------------------------------------------------------------------------------
def svg_chart(table: pd.DataFrame) -> str:
    """Horizontal stacked bars: open findings per framework, one colour per severity."""
    label_w, bar_w, row_h, top = 190, 460, 30, 40
    width, height = label_w + bar_w + 60, top + row_h * max(len(table), 1) + 10
    peak = max(int(table["total"].max()) if len(table) else 0, 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="Open findings by framework '
           f'and severity" font-family="sans-serif" font-size="12">']
    x: float = label_w
    for sev in SEVERITIES:  # legend
        out.append(f'<rect x="{x}" y="8" width="12" height="12" fill="{SEVERITY_COLORS[sev]}"/>'
                   f'<text x="{x + 16}" y="18">{sev}</text>')
        x += 16 + 8 * len(sev) + 14
    for i, (fw, row) in enumerate(table.iterrows()):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">'
                   f'{html.escape(str(fw))}</text>')
        x = float(label_w)
        for sev in SEVERITIES:
            n = int(row[sev])
            if n == 0:
                continue
            w = bar_w * n / peak
            out.append(f'<rect class="bar" data-framework="{html.escape(str(fw))}" '
                       f'data-severity="{sev}" data-count="{n}" x="{x:.1f}" y="{y + 4}" '
                       f'width="{w:.1f}" height="{row_h - 10}" fill="{SEVERITY_COLORS[sev]}">'
                       f'<title>{html.escape(str(fw))}: {n} {sev}</title></rect>')
            x += w
        out.append(f'<text x="{x + 6:.1f}" y="{y + 17}">{int(row["total"])}</text>')
    out.append("</svg>")
    return "".join(out)


# -- HTML -------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1f2937;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #e5e7eb;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #d1d5db;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3f4f6}td.n{text-align:right}
.sev{display:inline-block;padding:0 .5em;border-radius:.3em;color:#fff;font-size:.85em}
.rule-findings{border:1px solid #e5e7eb;border-left:6px solid #9ca3af;border-radius:.3em;
padding:.5em 1em;margin:1em 0}.rule-findings h4{margin:.2em 0}.muted{color:#6b7280}
article.finding{border-top:1px dashed #d1d5db;padding-top:.3em}article.finding h5{margin:.3em 0;font-size:1em}
pre{background:#f9fafb;padding:.5em;overflow-x:auto;font-size:.85em}
dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;margin:.5em 0}dt{font-weight:600}
dd{margin:0}
"""


def _e(value: Any) -> str:
    return html.escape(_na(value))


def _sev_badge(sev: str) -> str:
    return f'<span class="sev" style="background:{SEVERITY_COLORS.get(sev, "#6b7280")}">{_e(sev)}</span>'


def _evidence_html(text: str | None) -> str:
    rows = []
    for name, value in _evidence_items(text):
        plain = _plain(value)
        note = ' <span class="muted">(audit record seq ids)</span>' if "seq" in name else ""
        cell = (html.escape(plain) if plain is not None else
                f"<pre>{html.escape(json.dumps(value, indent=2, default=str))}</pre>")
        rows.append(f"<tr><th>{html.escape(str(name))}{note}</th><td>{cell}</td></tr>")
    return f'<table class="evidence">{"".join(rows)}</table>'


def _prose(text: str | None) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text or ""))


def _rule_findings_html(data: ReportData, rule_id: str, group: pd.DataFrame) -> list[str]:
    """One block per rule: why and what to do once, then each finding with its evidence (as
    cards, or as table rows when there are many)."""
    first = group.iloc[0]
    color = SEVERITY_COLORS.get(first["severity"], "#9ca3af")
    out = [f'<div class="rule-findings" data-rule="{_e(rule_id)}" data-count="{len(group)}" '
           f'style="border-left-color:{color}">'
           f"<h4>{_sev_badge(first['severity'])} {_e(first['title'])} ({len(group)})</h4>"
           f"<p class=\"muted\">Rule <code>{_e(rule_id)}</code>, control {_e(first['control'])}"
           "</p>"
           f"<p><strong>Why it matters.</strong> {_prose(data.rationale.get(rule_id, ''))}</p>"
           f"<p><strong>Remediation.</strong> {_prose(first['remediation'])}</p>"]
    if len(group) <= CARD_LIMIT:
        for f in group.itertuples():
            subject = f.key if f.key is not None else "the whole home"
            out.append(
                f'<article class="finding" data-rule="{_e(f.rule_id)}" data-severity='
                f'"{_e(f.severity)}"><h5>{_e(subject)}</h5><dl>'
                f"<dt>Version</dt><dd>{_e(f.version)}</dd>"
                f"<dt>Principal</dt><dd>{_e(f.principal)}</dd>"
                f"<dt>First seen</dt><dd>{_ts(f.first_seen)} ({f.open_days} days open, "
                f"{_e(f.status)})</dd></dl>{_evidence_html(f.evidence)}</article>")
    else:
        out.append("<table><tr><th>Key</th><th>Version</th><th>Principal</th><th>First seen"
                   "</th><th>Evidence</th></tr>")
        for f in group.itertuples():
            out.append(f'<tr class="finding" data-rule="{_e(f.rule_id)}" data-severity='
                       f'"{_e(f.severity)}"><td>{_e(f.key or "the whole home")}</td>'
                       f"<td>{_e(f.version)}</td><td>{_e(f.principal)}</td>"
                       f"<td>{_ts(f.first_seen)}</td><td><code>{_e(f.evidence)}</code></td></tr>")
        out.append("</table>")
    out.append("</div>")
    return out


def render_html(data: ReportData) -> str:
    table = summary_counts(data)
    n_open, n_acc = len(data.findings), len(data.accepted)
    active_exc = data.exceptions[data.exceptions["active"]] if len(data.exceptions) else \
        data.exceptions
    p: list[str] = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{'SIMULATION - ' if data.simulation else ''}Key-management compliance report"
        f" - {_ts(data.now)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>Key-management compliance report</h1>",
        *([f'<p class="simulation"><strong>{html.escape(SIMULATION_NOTE)}</strong></p>']
          if data.simulation else []),
        f'<p class="muted">Evaluated {_ts(data.now)} &middot; keyledger {_e(data.scope["version"])}'
        f" &middot; {n_open} open findings &middot; {n_acc} covered by accepted exceptions</p>"
        "</header>",
        '<section id="about"><h2>About this report</h2>',
        f"<p>{html.escape(ABOUT)}</p>",
        "<h3>Scope</h3><ul>",
        *[f"<li>{html.escape(line)}</li>" for line in _scope_lines(data)],
        "</ul><h3>Frameworks</h3><ul>",
        *[f"<li><strong>{_e(f.name)}</strong>: {_prose(f.description)}"
          + (f' <a href="{html.escape(f.url)}">{html.escape(f.url)}</a>' if f.url else "")
          + "</li>" for f in data.frameworks],
        "</ul><h3>How to read it</h3><ul>",
        *[f"<li>{_sev_badge(s)} {html.escape(m)}</li>" for s, m in SEVERITY_MEANING.items()],
        "<li><em>Evidence</em> lists the values the rule found; <em>seq</em> numbers identify "
        "records of the audit log (<code>keyledger audit</code>, or SQL "
        "<code>SELECT * FROM audit_log WHERE seq IN (...)</code>). <em>First seen</em> is the "
        "first evaluation that reported the finding.</li>",
        "</ul></section>",
        f'<section id="summary" data-findings="{n_open}" data-accepted="{n_acc}">',
        "<h2>Summary</h2>",
        f'<figure>{svg_chart(table)}<figcaption class="muted">Open findings by framework and '
        "severity (accepted exceptions excluded).</figcaption></figure>",
        '<table class="summary"><thead><tr><th>Framework</th>',
        *[f"<th>{s}</th>" for s in SEVERITIES], "<th>total</th></tr></thead><tbody>",
    ]
    for fw, row in table.iterrows():
        p.append(f'<tr data-framework="{_e(fw)}"><td>{_e(fw)}</td>'
                 + "".join(f'<td class="n" data-severity="{s}">{int(row[s])}</td>'
                           for s in SEVERITIES)
                 + f'<td class="n" data-severity="total">{int(row["total"])}</td></tr>')
    totals = table[list(SEVERITIES) + ["total"]].sum()
    p.append('<tr data-framework="all"><th>all frameworks</th>'
             + "".join(f'<th class="n">{int(totals[c])}</th>' for c in [*SEVERITIES, "total"])
             + "</tr></tbody></table>")
    if len(data.trend) > 1:
        p.append("<h3>Trend (latest evaluations)</h3><table><tr><th>evaluated</th><th>open</th>"
                 "<th>new</th><th>resolved</th><th>accepted</th></tr>")
        for r in data.trend.itertuples():
            p.append(f"<tr><td>{_ts(r.time)}</td><td class='n'>{int(r.open)}</td>"
                     f"<td class='n'>{int(r.opened)}</td><td class='n'>{int(r.resolved)}</td>"
                     f"<td class='n'>{int(r.accepted)}</td></tr>")
        p.append("</table>")
    p.append("</section>")

    p.append(f'<section id="findings" data-count="{n_open}"><h2>Findings ({n_open})</h2>')
    if not n_open:
        p.append("<p>No open findings: every evaluated rule passed or is covered by an "
                 "accepted exception.</p>")
    for fw in [f.name for f in data.frameworks]:
        part = data.findings[data.findings["framework"] == fw]
        if not len(part):
            continue
        p.append(f'<h3 data-framework="{_e(fw)}">{_e(fw)} ({len(part)})</h3>')
        for rule_id, group in part.groupby("rule_id", sort=False):
            p += _rule_findings_html(data, str(rule_id), group)
    p.append("</section>")

    p.append(f'<section id="exceptions" data-count="{len(active_exc)}">'
             f"<h2>Accepted exceptions ({len(active_exc)} active)</h2>")
    if len(data.exceptions):
        p.append("<p>Findings covered by an active exception are not counted above. Each "
                 "exception expires; after that the finding is reported again.</p>"
                 "<table><tr><th>Rule</th><th>Framework</th><th>Key</th><th>Justification</th>"
                 "<th>Accepted by</th><th>Accepted</th><th>Expires</th><th>Status</th>"
                 "<th>Findings covered</th></tr>")
        for x in data.exceptions.itertuples():
            status = _exception_status(x, data.now)
            p.append(f'<tr class="exception" data-status="{status}"><td><code>{_e(x.rule_id)}'
                     f"</code></td><td>{_e(x.framework)}</td><td>{_e(x.key or 'the whole home')}"
                     f"</td><td>{_e(x.reason)}</td><td>{_e(x.accepted_by)}</td>"
                     f"<td>{_ts(x.accepted_at)}</td><td>{_ts(x.until)}</td><td>{status}</td>"
                     f"<td class='n'>{int(x.covers)}</td></tr>")
        p.append("</table>")
    else:
        p.append("<p>No exceptions have been accepted.</p>")
    p.append("</section>")

    p.append('<section id="rules"><h2>Rules evaluated</h2><table><tr><th>Rule</th>'
             "<th>Framework</th><th>Control</th><th>Severity</th><th>Title</th><th>Result</th>"
             "</tr>")
    for r in data.rules.itertuples():
        result = (f"{r.findings} finding(s)" if r.findings else "passed") + \
            (f", {r.accepted} accepted" if r.accepted else "")
        p.append(f'<tr data-rule="{_e(r.rule_id)}"><td><code>{_e(r.rule_id)}</code></td>'
                 f"<td>{_e(r.framework)}</td><td>{_e(r.control)}</td><td>{_sev_badge(r.severity)}"
                 f"</td><td>{_e(r.title)}</td><td>{_e(result)}</td></tr>")
    p.append("</table></section>")

    p.append('<section id="method"><h2>Method</h2><p>Each rule is a SQL query over the '
             "keyledger store, evaluated set-based at the evaluation time above; its thresholds "
             "are parameters that the organisation may tighten in its own rule files. Rule "
             "files read:</p><ul>")
    p += [f"<li><code>{_e(src)}</code></li>" for src in data.scope["rule_files"]]
    p.append("</ul><h3>Key states</h3><table><tr><th>keyledger</th><th>KMIP</th>"
             "<th>NIST SP 800-57</th></tr>")
    p += [f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td></tr>" for a, b, c in KMIP_STATES]
    p.append("</table></section>")
    p.append(f'<footer class="muted"><p>Generated by keyledger {_e(data.scope["version"])} '
             f"at {_ts(data.now)}.</p></footer></body></html>")
    return "\n".join(p)


# -- Markdown ---------------------------------------------------------------------------------
def _md(value: Any) -> str:
    return _na(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(data: ReportData) -> str:
    table = summary_counts(data)
    n_open, n_acc = len(data.findings), len(data.accepted)
    out = ["# Key-management compliance report", "",
           *([f"**{SIMULATION_NOTE}**", ""] if data.simulation else []),
           f"Evaluated {_ts(data.now)} - keyledger {data.scope['version']} - {n_open} open "
           f"findings - {n_acc} covered by accepted exceptions", "",
           "## About this report", "", ABOUT, "", "### Scope", ""]
    out += [f"- {line}" for line in _scope_lines(data)]
    out += ["", "### Frameworks", ""]
    out += [f"- **{f.name}**: {f.description}" + (f" <{f.url}>" if f.url else "")
            for f in data.frameworks]
    out += ["", "### Severity", ""]
    out += [f"- **{s}**: {m}" for s, m in SEVERITY_MEANING.items()]
    out += ["", "Evidence `seq` numbers identify audit-log records.", "",
            "## Summary", "", "| Framework | " + " | ".join(SEVERITIES) + " | total |",
            "|---|" + "---:|" * (len(SEVERITIES) + 1)]
    for fw, row in table.iterrows():
        out.append(f"| {_md(fw)} | " + " | ".join(str(int(row[s])) for s in SEVERITIES)
                   + f" | {int(row['total'])} |")
    totals = table[list(SEVERITIES) + ["total"]].sum()
    out.append("| **all frameworks** | " + " | ".join(f"**{int(totals[c])}**"
                                                    for c in [*SEVERITIES, "total"]) + " |")
    out += ["", f"## Findings ({n_open})", ""]
    if not n_open:
        out.append("No open findings.")
    for fw in [f.name for f in data.frameworks]:
        part = data.findings[data.findings["framework"] == fw]
        if not len(part):
            continue
        out += [f"### {fw} ({len(part)})", ""]
        for rule_id, group in part.groupby("rule_id", sort=False):
            first = group.iloc[0]
            out += [f"#### [{first['severity']}] {first['title']} ({len(group)})", "",
                    f"Rule `{rule_id}`, control {first['control']}.", "",
                    f"Why it matters: {data.rationale.get(str(rule_id), '')}", "",
                    f"Remediation: {first['remediation']}", ""]
            for f in group.itertuples():
                subject = f.key if f.key is not None else "the whole home"
                out.append(f"- **{subject}** (version {_na(f.version)}, principal "
                           f"{_na(f.principal)}; first seen {_ts(f.first_seen)}, "
                           f"{f.open_days} days open, {f.status})")
                for name, value in _evidence_items(f.evidence):
                    plain = _plain(value)
                    shown = plain if plain is not None else \
                        "`" + json.dumps(value, default=str) + "`"
                    out.append(f"  - {name}: {shown}")
            out.append("")
    active = int(data.exceptions["active"].sum()) if len(data.exceptions) else 0
    out += ["", f"## Accepted exceptions ({active} active)", ""]
    if len(data.exceptions):
        out += ["| Rule | Framework | Key | Justification | Accepted by | Accepted | Expires | "
                "Status | Findings covered |", "|---|---|---|---|---|---|---|---|---:|"]
        for x in data.exceptions.itertuples():
            status = _exception_status(x, data.now)
            out.append(f"| `{x.rule_id}` | {_md(x.framework)} | {_md(x.key or 'the whole home')}"
                       f" | {_md(x.reason)} | {_md(x.accepted_by)} | {_ts(x.accepted_at)} | "
                       f"{_ts(x.until)} | {status} | {int(x.covers)} |")
    else:
        out.append("No exceptions have been accepted.")
    out += ["", "## Rules evaluated", "", "| Rule | Framework | Control | Severity | Title | "
            "Result |", "|---|---|---|---|---|---|"]
    for r in data.rules.itertuples():
        result = (f"{r.findings} finding(s)" if r.findings else "passed") + \
            (f", {r.accepted} accepted" if r.accepted else "")
        out.append(f"| `{r.rule_id}` | {_md(r.framework)} | {_md(r.control)} | {r.severity} | "
                   f"{_md(r.title)} | {result} |")
    out += ["", "## Key states", "", "| keyledger | KMIP | NIST SP 800-57 |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in KMIP_STATES]
    out.append("")
    return "\n".join(out)


__all__ = ["ReportData", "collect", "render", "render_html", "render_markdown", "svg_chart"]
