"""keyledger.widgets driven programmatically (set values, click buttons) against a real home.

Each test asserts what the user relies on: the state the ledger ends in, the audit records the
clicks produced, and that failures appear as words in the widget (never a traceback).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import duckdb
import ipywidgets as W
import pytest

import keyledger as kl
from keyledger.widgets import (
    AuditBrowser,
    ComplianceView,
    Dashboard,
    KeyActions,
    KeyInventory,
    dashboard,
)
from keyledger.widgets._common import ALL, error_text, range_label
from keyledger.widgets.actions import parse_tags
from keyledger.widgets.compliance import load_charts


@pytest.fixture
def open_as(home, clock, ledger):
    """Open the same home as another principal (in this process); closed at teardown."""
    opened: list[kl.KeyLedger] = []

    def _open(principal: str) -> kl.KeyLedger:
        led = kl.open(home, principal=principal, clock=clock)
        opened.append(led)
        return led

    yield _open
    for led in opened:
        led.close()


def _text(widget: W.HTML) -> str:
    """An HTML widget's value (escaped quotes turned back to text for assertions)."""
    return widget.value.replace("&#x27;", "'").replace("&quot;", '"')


def _no_traceback(widget: W.HTML) -> None:
    assert "Traceback" not in widget.value and 'File "' not in widget.value


@pytest.fixture
def fleet(ledger, clock):
    """Four keys: one overdue (orders), one due soon (tokens), one ok (sig), one suspended."""
    ledger.create_key("orders", spec="AES_256", owner="payments", tags={"team": "pay"})
    clock.advance(days=70)
    ledger.create_key("tokens", spec="HMAC_SHA256", owner="identity",
                      tags={"team": "id", "env": "prod"}, rotation_period="30d")
    ledger.create_key("sig", spec="EC_P256", owner="identity", tags={"team": "id"})
    ledger.create_key("legacy", spec="AES_128", owner="payments")
    ledger.disable("legacy")
    clock.advance(days=21)  # orders: 91 days old (overdue); tokens: due in 9 days
    return ledger


# -- KeyInventory --------------------------------------------------------------------------------
def test_inventory_filters_sorts_and_shows_rotation_status(fleet):
    inv = KeyInventory(fleet)
    assert isinstance(inv.widget, W.VBox)
    assert "application/vnd.jupyter.widget-view+json" in inv._repr_mimebundle_()
    # most urgent first: overdue, due soon, ok, then inactive
    assert list(inv.select.options) == ["orders", "tokens", "sig", "legacy"]
    status = dict(zip(inv.frame["name"], inv.frame["rotation_status"], strict=True))
    assert status == {"orders": "overdue", "tokens": "due soon", "sig": "ok", "legacy": "inactive"}
    assert "1 overdue" in inv.summary.value and "1 due soon" in inv.summary.value
    assert {"overdue", "due soon"} <= {r["rotation_status"] for r in inv.grid.rows}

    f = inv.filters
    f["owner"].value = "identity"
    assert list(inv.select.options) == ["tokens", "sig"]
    f["spec"].value = "EC_P256"
    assert list(inv.select.options) == ["sig"]
    f["spec"].value = ALL
    f["owner"].value = ALL
    f["state"].value = "suspended"
    assert list(inv.select.options) == ["legacy"]
    f["state"].value = ALL
    f["rotation"].value = "overdue"
    assert list(inv.select.options) == ["orders"]
    f["rotation"].value = ALL
    f["tag"].value = "team=id, env=prod"
    assert list(inv.select.options) == ["tokens"]
    f["tag"].value = "team"  # not name=value: said in words, the table keeps its rows
    assert "must look like name=value" in _text(inv.status)
    assert list(inv.select.options) == ["tokens"]
    f["tag"].value = ""
    assert inv.status.value.count("</div>") == 1 and "name=value" not in inv.status.value
    f["name"].value = "OR"  # case-insensitive "contains"
    assert list(inv.select.options) == ["orders"]
    f["name"].value = ""

    inv.sort_by.value = "name"
    assert list(inv.select.options) == ["legacy", "orders", "sig", "tokens"]
    inv.descending.value = True
    assert list(inv.select.options) == ["tokens", "sig", "orders", "legacy"]


def test_inventory_pages_and_select_key_moves_to_its_page(ledger):
    for i in range(7):
        ledger.create_key(f"k{i}", spec="AES_128")
    inv = KeyInventory(ledger, page_size=3)
    inv.sort_by.value = "name"
    assert list(inv.select.options) == ["k0", "k1", "k2"]
    assert "keys 1–3 of 7" in inv.pager.label.value and inv.pager.prev.disabled
    inv.pager.next.click()
    inv.pager.next.click()
    assert list(inv.select.options) == ["k6"] and inv.pager.next.disabled
    assert "keys 7–7 of 7" in inv.pager.label.value
    inv.select_key("k4")
    assert list(inv.select.options) == ["k3", "k4", "k5"] and inv.selected == "k4"
    assert ">k4 <" in inv.detail.value
    inv.select_key("nope")
    assert "no key named 'nope'" in _text(inv.status)


def test_inventory_detail_versions_policy_grants_activity(fleet, clock, open_as):
    fleet.rotate("orders")
    fleet.set_policy("orders", min_decryption_version=2)
    fleet.grant("orders", "bob", "user")
    bob = open_as("bob")
    clock.advance(minutes=1)
    bob.encrypt("orders", b"x", context={"t": "1"})
    inv = KeyInventory(fleet)
    inv.select.value = "orders"
    detail = _text(inv.detail)
    for part in ("Versions", "Policy", "Grants", "Recent activity"):
        assert part in detail
    # versions: v2 encrypts, v1 (below min decryption version) is no longer usable
    assert "current: encrypts and decrypts" in detail and "retired" in detail
    assert "below the minimum decryption version: neither encrypts nor decrypts" in detail
    assert '"min_decryption_version": 2' in detail
    assert ">bob<" in detail and ">user<" in detail  # bob's grant
    assert ">encrypt<" in detail and ">rotate<" in detail  # recent activity, newest first
    assert detail.index(">encrypt<") < detail.index(">rotate<")
    # the wording follows the key's state: a disabled key's current version does nothing
    fleet.disable("orders")
    inv.refresh()
    detail = _text(inv.detail)
    assert "suspended: neither encrypts nor decrypts" in detail
    assert "current: encrypts" not in detail
    # the selection was audited as reads by alice
    reads = fleet.audit(principal="alice", action="get_key", key="orders")
    assert len(reads) >= 1


def test_inventory_escapes_text_and_degrades_for_a_user(ledger, open_as):
    ledger.create_key("notes", spec="AES_256", tags={"note": "<script>alert(1)</script>"})
    ledger.grant("notes", "dave", "user")
    dave = open_as("dave")
    inv = KeyInventory(dave)
    assert list(inv.select.options) == ["notes"]
    assert inv.grid.rows[0]["tags"] == "note=<script>alert(1)</script>"  # grid.js: textContent
    inv.select.value = "notes"
    detail = _text(inv.detail)
    assert "Versions" in detail and "<script>" not in inv.detail.value
    # dave may not read the audit log: the activity section says so in words
    assert "recent activity: 'dave' may not audit" in detail
    _no_traceback(inv.detail)


# -- KeyActions ----------------------------------------------------------------------------------
def test_actions_rotate_and_state_changes_refresh_the_inventory(fleet):
    inv = KeyInventory(fleet)
    act = KeyActions(fleet, inventory=inv)
    inv.select.value = "orders"
    assert act.key.value == "orders"  # the selection fills the key field
    act.reason.value = "quarterly rotation"
    act.buttons["rotate"].click()
    assert fleet.get_key("orders").latest_version == 2
    assert "rotated 'orders' to version 2" in _text(act.status)
    row = inv.frame[inv.frame["name"] == "orders"].iloc[0]
    assert row["latest_version"] == 2 and row["rotation_status"] == "ok"  # refreshed
    rec = fleet.audit(action="rotate", key="orders")
    assert len(rec) == 1 and rec.iloc[0]["principal"] == "alice"
    assert rec.iloc[0]["outcome"] == "ok" and rec.iloc[0]["version"] == 2

    act.key.value = "legacy"
    act.buttons["enable"].click()
    assert fleet.get_key("legacy").state.value == "active"
    assert "'legacy' is active" in _text(act.status)
    assert inv.frame.set_index("name").loc["legacy", "state"] == "active"


def test_destructive_actions_need_confirmation_and_cancel_disarms(fleet):
    act = KeyActions(fleet)
    act.key.value = "sig"
    act.buttons["disable"].click()  # arms only
    assert act.armed is not None and act.confirm_box.layout.display != "none"
    assert "Disable 'sig'?" in _text(act.prompt)
    assert fleet.get_key("sig").state.value == "active"
    act.cancel_button.click()
    assert act.armed is None and act.confirm_box.layout.display == "none"
    act.confirm_button.click()  # nothing armed any more
    assert fleet.get_key("sig").state.value == "active"
    assert len(fleet.audit(action="disable", key="sig")) == 0

    act.buttons["disable"].click()
    act.key.value = "orders"  # changing the key disarms: a confirm never hits another key
    assert act.armed is None
    act.key.value = "sig"
    act.buttons["disable"].click()
    act.confirm_button.click()
    assert fleet.get_key("sig").state.value == "suspended"
    rec = fleet.audit(action="disable", key="sig")
    assert len(rec) == 1 and rec.iloc[0]["principal"] == "alice" and rec.iloc[0]["outcome"] == "ok"

    act.days.value = 3  # outside 7..30: refused before arming, in the service's words
    act.buttons["schedule_deletion"].click()
    assert act.armed is None and act.confirm_box.layout.display == "none"
    assert "waiting period must be 7 to 30 days, not 3" in _text(act.status)
    _no_traceback(act.status)
    assert fleet.get_key("sig").state.value == "suspended"

    act.days.value = 7
    act.buttons["schedule_deletion"].click()
    act.confirm_button.click()
    key = fleet.get_key("sig")
    assert key.state.value == "pending-deletion"
    assert key.deletion_due - fleet.now() == timedelta(days=7)
    assert "may be destroyed after" in _text(act.status)

    act.buttons["cancel_deletion"].click()  # not destructive: runs at once
    assert fleet.get_key("sig").state.value == "suspended"  # the state before scheduling
    outcomes = fleet.audit(key="sig", action="schedule_deletion")["outcome"].tolist()
    assert outcomes == ["ok"]  # the refused value never reached the ledger


def test_create_key_from_the_form(ledger):
    inv = KeyInventory(ledger)
    act = KeyActions(ledger, inventory=inv)
    act.new_name.value = "billing"
    act.spec.value = "AES_256"
    act.owner.value = "payments"
    act.tags.value = "team=pay, env=prod"
    act.rotation_period.value = "30d"
    act.buttons["create"].click()
    key = ledger.get_key("billing")
    assert (key.spec.name, key.owner, key.tags) == ("AES_256", "payments",
                                                     {"team": "pay", "env": "prod"})
    assert key.rotation_period == timedelta(days=30)
    assert "created 'billing'" in _text(act.status)
    assert "billing" in inv.select.options and "billing" in act.key.options
    assert ledger.audit(action="create_key", key="billing").iloc[0]["principal"] == "alice"

    act.buttons["create"].click()  # the same name again
    assert "already exists" in _text(act.status)
    act.new_name.value = "other"
    act.tags.value = "oops"
    act.buttons["create"].click()
    assert "must look like name=value" in _text(act.status)
    act.tags.value = ""
    act.rotation_period.value = "soon"
    act.buttons["create"].click()
    assert "cannot read period 'soon'" in _text(act.status)
    assert list(ledger.list_keys()["name"]) == ["billing"]
    with pytest.raises(kl.InvalidInput):
        parse_tags("=x")


def test_errors_show_words_not_tracebacks(fleet, open_as, caplog, monkeypatch):
    fleet.grant("*", "carol", "auditor")
    carol = open_as("carol")
    act = KeyActions(carol)
    act.key.value = "orders"
    act.buttons["rotate"].click()
    text = _text(act.status)
    assert "'carol' may not rotate on key 'orders'" in text and "admin role" in text
    _no_traceback(act.status)
    assert fleet.get_key("orders").latest_version == 1
    denied = fleet.audit(action="rotate", principal="carol")
    assert denied["outcome"].tolist() == ["denied"] and denied.iloc[0]["error"] == "AccessDenied"

    act.key.value = ""
    act.buttons["disable"].click()
    assert "enter or select a key first" in _text(act.status) and act.armed is None

    # an unexpected error: a short message in the widget, the traceback in the log
    def broken(name, **kwargs):
        raise RuntimeError("boom\nsecond line")

    admin = KeyActions(fleet)
    monkeypatch.setattr(fleet, "rotate", broken)
    admin.key.value = "orders"
    with caplog.at_level(logging.ERROR, logger="keyledger.widgets"):
        admin.buttons["rotate"].click()
    assert "unexpected error (RuntimeError: boom)" in _text(admin.status)
    assert "second line" not in admin.status.value
    _no_traceback(admin.status)
    assert any(r.exc_info and r.name == "keyledger.widgets" for r in caplog.records)
    assert error_text(kl.KeyStateError("it is suspended")) == "it is suspended"


def test_request_and_approve_destroy_with_a_quorum(fleet, clock, open_as):
    fleet.grant("*", "bob", "admin")
    fleet.set_policy("*", quorum=2)
    fleet.schedule_deletion("legacy", 7)
    clock.advance(days=8)
    alice = KeyActions(fleet)
    alice.key.value = "legacy"
    alice.reason.value = "decommissioned"
    alice.request_action.value = "destroy"
    alice.buttons["request"].click()
    assert len(fleet.requests()) == 0  # armed only
    alice.confirm_button.click()
    pending = fleet.requests(status="pending")
    assert len(pending) == 1
    request_id = pending.iloc[0]["request_id"]
    assert f"request {request_id} filed" in _text(alice.status)
    assert "1 of 2 approvals" in _text(alice.status)
    assert fleet.get_key("legacy").state.value == "pending-deletion"

    bob_led = open_as("bob")
    bob = KeyActions(bob_led)
    assert bob.request_id.value == request_id  # the pending request is offered
    bob.buttons["approve"].click()
    assert f"Approve request {request_id} (destroy 'legacy', requested by alice)" in \
        _text(bob.prompt)
    assert fleet.get_key("legacy").state.value == "pending-deletion"  # not yet
    bob.confirm_button.click()
    assert "2 of 2 approvals; executed" in _text(bob.status)
    assert fleet.get_key("legacy").state.value == "destroyed"
    assert fleet.requests().iloc[0]["status"] == "executed"
    approve = fleet.audit(action="approve")
    assert approve[["principal", "outcome"]].values.tolist() == [["bob", "ok"]]
    destroy = fleet.audit(action="destroy", key="legacy")
    assert destroy[["principal", "outcome"]].values.tolist() == [["bob", "ok"]]
    assert bob.request_id.options == ()  # nothing pending any more
    bob.buttons["approve"].click()
    assert "no pending request is selected" in _text(bob.status)


# -- AuditBrowser --------------------------------------------------------------------------------
@pytest.fixture
def busy(ledger, clock, open_as):
    """bob encrypts 130 times on day 1 and 100 times two days later; 5 decrypts fail."""
    ledger.create_key("orders", spec="AES_256")
    ledger.grant("orders", "bob", "user")
    bob = open_as("bob")
    blob = b""
    for i in range(130):
        blob = bob.encrypt("orders", b"%d" % i)
        clock.advance(seconds=1)
    clock.advance(days=2)
    for i in range(100):
        bob.encrypt("orders", b"%d" % i)
        clock.advance(seconds=1)
    for _ in range(5):
        with pytest.raises(kl.InvalidCiphertext):
            bob.decrypt(blob, context={"wrong": "context"})
    return ledger


def test_audit_browser_pages_with_correct_boundaries(busy):
    ab = AuditBrowser(busy, page_size=50)
    assert "bob" in ab.filters["principal"].options and "encrypt" in ab.filters["action"].options
    ab.filters["principal"].value = "bob"
    ab.filters["action"].value = "encrypt"
    assert ab.total == 230
    expected = busy.audit(principal="bob", action="encrypt", newest_first=True)["seq"].tolist()
    seen: list[int] = []
    labels = []
    for page in range(5):
        labels.append(ab.pager.label.value)
        assert ab.pager.prev.disabled == (page == 0)
        assert ab.pager.next.disabled == (page == 4)
        seen += ab.page["seq"].tolist()
        ab.pager.next.click()
    assert "records 1–50 of 230" in labels[0] and "records 51–100 of 230" in labels[1]
    assert "records 201–230 of 230" in labels[4]
    assert seen == expected  # every record once, newest first, in order
    ab.pager.next.click()  # already on the last page: stays
    assert "records 201–230 of 230" in ab.pager.label.value
    ab.pager.prev.click()
    assert ab.page["seq"].tolist() == expected[150:200]

    ab.newest_first.value = False  # back to the first page, oldest first
    assert ab.page["seq"].tolist() == sorted(expected)[:50]
    assert range_label(50, 50, 1_234_567) == "records 51–100 of 1,234,567"


def test_audit_browser_filters_narrow_the_count(busy, clock):
    ab = AuditBrowser(busy, page_size=20)
    everything = ab.total
    ab.filters["key"].value = "orders"
    by_key = ab.total
    assert 235 <= by_key < everything
    ab.filters["outcome"].value = "failed"
    assert ab.total == 5 and set(ab.page["action"]) == {"decrypt"}
    assert "records 1–5 of 5" in ab.pager.label.value and ab.pager.next.disabled
    assert "InvalidCiphertext" in ab.table.value
    ab.filters["outcome"].value = ALL
    ab.filters["principal"].value = "bob"
    ab.filters["action"].value = "encrypt"
    day3 = clock.now.date()  # the second burst happened on this day (day 3)
    ab.filters["since"].value = day3
    assert ab.total == 100
    ab.filters["since"].value = None
    ab.filters["until"].value = day3 - timedelta(days=2)  # inclusive: the first burst only
    assert ab.total == 130
    ab.filters["since"].value = day3
    assert "the time range is empty" in _text(ab.status)
    ab.filters["until"].value = None
    ab.filters["since"].value = None
    assert ab.total == 230
    ab.filters["key"].value = "no-such-key"
    assert ab.total == 0 and "no records match" in ab.pager.label.value
    assert "no records match the filters" in ab.table.value


def test_verify_shows_ok_then_the_broken_record(home, clock, ledger, open_as):
    ledger.create_key("orders", spec="AES_256")
    for _ in range(5):
        ledger.rotate("orders")
    ab = AuditBrowser(ledger)
    ab.verify_button.click()
    assert "audit ledger OK" in ab.verify_result.value and ab.report.ok
    ledger.close()  # nobody holds the store while it is tampered with
    con = duckdb.connect(str(home / "keyledger.duckdb"))
    try:
        con.execute("UPDATE audit_log SET principal = 'mallory' WHERE seq = 5")
    finally:
        con.close()
    again = open_as("alice")
    ab = AuditBrowser(again)
    assert "last verified" in ab.verify_result.value  # the stored result of the first run
    ab.verify_button.click()
    text = _text(ab.verify_result)
    assert "audit ledger BROKEN" in text and "First bad record: seq 5" in text
    assert "first broken record" in text and ab.report.first_bad["seq"] == 5
    _no_traceback(ab.verify_result)


# -- ComplianceView ------------------------------------------------------------------------------
def test_compliance_view_findings_and_evidence(ledger, clock):
    ledger.create_key("orders", spec="AES_256", owner="payments")
    ledger.create_key("fresh", spec="AES_256", owner="payments", rotation_period="1y")
    clock.advance(days=91)
    cv = ComplianceView(ledger)
    assert "no open findings" in cv.summary.value and cv.select.options == ()
    cv.evaluate_button.click()
    assert "evaluated:" in _text(cv.status)
    overdue = cv.findings[cv.findings["rule_id"] == "nist.rotation-overdue"]
    assert overdue["key"].tolist() == ["orders"]
    assert "NIST SP 800-57" in cv.matrix.value and "high" in cv.matrix.value
    assert ledger.audit(action="compliance")["principal"].tolist() == ["alice"]

    cv.filters["framework"].value = "NIST SP 800-57"
    assert set(cv.frame["framework"]) == {"NIST SP 800-57"}
    cv.filters["severity"].value = "high"
    assert set(cv.frame["severity"]) == {"high"} and len(cv.select.options) == len(cv.frame)
    cv.select_finding("nist.rotation-overdue", "orders")
    detail = _text(cv.detail)
    assert "Key overdue for rotation" in detail and "Evidence" in detail
    assert '"days_overdue": 1.0' in detail and '"policy_source": "default"' in detail
    assert "Remediation" in detail and "rotate" in detail.lower()
    cv.filters["severity"].value = "info"
    assert cv.select.options == () and "no open findings match" in cv.detail.value

    # once rotated and evaluated again, the finding is gone from the view
    ledger.rotate("orders")
    cv.evaluate_button.click()
    assert "nist.rotation-overdue" not in set(cv.findings["rule_id"])


def test_compliance_view_heatmap_when_charts_exist(ledger, clock):
    charts = load_charts()
    if charts is None or not hasattr(charts, "compliance_heatmap"):
        pytest.skip("keyledger.charts is not there yet")
    ledger.create_key("orders", spec="AES_256")
    clock.advance(days=91)
    ledger.compliance()
    cv = ComplianceView(ledger)
    assert cv.chart is not None
    spec = cv.chart.to_dict()  # validated by Altair against the Vega-Lite schema
    assert "$schema" in spec
    assert len(cv.chart_output.outputs) == 1


def test_widgets_tell_a_principal_without_rights_why(ledger, open_as):
    ledger.create_key("orders", spec="AES_256")
    ledger.grant("orders", "dave", "user")
    dave = open_as("dave")
    cv = ComplianceView(dave)
    assert "loading findings: 'dave' may not compliance on this home" in _text(cv.status)
    cv.evaluate_button.click()
    assert "evaluate: 'dave' may not compliance" in _text(cv.status)
    ab = AuditBrowser(dave)
    assert "'dave' may not query on this home" in _text(ab.status)
    ab.verify_button.click()
    assert "verify: 'dave' may not verify audit" in _text(ab.status)
    eve = open_as("eve")  # no role at all
    d = dashboard(eve)
    assert "'eve' may not list keys" in _text(d.inventory.status)
    assert d.inventory.select.options == ()
    for widget in (cv.status, ab.status, d.inventory.status, d.actions.status,
                   d.audit.status, d.compliance.status):
        _no_traceback(widget)
    denied = ledger.audit(outcome="denied")
    assert {"dave", "eve"} <= set(denied["principal"])


# -- dashboard -----------------------------------------------------------------------------------
def test_dashboard_puts_the_four_together(fleet):
    d = dashboard(fleet)
    assert isinstance(d, W.Tab) and isinstance(d, Dashboard) and d.widget is d
    assert [d.get_title(i) for i in range(3)] == ["Keys", "Audit", "Compliance"]
    assert isinstance(d.inventory, KeyInventory) and isinstance(d.actions, KeyActions)
    assert isinstance(d.audit, AuditBrowser) and isinstance(d.compliance, ComplianceView)
    d.inventory.select.value = "tokens"
    assert d.actions.key.value == "tokens"
    d.actions.buttons["rotate"].click()
    assert fleet.get_key("tokens").latest_version == 2
    # the audit tab picked up the new record
    d.audit.filters["action"].value = "rotate"
    assert d.audit.total == 1 and d.audit.page.iloc[0]["key"] == "tokens"
