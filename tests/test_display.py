"""Rich HTML display: key cards, versions, findings and audit tables, escaped and handle-free."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from conftest import FakeClock

import keyledger as kl
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
