"""The dashboard's param state and views, without a browser (issue 9).

Real homes (tests/conftest.py fixtures): a few keys with owners/tags and some audited use.
Browser tests (pages load, charts render, live updates in Chromium) live elsewhere.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pandas as pd
import panel as pn
import pytest
from conftest import FakeClock, run_python

import keyledger as kl
from keyledger.dashboard import data as dd
from keyledger.dashboard.app import Dashboard, build_app
from keyledger.dashboard.serve import serve_command
from keyledger.dashboard.state import BUSY_MESSAGE, DashboardState, derive_roles
from keyledger.dashboard.views import (
    PAGES,
    ActionPanel,
    AuditView,
    ComplianceView,
    OverviewView,
    RotationView,
    UsageView,
    has_class,
)
from keyledger.errors import ConfigError, StoreBusy


@pytest.fixture(autouse=True)
def _fresh_cache():
    dd.CACHE.clear()
    yield
    dd.CACHE.clear()


@pytest.fixture(scope="module")
def fleet_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def fleet_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dashboard") / "home"


@pytest.fixture(scope="module")
def fleet(fleet_home, fleet_clock):
    """One home for the whole module (it is what costs): alice (admin + user on *), bob
    (auditor on *), carol (admin of pay-1 only), dave (user on pay-1); keys of two teams with
    20 days of use, and old-1 (7 d rotation period) overdue. Tests that change things work on
    keys of their own (owner team-tmp) and never move the clock."""
    led = kl.open(fleet_home, principal="alice", clock=fleet_clock)
    led.grant("*", "alice", "user")
    led.grant("*", "bob", "auditor")
    for name, owner in (("pay-1", "team-pay"), ("pay-2", "team-pay"), ("web-1", "team-web")):
        led.create_key(name, spec="AES_256", owner=owner, tags={"team": owner[5:]},
                       rotation_period="30d")
    led.create_key("old-1", spec="AES_256", owner="team-old", rotation_period="7d")
    led.grant("pay-1", "carol", "admin")
    led.grant("pay-1", "dave", "user")
    for _ in range(20):
        fleet_clock.advance(days=1)
        for name, n in (("pay-1", 3), ("pay-2", 2), ("web-1", 1)):
            for _ in range(n):
                led.encrypt(name, b"data")
    try:
        yield led
    finally:
        led.close()


@pytest.fixture
def other(fleet, fleet_home, fleet_clock):
    """Open the fleet's home as another principal (closed after the test)."""
    opened: list[kl.KeyLedger] = []

    def open_as(principal: str) -> kl.KeyLedger:
        opened.append(kl.open(fleet_home, principal=principal, clock=fleet_clock))
        return opened[-1]

    yield open_as
    for led in opened:
        led.close()


def tmp_key(fleet, name: str, **kwargs) -> str:
    fleet.create_key(name, spec="AES_256", owner="team-tmp", **kwargs)
    return name


def state_for(ledger) -> DashboardState:
    st = DashboardState(ledger)
    assert st.refresh(force=True)
    return st


def action_widgets(view) -> list:
    return [o for o in view.objects() if any(c.startswith("kl-action")
                                             for c in (getattr(o, "css_classes", None) or []))]


# -- state and filters ---------------------------------------------------------------------------
def test_refresh_loads_options_roles_and_principal(fleet):
    st = state_for(fleet)
    assert st.principal == "alice"
    assert {"pay-1", "pay-2", "web-1", "old-1"} <= set(st.key_options)
    assert {"team-pay", "team-web", "team-old"} <= set(st.owner_options)
    assert {"team=pay", "team=web"} <= set(st.tag_options)
    assert st.roles == ["admin", "user"] and st.is_admin and st.can_read_audit
    assert st.admin_keys == st.key_options  # admin on *: every key
    assert st.status.startswith("Live")


def test_filter_changes_propagate_to_every_view(fleet):
    st = state_for(fleet)
    rot, usage, audit = RotationView(state=st), UsageView(state=st), AuditView(state=st)
    for view in (rot, usage, audit):
        view.activate()
    assert {"pay-1", "pay-2", "web-1"} <= set(rot.frames["keys"]["name"])
    assert {"pay-1", "pay-2", "web-1"} <= set(usage.frames["top_keys"]["key"])
    all_records = audit.frames["count"]

    st.owner = ["team-web"]
    assert list(rot.frames["keys"]["name"]) == ["web-1"]
    assert list(rot.keys_table.value["name"]) == ["web-1"]  # the widget shows it too
    assert list(usage.frames["top_keys"]["key"]) == ["web-1"]
    assert 0 < audit.frames["count"] < all_records
    assert set(audit.frames["page"]["key"].dropna()) == {"web-1"}

    st.owner, st.tag = [], ["team=pay"]
    assert set(rot.frames["keys"]["name"]) == {"pay-1", "pay-2"}
    st.tag, st.key = [], ["pay-2"]
    assert list(usage.frames["top_keys"]["key"]) == ["pay-2"]
    assert int(usage.frames["version_usage"]["encryptions"].sum()) == 40  # 2 a day, 20 days


def test_time_range_limits_usage_and_audit(fleet):
    st = state_for(fleet)
    usage, audit = UsageView(state=st), AuditView(state=st)
    usage.activate()
    audit.activate()
    st.key = ["pay-1"]

    def encryptions() -> int:
        return int(usage.frames["version_usage"]["encryptions"].sum())

    month_records = audit.frames["count"]
    assert encryptions() == 60  # 3 a day for 20 days
    st.time_range = "Last 7 days"
    assert encryptions() == 21  # the last 7 days
    assert set(audit.frames["page"]["key"]) == {"pay-1"}
    assert 21 <= audit.frames["count"] < month_records
    assert int(usage.frames["top_keys"]["operations"].iloc[0]) <= audit.frames["count"]


def test_hidden_views_load_only_when_shown(fleet):
    st = state_for(fleet)
    usage = UsageView(state=st)
    assert usage.updates == 0
    st.owner = ["team-web"]
    assert usage.updates == 0 and usage.stale  # not on screen: nothing computed
    usage.activate()
    assert usage.updates == 1 and list(usage.frames["top_keys"]["key"]) == ["web-1"]


def test_filters_on_vanished_things_are_dropped(fleet):
    st = state_for(fleet)
    st.key, st.tag = ["web-1", "gone"], ["team=web", "team=gone"]
    st.refresh(force=True)
    assert st.key == ["web-1"] and st.tag == ["team=web"]


# -- roles and actions ---------------------------------------------------------------------------
def test_derive_roles_from_grants():
    grants = pd.DataFrame({"key": ["*", "*", "k1", "*"], "principal": ["a", "b", "c", "*"],
                           "role": ["admin", "auditor", "admin", "user"]})
    assert derive_roles(grants, "a", ["k1", "k2"]) == (["admin", "user"], ["k1", "k2"])
    assert derive_roles(grants, "b", ["k1", "k2"]) == (["auditor", "user"], [])
    assert derive_roles(grants, "c", ["k1", "k2"]) == (["user"], ["k1"])


def test_admin_sees_actions_auditor_and_user_see_none(fleet, other):
    admin_view = RotationView(state=state_for(fleet))
    found = {c for o in action_widgets(admin_view) for c in o.css_classes}
    assert {"kl-action-rotate", "kl-action-disable", "kl-action-schedule-deletion",
            "kl-action-approve", "kl-confirm"} <= found
    assert isinstance(admin_view.actions, ActionPanel)

    for who in ("bob", "dave"):  # auditor; user of one key
        st = state_for(other(who))
        assert not st.is_admin
        dash = Dashboard(state=st)
        for view in dash.views:
            view.activate()
            assert action_widgets(view) == [], (who, view.title)
        assert dash.views[1].actions is None
        verify = [o for o in dash.views[4].objects() if has_class(o, "kl-verify")]
        assert bool(verify) == (who == "bob")  # auditors verify, plain users may not


def test_key_admin_manages_only_their_keys(other):
    st = state_for(other("carol"))
    assert st.roles == [] and st.admin_keys == ["pay-1"]
    view = RotationView(state=st)
    assert view.actions is not None
    assert view.actions.keys() == ["pay-1"]


def test_granting_admin_adds_the_action_panel_live(fleet, other):
    st = state_for(other("bob"))
    view = RotationView(state=st)
    assert view.actions is None
    fleet.grant("web-1", "bob", "admin")
    try:
        assert st.poll()
        assert view.actions is not None and view.actions.keys() == ["web-1"]
    finally:
        fleet.revoke("web-1", "bob", "admin")
    assert st.poll()
    assert view.actions is None and action_widgets(view) == []


def test_drawing_the_rotation_page_changes_nothing_it_shows(fleet):
    """Drawing a page must not feed back into it: the action panel's key select once got its
    first key picked by Panel while it was drawn, which selected that key for the whole page
    (the version timeline shrank to it) and re-sent a chart the browser was still building."""
    view = RotationView(state=state_for(fleet))
    view.activate()
    updates, timeline = view.updates, view.frames["timeline"]
    pn.Column(view).get_root()  # what the server does when the page is shown
    assert view.state.selected_key is None and view.actions.key_select.value == ""
    assert view.updates == updates and view.frames["timeline"] is timeline
    assert len(set(timeline["key"])) > 1


def test_rotate_needs_confirmation_then_bumps_version_and_audits(fleet):
    key = tmp_key(fleet, "tmp-rot")
    st = state_for(fleet)
    view = RotationView(state=st)
    view.activate()
    panel = view.actions
    st.selected_key = key
    assert panel.key_select.value == key
    before = st.version

    panel.ask("rotate")
    assert panel.confirm_row.visible and key in panel.prompt.object
    assert fleet.get_key(key).latest_version == 1  # nothing happens before Confirm
    panel.cancel()
    assert not panel.confirm_row.visible and panel.confirm() == (False, "nothing to confirm")
    assert fleet.get_key(key).latest_version == 1

    panel.ask("rotate")
    ok, text = panel.confirm()
    assert ok and "version 2" in text
    assert fleet.get_key(key).latest_version == 2
    rec = fleet.audit(key=key, action="rotate")
    assert list(rec["principal"]) == ["alice"] and list(rec["outcome"]) == ["ok"]
    # the view refreshed itself with the new version
    assert st.version > before
    assert view.frames["keys"].set_index("name").loc[key, "latest_version"] == 2
    assert "version 2" in panel.result.object


def test_disable_and_schedule_deletion_through_the_panel(fleet):
    key = tmp_key(fleet, "tmp-del")
    st = state_for(fleet)
    view = RotationView(state=st)
    view.activate()
    panel = view.actions
    panel.key_select.value = key
    panel.ask("disable")
    assert panel.confirm()[0]
    assert fleet.get_key(key).state.value == "suspended"
    panel.days.value = 7
    panel.ask("schedule_deletion")
    assert "7 days" in panel.prompt.object
    assert panel.confirm()[0]
    assert fleet.get_key(key).state.value == "pending-deletion"
    upcoming = view.frames["upcoming"]
    assert key in set(upcoming.loc[upcoming["event"] == "deletion", "key"])


def test_empty_deletion_period_is_refused_in_words_not_raised(fleet):
    key = tmp_key(fleet, "tmp-nodays")
    st = state_for(fleet)
    panel = RotationView(state=st).actions
    panel.key_select.value = key
    panel.days.value = None  # the person cleared the field
    panel.ask("schedule_deletion")
    ok, text = panel.confirm()
    assert not ok and f"schedule deletion of {key} failed" in text and "7 to 30" in text
    assert st.status_level == "danger" and "✗" in panel.result.object
    assert fleet.get_key(key).state.value == "active"


def test_failed_action_is_shown_not_raised(fleet):
    key = tmp_key(fleet, "tmp-fail")
    fleet.disable(key)
    st = state_for(fleet)
    panel = RotationView(state=st).actions
    panel.key_select.value = key
    panel.ask("rotate")  # a suspended key cannot be rotated: the ledger refuses
    ok, text = panel.confirm()
    assert not ok and f"rotate {key} failed" in text and "suspended" in text
    assert st.status_level == "danger" and "✗" in panel.result.object


def test_approve_a_pending_request(fleet, other):
    key = tmp_key(fleet, "tmp-appr")
    fleet.rotate(key)
    fleet.set_policy(key, quorum=2)
    fleet.grant("*", "erin", "admin")
    rid = fleet.request("trim", key, "version 1 is unused", min_version=2)
    st = state_for(other("erin"))
    view = RotationView(state=st)
    view.activate()
    requests = view.frames["requests"]
    assert rid in set(requests["request_id"])
    panel = view.actions
    panel.ask("approve")
    assert "Select a pending request" in panel.result.object
    view.requests_table.selection = [int(requests.index[requests["request_id"] == rid][0])]
    panel.ask("approve")
    assert rid in panel.prompt.object
    ok, text = panel.confirm()
    assert ok and "2 of 2 approvals, executed" in text
    assert rid not in set(view.frames["requests"]["request_id"])
    assert fleet.requests()["status"][fleet.requests()["request_id"] == rid].item() == "executed"


# -- liveness ------------------------------------------------------------------------------------
def test_own_reads_do_not_keep_the_dashboard_refreshing(fleet):
    st = state_for(fleet)
    dash = Dashboard(state=st)
    for view in dash.views:
        view.activate()
    fleet.flush_audit()  # the dashboard's own audited reads land in the store
    assert not st.poll()
    assert dd.ChangeDetector(fleet.home).token() == st._token


def test_change_in_another_process_triggers_refresh(fleet, fleet_home):
    key = tmp_key(fleet, "tmp-live")
    st = state_for(fleet)
    view = RotationView(state=st)
    view.activate()
    version = st.version
    assert not st.poll()
    out = run_python(textwrap.dedent(f"""
        import keyledger as kl
        with kl.open({str(fleet_home)!r}, principal="alice") as led:
            led.disable({key!r})
    """))
    assert out.returncode == 0, out.stderr
    assert st.poll()
    assert st.version == version + 1
    assert view.frames["keys"].set_index("name").loc[key, "state"] == "suspended"


def test_other_processes_audit_activity_refreshes_batched(fleet, fleet_home, monkeypatch):
    st = state_for(fleet)
    st.time_range = "All time"  # the other process runs on the real clock
    audit = AuditView(state=st)
    audit.activate()
    audit.action_select.value = "encrypt"
    before = audit.frames["count"]
    # the batching window as long as the other process may take on a loaded machine
    monkeypatch.setattr("keyledger.dashboard.state.ACTIVITY_REFRESH_S", 3600.0)
    out = run_python(textwrap.dedent(f"""
        import keyledger as kl
        with kl.open({str(fleet_home)!r}, principal="alice") as led:
            led.encrypt("web-1", b"x")
    """))
    assert out.returncode == 0, out.stderr
    assert not st.poll()  # only audit activity, and a refresh happened just now: batched
    monkeypatch.setattr("keyledger.dashboard.state.ACTIVITY_REFRESH_S", 0.0)
    assert st.poll()
    assert audit.frames["count"] == before + 1


def test_store_busy_during_refresh_keeps_old_data(fleet, monkeypatch):
    st = state_for(fleet)
    view = RotationView(state=st)
    view.activate()
    frames, version = view.frames["keys"], st.version

    def busy(*a, **k):
        raise StoreBusy("the store is held by process 1")

    monkeypatch.setattr(st.data, "grants", busy)
    dd.note_local_change(fleet.home)
    assert not st.poll()
    assert st.status == BUSY_MESSAGE and st.status_level == "warning"
    assert st.version == version and view.frames["keys"] is frames
    monkeypatch.undo()
    assert st.poll()  # the next poll retries
    assert st.version == version + 1 and st.status.startswith("Live")


def test_store_busy_inside_a_view_keeps_its_widgets(fleet, monkeypatch):
    st = state_for(fleet)
    usage = UsageView(state=st)
    usage.activate()
    top = usage.frames["top_keys"]
    shown = usage.unusual_table.value

    def busy(*a, **k):
        raise StoreBusy("busy")

    monkeypatch.setattr(st.data, "top_keys", busy)
    st.owner = ["team-web"]
    assert usage.frames["top_keys"] is top and usage.unusual_table.value is shown
    assert st.status == BUSY_MESSAGE and usage.stale
    monkeypatch.undo()
    assert st.poll()  # retried although nothing changed on disk
    assert list(usage.frames["top_keys"]["key"]) == ["web-1"]
    assert not usage.stale and st.status.startswith("Live")


# -- pages ---------------------------------------------------------------------------------------
def test_overview_numbers(fleet, fleet_clock):
    from keyledger import analytics as kla

    fleet.compliance()
    fleet.verify_audit()
    for _ in range(4):
        fleet.encrypt("web-1", b"today")
    st = state_for(fleet)
    view = OverviewView(state=st)
    view.activate()
    status = kla.key_status(fleet)
    overdue = int((status["rotation_status"] == "overdue").sum())
    assert view.frames["overdue"] == overdue >= 1  # old-1 at least
    assert view.kpi_overdue.indicator.value == overdue
    assert view.kpi_keys.indicator.value == int((status["state"] == "active").sum())
    assert view.kpi_audit.indicator.value == "OK"
    assert view.kpi_findings.indicator.value == view.frames["severe"]
    assert view.kpi_ops.indicator.value == view.frames["activity"]["ops"] >= 4
    # the overview's one combined query says what the analytics functions say
    assert view.frames["activity"] == kla.activity_24h(fleet, now=fleet_clock())
    last = kla.last_verification(fleet)
    assert view.frames["verification"]["records"] == last["records"]
    assert view.frames["verification"]["ok"] == last["ok"]
    assert 0 < view.frames["audit_records"] <= kla.audit_count(fleet)
    st.owner = ["team-old"]
    assert view.frames["overdue"] == 1 and view.kpi_keys.indicator.value == 1


def test_compliance_findings_drill_down_and_report(fleet):
    fleet.compliance()
    st = state_for(fleet)
    view = ComplianceView(state=st)
    view.activate()
    findings = view.frames["findings"]
    assert len(findings) and len(view.findings_table.value) == len(findings)
    assert set(view.frames["matrix"]["framework"]) == set(findings["framework"])
    row = view.findings_table.value.iloc[0]
    detail = ComplianceView._evidence(row)
    assert any(isinstance(o, pn.pane.JSON) for o in detail.objects)
    path = Path(view._report())
    assert path.suffix == ".html" and "<html" in path.read_text()[:500].lower()


def test_viewer_without_audit_role_gets_a_message(other):
    st = state_for(other("dave"))
    usage = UsageView(state=st)
    usage.activate()
    assert usage.error.visible and "auditor or admin" in usage.error.object
    rot = RotationView(state=st)
    rot.activate()
    assert list(rot.frames["keys"]["name"]) == ["pay-1"]  # only the keys dave may see


def test_audit_paging_and_facets(fleet):
    st = state_for(fleet)
    view = AuditView(state=st)
    view.page_size = 10
    view.activate()
    total = view.frames["count"]
    assert total > 20 and len(view.frames["page"]) == 10
    first = list(view.frames["page"]["seq"])
    view.page(+1)
    second = list(view.frames["page"]["seq"])
    assert view.offset == 10 and max(second) < min(first)
    fleet.encrypt("web-1", b"more")  # the ledger grows while someone pages
    dd.note_local_change(fleet.home)
    assert st.poll()
    assert list(view.frames["page"]["seq"]) == second  # page 2 stays put
    view.page(-1)  # back on the first page, which follows the ledger live
    assert view.offset == 0 and view.frames["page"]["seq"].iloc[0] > first[0]
    assert "encrypt" in view.action_select.options
    view.action_select.value = "encrypt"
    assert view.action == "encrypt" and set(view.frames["page"]["action"]) == {"encrypt"}
    view.page(+1)
    st.owner = ["team-web"]  # a new filter starts on the first page
    assert view.offset == 0 and set(view.frames["page"]["key"]) == {"web-1"}


def test_verify_button_records_a_verification(fleet):
    st = state_for(fleet)
    view = AuditView(state=st)
    view.activate()
    view.verify()
    assert "verified OK" in view.verify_text.object
    ver = view.frames["verification"]  # (the clock is frozen: an earlier run may tie with it)
    assert ver["ok"] and ver["records"] > 0


# -- app and serve -------------------------------------------------------------------------------
def test_build_app_has_the_pages_and_selectors(fleet):
    template = build_app(ledger=fleet)
    dash = template.dashboard
    assert isinstance(template, pn.template.BootstrapTemplate) and template.title.startswith("keyledger")
    assert [title for title in dash.tabs._names] == [p.title for p in PAGES]
    assert dash.views[0].updates == 1 and all(v.updates == 0 for v in dash.views[1:])
    classes = {c for w in dash.filters.values() for c in w.css_classes}
    assert {"kl-filter-owner", "kl-filter-tag", "kl-filter-key", "kl-filter-range"} <= classes
    assert "kl-status" in dash.status.css_classes
    dash.filters["owner"].value = ["team-web"]
    assert dash.state.owner == ["team-web"]
    dash.tabs.active = 1
    assert list(dash.views[1].frames["keys"]["name"]) == ["web-1"]


def test_serve_refuses_a_public_address_without_login(tmp_path):
    with pytest.raises(ConfigError, match="without a login"):
        serve_command(tmp_path, address="0.0.0.0")
    cmd = serve_command(tmp_path, principal="alice")
    assert cmd.auth == "none" and cmd.env["KEYLEDGER_PRINCIPAL"] == "alice"
    assert cmd.url == "http://127.0.0.1:5006/keyledger_dashboard"
    assert cmd.argv[cmd.argv.index("--address") + 1] == "127.0.0.1"


def test_serve_with_basic_auth(tmp_path):
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": "s3cret"}))
    os.chmod(users, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        serve_command(tmp_path, address="0.0.0.0", basic_auth=users)
    os.chmod(users, 0o600)
    cmd = serve_command(tmp_path, address="0.0.0.0", port=8080, basic_auth=users,
                        allow_origin=["keys.example.com:8080"], principal="ignored")
    assert cmd.auth == "basic" and "--basic-auth" in cmd.argv
    login = Path(cmd.argv[cmd.argv.index("--basic-login-template") + 1]).read_text()
    assert "https://" not in login and "username" in login  # offline login page
    assert "PANEL_COOKIE_SECRET" in cmd.env and "KEYLEDGER_PRINCIPAL" not in cmd.env
    assert cmd.env["PANEL_COOKIE_SECRET"] not in " ".join(cmd.argv)
    assert cmd.argv[cmd.argv.index("--allow-websocket-origin") + 1] == "keys.example.com:8080"
    oauth = serve_command(tmp_path, address="0.0.0.0",
                          panel_args=["--oauth-provider", "github", "--oauth-key", "k"])
    assert oauth.auth == "oauth" and oauth.argv[-4:] == ["--oauth-provider", "github",
                                                         "--oauth-key", "k"]
