"""Analytics: read-only audited SQL, filters, and the aggregated frames charts and views use."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import duckdb
import pandas as pd
import pytest
from conftest import FakeClock, HomeTemplate, copy_home, run_python

import keyledger as kl
from keyledger import analytics as an


@pytest.fixture(scope="module")
def _estate_home(tmp_path_factory, simulation_template) -> tuple[HomeTemplate, datetime]:
    """The estate (``_build_estate``), made once for the module in a copy of the template
    home and closed; returns it and the time its clock reached."""
    home = tmp_path_factory.mktemp("estate") / "home"
    copy_home(simulation_template, home)
    clock = FakeClock()
    with kl.open(home, principal="alice", clock=clock) as ledger:
        _build_estate(ledger, clock)
    return HomeTemplate(home, None), clock.now


@pytest.fixture
def estate(home, clock, _estate_home):
    """alice's ledger of a copy of the module's estate (at ``home``), ``clock`` where the
    estate's clock ended."""
    template, end = _estate_home
    copy_home(template, home)
    clock.now = end
    led = kl.open(home, principal="alice", clock=clock)
    try:
        yield led
    finally:
        led.close()


def _build_estate(ledger, clock):
    """Two teams' keys, 40 days of weekday-heavy use by alice and a service, one rotation."""
    ledger.create_key("pay-data", spec="AES_256", owner="payments", tags={"team": "payments"})
    ledger.create_key("hr-data", spec="AES_256", owner="people", tags={"team": "hr"})
    ledger.create_key("signer", spec="EC_P256", rotation_period="30d", tags={"team": "hr"})
    ledger.grant("pay-data", "svc-pay", "user")
    svc = kl.open(ledger.home, principal="svc-pay", clock=clock)
    old = []
    for day in range(40):
        clock.advance(days=1)
        for _ in range(6 if clock().weekday() < 5 else 1):
            old.append(svc.encrypt("pay-data", b"card"))
            ledger.encrypt("hr-data", b"salary")
        if day == 10:
            ledger.rotate("pay-data")
        if day >= 35:  # the old version is still needed
            svc.decrypt(old[0])
    svc.close()


def test_query_runs_one_read_only_select_and_changes_nothing(estate):
    before = estate.query("SELECT count(*) AS n FROM keys").iloc[0, 0]
    for sql in ("DELETE FROM keys", "UPDATE keys SET state = 'destroyed'",
                "SELECT 1; DELETE FROM keys", "COPY keys TO '/tmp/kl-keys.csv'",
                "ATTACH ':memory:' AS m"):
        with pytest.raises(kl.InvalidInput, match="read-only SELECT"):
            estate.query(sql)
    with pytest.raises(kl.InvalidInput, match="file system operations are disabled"):
        estate.query("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(kl.InvalidInput, match="does not parse"):
        estate.query("SELEC nothing")
    with pytest.raises(kl.InvalidInput, match="query failed"):
        estate.query("SELECT no_such_column FROM keys")
    assert estate.query("SELECT count(*) AS n FROM keys").iloc[0, 0] == before == 3
    # timestamps come back as UTC; parameters bind
    df = estate.query("SELECT name, created_at FROM keys WHERE name = ?", ["signer"])
    assert list(df["name"]) == ["signer"] and str(df["created_at"].dt.tz) == "UTC"


def test_query_inside_keep_store_open_leaves_file_access_to_the_rest(estate, tmp_path):
    """A query's sandbox (no file access) is its own: a held store used to keep it for the
    block, so a later audit export (DuckDB's COPY) failed with 'file system operations are
    disabled'."""
    with estate.keep_store_open():
        assert estate.query("SELECT count(*) AS n FROM keys").iloc[0, 0] == 3
        with pytest.raises(kl.InvalidInput, match="file system operations are disabled"):
            estate.query("SELECT * FROM read_csv('/etc/passwd')")
        out = estate.export_audit(tmp_path / "audit.jsonl", format="jsonl")
        actions = {json.loads(line)["action"] for line in out.read_text().splitlines()}
        assert {"query", "encrypt", "rotate"} <= actions
    with pytest.raises(kl.InvalidInput, match="file system operations are disabled"):
        estate.query("SELECT * FROM read_csv('/etc/passwd')")


def test_query_is_for_admins_and_auditors_and_is_audited(estate, clock):
    with (kl.open(estate.home, principal="svc-pay", clock=clock) as svc,
          pytest.raises(kl.AccessDenied, match="admin or auditor")):
        svc.query("SELECT 1")
    estate.grant("*", "audit-anna", "auditor")
    with kl.open(estate.home, principal="audit-anna", clock=clock) as anna:
        assert anna.query("SELECT count(*) FROM audit_log", label="my count").iloc[0, 0] > 300
    records = estate.audit(action="query")
    mine = records[records["principal"].isin(["svc-pay", "audit-anna"])]
    assert list(mine["outcome"]) == ["denied", "ok"]
    assert mine["detail"].iloc[1] == "my count"


def test_filters_validate_and_select_keys(estate, clock):
    with pytest.raises(kl.InvalidInput, match="name=value"):
        an.Filters(tags=("team",))
    with pytest.raises(kl.InvalidInput, match="timezone-aware"):
        an.Filters(since=clock().replace(tzinfo=None))
    with pytest.raises(kl.InvalidInput, match="empty"):
        an.Filters(since=clock(), until=clock() - timedelta(days=1))
    status = an.key_status(estate, an.Filters(tags="team=hr"))
    assert sorted(status["name"]) == ["hr-data", "signer"]
    assert list(an.key_status(estate, an.Filters(owners=("payments",)))["name"]) == ["pay-data"]


def test_key_status_orders_most_urgent_first(estate, clock):
    status = an.key_status(estate)
    assert status.iloc[0]["name"] == "signer"  # 30-day period, never rotated in 40 days
    assert status.iloc[0]["rotation_status"] == "overdue"
    assert status.iloc[0]["days_to_due"] < 0
    estate.disable("hr-data")
    status = an.key_status(estate).set_index("name")
    assert status.loc["hr-data", "rotation_status"] == "inactive"
    counts = an.keys_by_state(an.key_status(estate)).set_index("state")["keys"]
    assert counts["active"] == 2 and counts["suspended"] == 1 and counts["destroyed"] == 0
    estate.schedule_deletion("hr-data", days=7)
    soon = an.upcoming(an.key_status(estate), now=clock(), days=10)
    assert {("signer", "rotation", True), ("hr-data", "deletion", False)} <= set(
        zip(soon["key"], soon["event"], soon["overdue"], strict=True))


def test_operations_per_period_groups_top_and_other(estate, clock):
    by_key = an.ops_per_period(estate, an.Filters(tags=("team=payments",)), by="key")
    assert set(by_key["group"]) == {"pay-data"} and by_key.attrs["bucket"] == "day"
    weekday = by_key[by_key["period"].dt.day_of_week < 5]["count"]
    weekend = by_key[by_key["period"].dt.day_of_week >= 5]["count"]
    assert weekday.median() > weekend.median()  # the weekly rhythm survives aggregation
    estate._rt.stop_background_ingest()  # no ingest between the two counts below
    top1 = an.ops_per_period(estate, by="principal", top=1, include_reads=True)
    assert set(top1["group"]) == {"alice", "other"}
    assert top1["count"].sum() == an.audit_count(estate)  # reads wait only for changes
    # by default the ledger's readers (list_keys, query, ...) are not key activity
    actions = set(an.ops_per_period(estate, by="action", top=50)["group"])
    assert {"encrypt", "decrypt", "rotate"} <= actions
    assert not actions & {"query", "list_keys", "open"}
    weekly = an.ops_per_period(estate, by="action", bucket="week")
    assert (weekly["period"].dt.day_of_week == 0).all()
    with pytest.raises(kl.InvalidInput, match="by must be one of"):
        an.ops_per_period(estate, by="colour")


def test_version_usage_shows_old_versions_still_decrypting(estate):
    usage = an.version_usage(estate).set_index(["key", "version"])
    v1, v2 = usage.loc[("pay-data", 1)], usage.loc[("pay-data", 2)]
    assert v1["decryptions"] == 5 and not v1["current"] and v2["current"]
    assert v1["encryptions"] > 0 and v2["encryptions"] > v1["encryptions"]
    assert usage.loc[("signer", 1), "encryptions"] == 0


def test_audit_paging_and_count(estate, clock):
    flt = an.Filters(keys=("pay-data",))
    total = an.audit_count(estate, flt)
    first = an.audit_page(estate, flt, limit=50)
    second = an.audit_page(estate, flt, limit=50, offset=50)
    assert len(first) == 50 and not set(first["seq"]) & set(second["seq"])
    assert first["time"].is_monotonic_decreasing and (first["key"] == "pay-data").all()
    last = an.audit_page(estate, flt, limit=50, offset=total - 3)
    assert len(last) == 3
    assert an.audit_count(estate, flt, principal="svc-pay", action="decrypt") == 5
    # a reader's own looks (list_keys, query, ...) can be left out of the explorer
    everything = an.audit_count(estate)
    changes = an.audit_count(estate, include_reads=False)
    assert 0 < changes < everything
    page = an.audit_page(estate, include_reads=False, limit=200)
    assert not set(page["action"]) & {"query", "list_keys", "open"}
    facets = an.audit_facets(estate)
    assert {"alice", "svc-pay"} <= set(facets["principal"]) and "rotate" in facets["action"]
    with pytest.raises(kl.InvalidInput, match="limit"):
        an.audit_page(estate, limit=0)
    # the service's own paging agrees
    page = estate.audit(key="pay-data", limit=10, offset=5, newest_first=True)
    assert list(page["seq"]) == list(first["seq"].iloc[5:15])


def test_unusual_activity_flags_newcomers_and_spikes(estate, clock):
    estate.grant("hr-data", "mallory", "user")
    with kl.open(estate.home, principal="mallory", clock=clock) as mallory:
        for _ in range(80):
            mallory.encrypt("hr-data", b"exfil")
    found = an.unusual_activity(estate)
    kinds = set(zip(found["kind"], found["key"], found["principal"].fillna("-"), strict=True))
    assert ("new principal", "hr-data", "mallory") in kinds
    assert ("spike", "hr-data", "-") in kinds
    assert ("new principal", "pay-data", "svc-pay") not in kinds  # known for weeks


def test_stored_findings_match_the_last_evaluation_without_a_new_run(estate):
    evaluated = estate.compliance()
    runs = estate.query("SELECT count(*) FROM compliance_runs").iloc[0, 0]
    stored = estate.findings()
    assert estate.query("SELECT count(*) FROM compliance_runs").iloc[0, 0] == runs
    cols = ["rule_id", "key", "severity", "status"]
    assert stored[cols].equals(evaluated[cols])
    assert "nist.rotation-overdue" in set(stored["rule_id"])
    matrix = an.compliance_matrix(stored)
    assert len(matrix) == stored["framework"].nunique() * 5
    assert matrix["findings"].sum() == len(stored)
    assert an.compliance_matrix(stored.iloc[:0]).empty


def test_activity_and_verification_summaries(estate, clock):
    act = an.activity_24h(estate)
    assert act["ops"] > 0 and act["denied"] == 0
    assert an.last_verification(estate) is None
    estate.verify_audit()
    assert an.last_verification(estate)["ok"]


def test_data_version_changes_when_another_process_changes_the_home(estate):
    estate.flush_audit()
    token = an.data_version(estate.home)
    assert an.data_version(estate.home) == token
    out = run_python(f"import keyledger as kl\n"
                     f"with kl.open({str(estate.home)!r}, principal='alice') as led:\n"
                     f"    led.disable('signer')\n")
    assert out.returncode == 0, out.stderr
    assert an.data_version(estate.home) != token
    assert an.key_status(estate).set_index("name").loc["signer", "state"] == "suspended"


def test_analytics_read_a_tampered_ledger(estate):
    """A dashboard must still show a ledger that fails verification, to say so."""
    estate.flush_audit()
    home = estate.home
    estate.close()
    con = duckdb.connect(str(home / "keyledger.duckdb"))
    con.execute("UPDATE audit_log SET principal = 'mallory' WHERE seq = 5")
    con.close()
    with kl.open(home, principal="alice") as again:
        assert an.audit_count(again, principal="mallory") == 1
        assert not again.verify_audit().ok
        assert isinstance(an.ops_per_period(again), pd.DataFrame)
