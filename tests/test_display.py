"""Rich HTML display: key cards, versions, findings and audit tables, escaped and handle-free."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from conftest import FakeClock

import keyledger as kl
from keyledger import analytics as ka
from keyledger import display

SCRIPT = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> dict:
    """A real home: a tagged, rotated key with a hostile tag value, a suspended key, a
    destroyed version, findings from a compliance run and some audit records."""
    clock = FakeClock(datetime(2026, 1, 1, 9, 0, tzinfo=UTC))
    home = tmp_path_factory.mktemp("display") / "home"
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("orders", spec="AES_256", owner="payments",
                       tags={"team": "payments", "note": SCRIPT}, rotation_period="30d")
        led.create_key("legacy", spec="AES_128", owner="payments")
        ct = led.encrypt("orders", b"card")
        clock.advance(days=10)
        led.rotate("orders")
        clock.advance(days=10)
        led.rotate("orders")
        led.decrypt(ct)
        led.disable("legacy")
        with pytest.raises(kl.KeyStateError):
            led.encrypt("legacy", b"nope")  # a failed/denied record for the audit table
        clock.advance(days=40)  # orders is now overdue (30-day period)
        findings = led.compliance()
        out = {
            "orders": led.get_key("orders"), "legacy": led.get_key("legacy"),
            "findings": findings, "audit": led.audit(), "now": clock(),
        }
    return out


def visible_text(html_text: str) -> str:
    return re.sub(r"<[^>]+>", " ", html_text)


# -- keys ----------------------------------------------------------------------------------------
def test_key_repr_html_shows_the_key_and_escapes_every_value(seeded):
    key = seeded["orders"]
    out = key._repr_html_()
    assert out == display.key_html(key)
    text = visible_text(out)
    for expected in ("orders", "AES_256", "encrypt", "active", "payments", "team=payments",
                     "every 30 days (key)", "Next rotation due", "v3 of 3", "Versions"):
        assert expected in text, expected
    # the hostile tag value is shown as text, never as markup
    assert "<script>" not in out
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in out
    # the active state badge uses the palette's green
    assert f"background:{display.STATE_COLORS['active']}" in out


def test_key_html_never_renders_hsm_handles(seeded):
    key = seeded["orders"]
    out = key._repr_html_()
    for v in key.versions.values():
        assert v.handle.hex() not in out.lower()
        assert repr(v.handle) not in out
    assert key.key_id not in out
    assert "handle" not in out.lower()


def test_key_html_with_now_says_overdue_in_red(seeded):
    key, now = seeded["orders"], seeded["now"]
    out = display.key_html(key, now=now)
    assert re.search(r"overdue by \d+ days", out)
    assert f"color:{display.text_color(display.RED)}" in out  # theme-aware red text
    soon = display.key_html(key, now=key.next_rotation_due - timedelta(days=5))
    assert "in 5 days" in soon and f"color:{display.text_color(display.ORANGE)}" in soon
    suspended = display.key_html(seeded["legacy"])
    assert f"background:{display.STATE_COLORS['suspended']}" in suspended
    assert "suspended" in visible_text(suspended)


def test_versions_table_lists_each_version_with_its_use(seeded):
    key = seeded["orders"]
    out = display.versions_html(key)
    text = visible_text(out)
    assert [int(n) for n in re.findall(r"\bv(\d+)\b", text)] == [3, 2, 1]  # newest first
    assert "current: encrypts and decrypts" in text
    assert text.count("decrypts old data only") == 2
    assert text.count("retired") == 2
    destroyed = kl.model.KeyVersion(4, b"\x01" * 16, "destroyed", key.created_at,
                                    key.created_at)
    key.versions[4] = destroyed
    try:
        assert "material destroyed" in display.versions_html(key)
    finally:
        del key.versions[4]


# -- findings ------------------------------------------------------------------------------------
def test_findings_html_groups_by_severity_with_readable_evidence(seeded):
    findings = seeded["findings"]
    assert len(findings)  # the overdue key and the home produce findings
    out = display.findings_html(findings)
    text = visible_text(out)
    assert f"{len(findings)} open finding" in text
    present = [s for s in display.SEVERITY_ORDER if s in set(findings["severity"])]
    positions = [out.index(f">{s}</span> <b>") for s in present]
    assert positions == sorted(positions)  # critical first, info last
    for severity in present:
        n = int((findings["severity"] == severity).sum())
        assert f">{severity}</span> <b>{n}</b>" in out
        assert f"border-left:4px solid {display.SEVERITY_COLORS[severity]}" in out
    overdue = findings[findings["key"] == "orders"]
    assert len(overdue)
    # evidence JSON is shown as "name: value" lines, not as raw JSON text
    evidence = json.loads(overdue.iloc[0]["evidence"])
    name = next(iter(evidence))
    assert f"{name}:</span>" in out
    assert overdue.iloc[0]["evidence"] not in out


def test_findings_html_escapes_hostile_values():
    df = pd.DataFrame([{
        "rule_id": "X-1", "framework": "PCI", "control": "3.6", "severity": "critical",
        "title": "<b>bold</b>", "key": SCRIPT, "version": 2, "principal": None,
        "evidence": json.dumps({"detail": "<img src=x onerror=alert(1)>", "seq": [1, 2]}),
        "remediation": "rotate & check", "first_seen": pd.Timestamp("2026-01-01", tz="UTC"),
        "status": "new"}])
    out = display.findings_html(df)
    assert "<script>" not in out and "<img" not in out and "<b>bold</b>" not in out
    assert "&lt;img src=x onerror=alert(1)&gt;" in out and "&lt;b&gt;bold&lt;/b&gt;" in out
    assert "rotate &amp; check" in out and "[1, 2]" in out
    assert f"background:{display.RED}" in out  # the critical badge is the shared red
    assert "No open findings" in display.findings_html(df.iloc[0:0])


def test_findings_html_caps_a_long_list():
    df = pd.DataFrame([{"rule_id": f"R-{i}", "framework": "SOC 2", "severity": "high",
                        "title": f"finding {i}", "evidence": "{}"} for i in range(500)])
    out = display.findings_html(df, max_rows=50)
    assert out.count("<tr>") == 51  # header + 50 rows
    assert "... and 450 more" in out


def test_findings_frame_displays_itself_and_stays_a_dataframe(seeded):
    frame = display.FindingsFrame(seeded["findings"])
    assert isinstance(frame, pd.DataFrame)
    assert frame._repr_html_() == display.findings_html(seeded["findings"])
    high = frame[frame["severity"] == "high"]
    assert isinstance(high, display.FindingsFrame)
    assert "open finding" in high._repr_html_()
    # without the findings columns it falls back to the ordinary table
    counts = frame.groupby("framework").size().reset_index(name="n")
    assert "<table" in counts._repr_html_()


# -- audit ---------------------------------------------------------------------------------------
def test_audit_html_colours_outcomes_and_escapes_details(seeded):
    audit = seeded["audit"]
    assert set(audit["outcome"]) >= {"ok"} and len(set(audit["outcome"])) >= 2
    out = display.audit_html(audit)
    text = visible_text(out)
    assert f"{len(audit)} audit records" in text
    for outcome in set(audit["outcome"]):
        assert f"background:{display.OUTCOME_COLORS[outcome]}" in out
    hostile = audit.head(3).copy()
    hostile["detail"] = SCRIPT
    out = display.audit_html(hostile)
    assert "<script>" not in out and "&lt;script&gt;" in out
    frame = display.AuditFrame(audit)
    assert frame._repr_html_() == display.audit_html(audit)
    assert f"... {len(audit) - 5} more not shown" in display.audit_html(audit, max_rows=5)


def test_esc_handles_missing_values():
    assert display.esc(None) == display.esc(float("nan")) == display.esc(pd.NaT) == "&mdash;"
    assert display.esc('"a" & <b>') == "&quot;a&quot; &amp; &lt;b&gt;"
    assert display.esc(["<x>"]) == "[&#x27;&lt;x&gt;&#x27;]"


# -- state-aware wording ---------------------------------------------------------------------------
@pytest.mark.parametrize("state", list(kl.model.KeyState))
def test_the_current_version_says_what_the_key_state_allows(seeded, state):
    """Every state's wording follows model.ALLOWED_USES: only an active key's current version
    "encrypts and decrypts"; a suspended or pending-deletion one neither encrypts nor decrypts."""
    key = dataclasses.replace(seeded["orders"], state=state)
    use = display.version_use(key, key.latest_version)
    allowed = kl.model.ALLOWED_USES[state]
    if state is kl.model.KeyState.ACTIVE:
        assert use == "current: encrypts and decrypts"
    elif not allowed:
        assert "neither encrypts nor decrypts" in use, use
    else:  # deactivated, compromised: decrypt only
        assert use.endswith("decrypts existing data only") and "encrypts" not in use, use
    card = visible_text(display.key_html(key))
    assert ("current: encrypts and decrypts" in card) == (state is kl.model.KeyState.ACTIVE)


def test_a_suspended_key_and_its_versions_say_they_cannot_be_used(seeded):
    legacy = seeded["legacy"]
    assert legacy.state.value == "suspended"
    text = visible_text(display.key_html(legacy))
    assert "suspended: neither encrypts nor decrypts" in text
    assert "current: encrypts" not in text
    pending = dataclasses.replace(seeded["orders"], state=kl.model.KeyState.PENDING_DELETION)
    text = visible_text(display.versions_html(pending))
    assert text.count("pending deletion: neither encrypts nor decrypts") == 3
    assert "decrypts old data" not in text


# -- findings: columns, collapsed evidence, a bounded box -----------------------------------------
def _many_findings(n: int = 69) -> pd.DataFrame:
    long_evidence = {f"field_{i}": "x" * 80 for i in range(8)}
    return pd.DataFrame([{
        "rule_id": f"R-{i % 7}", "framework": "PCI DSS", "control": "3.6.4",
        "severity": display.SEVERITY_ORDER[i % 4], "title": f"finding {i}", "key": f"k{i}",
        "version": 1, "principal": None, "evidence": json.dumps(long_evidence),
        "remediation": "rotate the key " * 20, "first_seen": pd.Timestamp("2026-01-01", tz="UTC"),
        "status": "open"} for i in range(n)])


def _headings(out: str) -> list[str]:
    return sorted(set(re.findall(r"<th[^>]*>([^<]*)</th>", out)))


def test_findings_html_draws_only_the_frames_columns():
    df = _many_findings(5)
    picked = df[["rule_id", "framework", "severity", "title", "key"]]
    out = display.findings_html(picked)
    assert _headings(out) == sorted(["Framework / control", "Rule", "Finding", "Subject"])
    assert "Evidence" not in out and "Remediation" not in out and "&mdash;" not in out
    # a selection without rule_id/framework is still grouped by severity, not a raw table
    out = display.findings_html(df[["severity", "title", "first_seen"]])
    assert "open findings" in visible_text(out)
    assert _headings(out) == ["Finding", "First seen"]
    # a column the layout does not know is drawn as plain, escaped text
    out = display.findings_html(df.assign(ticket=SCRIPT)[["severity", "title", "ticket"]])
    assert "ticket" in _headings(out) and "&lt;script&gt;" in out and "<script>" not in out


def test_findings_html_collapses_long_evidence_and_scrolls_in_a_bounded_box():
    df = _many_findings(69)
    out = display.findings_html(df)
    box = re.search(r"class='kl-findings-scroll' style='max-height:(\d+)px;overflow:auto'", out)
    assert box and int(box.group(1)) <= 700
    assert out.count("8 fields: field_0, field_1, field_2, +5") == 69  # evidence folded
    assert out.count("<details><summary") == 2 * 69  # evidence and long remediation folded
    short = display.findings_html(df.assign(evidence=json.dumps({"age_days": 91})))
    assert "fields:" not in short and "age_days:</span> 91" in short  # short evidence stays open


# -- ciphertext never in a repr -------------------------------------------------------------------
def test_rewrap_result_repr_shows_counts_never_ciphertext(ledger):
    ledger.create_key("orders", spec="AES_256")
    blobs = [ledger.encrypt("orders", f"card {i}".encode()) for i in range(3)]
    ledger.rotate("orders")
    result = ledger.rewrap_many(blobs, progress=False)
    assert result.ok == 3
    assert "b'" not in repr(result) and "ciphertexts=" not in repr(result)  # no bytes echoed
    shown = [repr(result), str(result), result._repr_html_()]
    for blob in [*blobs, *result.ciphertexts]:
        for text in shown:
            assert repr(blob)[2:30] not in text and blob.hex()[:24] not in text
    assert repr(result).startswith("<RewrapResult 3 ciphertexts, 3 rewrapped, 0 failed")
    assert "orders v1: 3" in repr(result) and "b'" not in repr(result)


# -- light and dark themes -------------------------------------------------------------------------
_STYLE = re.compile(r"""style=(?:"([^"]*)"|'([^']*)')""")
_HARD = re.compile(r"#[0-9a-fA-F]{3,8}\b|rgba?\(|\b(?:black|white)\b")


def hard_coded_colours(html_text: str) -> list[str]:
    """Styles whose text colour (or background) is hard-coded without its partner: a fixed
    text colour on the theme's background (or theme text on a fixed background) is unreadable
    in one of the themes. Fixed pairs (badges) and var(--jp-..., fallback) are fine."""
    bad = []
    for match in _STYLE.finditer(html_text):
        style = match.group(1) or match.group(2)
        decl = dict((k.strip().lower(), v.strip()) for k, _, v in
                    (d.partition(":") for d in style.split(";") if ":" in d))
        color, background = decl.get("color"), decl.get("background",
                                                          decl.get("background-color"))
        fixed_color = color is not None and _HARD.search(color) and not color.startswith("var(")
        fixed_bg = (background is not None and _HARD.search(background)
                    and not background.startswith("var("))
        if (fixed_color and not fixed_bg) or (fixed_bg and color is None):
            bad.append(style)
    return bad


def _widget_html(ledger) -> list[str]:
    from keyledger.widgets import AuditBrowser, ComplianceView, KeyActions
    from keyledger.widgets.compliance import finding_html, matrix_html

    act = KeyActions(ledger)
    act.key.value = "orders"
    act.buttons["disable"].click()
    audit = AuditBrowser(ledger)
    view = ComplianceView(ledger)
    out = [act.prompt.value, act.status.value, audit.table.value, audit.verify_result.value,
           view.matrix.value, view.summary.value, view.detail.value]
    findings = ledger.findings()
    assert len(findings)
    out += [finding_html(findings.iloc[0]), matrix_html(ka.compliance_matrix(findings))]
    act.cancel_button.click()
    return out


def test_reprs_and_widgets_use_theme_colours_for_text(seeded, ledger, clock):
    reprs = [display.key_html(seeded["orders"], now=seeded["now"]),
             display.key_html(seeded["legacy"]), display.findings_html(seeded["findings"]),
             display.findings_html(_many_findings(12)), display.audit_html(seeded["audit"]),
             display.findings_html(seeded["findings"].iloc[0:0]),
             display.audit_html(seeded["audit"].iloc[0:0])]
    for out in reprs:
        assert hard_coded_colours(out) == [], out[:200]
        assert "var(--jp-ui-font-color1, " in out or "var(--jp-ui-font-color2, " in out
    ledger.create_key("orders", spec="AES_256")
    ledger.create_key("legacy", spec="AES_256")
    ledger.disable("legacy")
    with pytest.raises(kl.KeyStateError):
        ledger.encrypt("legacy", b"x")  # a failed record for the audit table
    clock.advance(days=120)
    ledger.compliance()
    for out in _widget_html(ledger):
        assert hard_coded_colours(out) == [], out[:300]


def test_audit_browser_colours_outcomes_like_the_charts(ledger, home, clock):
    from keyledger.widgets import AuditBrowser

    ledger.create_key("orders", spec="AES_256")
    ledger.disable("orders")
    with pytest.raises(kl.KeyStateError):
        ledger.encrypt("orders", b"x")  # failed
    with kl.open(home, principal="mallory", clock=clock) as mallory, \
            pytest.raises(kl.AccessDenied):
        mallory.rotate("orders")  # denied
    cells = AuditBrowser(ledger).table.value
    for outcome in ("denied", "failed"):
        colour = display.OUTCOME_COLORS[outcome]
        assert re.search(rf"background:{colour};[^']*'>{outcome}</td>", cells), outcome
    assert charts_outcome_colours() == display.OUTCOME_COLORS


def charts_outcome_colours() -> dict[str, str]:
    from keyledger import charts

    return dict(charts.OUTCOME_COLORS)


# -- in a real browser, with JupyterLab's own light and dark theme variables ----------------------
_CONTRAST_JS = """() => {
  const rgba = s => { const m = s.match(/[\\d.]+/g).map(Number);
                      return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
  const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92
                                      : Math.pow((v + 0.055) / 1.055, 2.4); };
                     return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  const background = el => { for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor); if (c[3] > 0) return c; }
    return [255, 255, 255, 1]; };
  const bad = [];
  for (const el of document.querySelectorAll('#out *')) {
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own || el.getClientRects().length === 0) continue;
    const bg = background(el), fg = rgba(getComputedStyle(el).color);
    const mix = [0, 1, 2].map(i => fg[i] * fg[3] + bg[i] * (1 - fg[3]));
    const [a, b] = [lum(mix), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    if (ratio < 3) bad.push(el.textContent.trim().slice(0, 40) + ' ' + ratio.toFixed(2));
  }
  return {bad, height: document.querySelector('#out .kl-findings').getBoundingClientRect().height};
}"""


def _theme_variables(name: str) -> str:
    """The ``:root{...}`` block of an installed JupyterLab theme (its CSS variables)."""
    import sys
    from pathlib import Path

    css = (Path(sys.prefix) / "share/jupyter/lab/themes/@jupyterlab" / name / "index.css")
    if not css.exists():
        pytest.skip(f"JupyterLab's {name} is not installed")
    text = css.read_text()
    return text[:text.index("}") + 1]


def test_reprs_read_well_in_jupyterlab_light_and_dark_themes(seeded):
    """Every text of the key card, findings and audit reprs keeps a contrast of 3:1 or more
    on JupyterLab's light and dark backgrounds; 69 findings fit a bounded box."""
    from browser_support import chromium_available, launch_chromium
    if not chromium_available():
        pytest.skip("Debian chromium is not installed")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    body = "".join([display.key_html(seeded["orders"], now=seeded["now"]),
                    display.key_html(seeded["legacy"]), display.findings_html(_many_findings()),
                    display.audit_html(seeded["audit"])])
    with sync_playwright() as pw:
        context = launch_chromium(pw)
        try:
            page = context.new_page()
            reports = {}
            for theme in ("theme-light-extension", "theme-dark-extension"):
                page.set_content(
                    f"<html><head><style>{_theme_variables(theme)} body{{margin:0;"
                    "background:var(--jp-layout-color0);color:var(--jp-ui-font-color1)}"
                    f"</style></head><body><div id='out'>{body}</div></body></html>")
                reports[theme] = page.evaluate(_CONTRAST_JS)
        finally:
            context.close()
    assert {t: r["bad"] for t, r in reports.items()} == {t: [] for t in reports}
    for theme, report in reports.items():  # was 8,600 px for 69 findings in the issue
        assert report["height"] <= 700, theme
