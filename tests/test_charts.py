"""Chart builders: valid Vega-Lite for empty, small and large (1,000,000 audit records) inputs,
with the palette meaning the same everywhere and the large case kept small."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import altair as alt
import duckdb
import pandas as pd
import pytest
from conftest import FakeClock

import keyledger as kl
import keyledger.charts as klc
from keyledger import analytics as an
from keyledger import display

RED, ORANGE, GREEN, BLUE = display.RED, display.ORANGE, display.GREEN, display.BLUE
ONE_MB = 1_000_000
START = datetime(2024, 7, 1, 9, 0, tzinfo=UTC)  # 18 months of history end at START + 540 days
N_AUDIT = 1_000_000
N_FLEET = 1_000


# -- helpers -------------------------------------------------------------------------------------
def spec_of(chart: alt.TopLevelMixin) -> dict:
    """The validated Vega-Lite dict (``to_dict`` validates against the schema and raises
    MaxRowsError above 5,000 inline rows)."""
    assert alt.data_transformers.active == "default"  # nobody switched the row check off
    spec = chart.to_dict(validate=True)
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/v6")
    assert len(json.dumps(spec)) < ONE_MB
    return spec


def rows(spec: dict) -> list[dict]:
    """The chart's main data rows (the largest inline dataset)."""
    sets = list(spec.get("datasets", {}).values())
    return max(sets, key=len) if sets else spec.get("data", {}).get("values", [])


def layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


def colour_map(spec: dict, field: str | None = None) -> dict[str, str]:
    """value -> colour of the colour scales in the chart (optionally of one field)."""
    out: dict[str, str] = {}
    for layer in layers(spec):
        color = layer.get("encoding", {}).get("color", {})
        scale = color.get("scale", {})
        if "domain" in scale and (field is None or color.get("field") == field):
            out.update(zip(scale["domain"], scale["range"], strict=True))
    return out


def subtitle(spec: dict) -> str:
    sub = spec["title"].get("subtitle", "")
    return " ".join(sub) if isinstance(sub, list) else sub


def is_no_data(spec: dict) -> bool:
    values = spec.get("data", {}).get("values", [])
    return spec.get("mark", {}).get("type") == "text" and any(
        str(v.get("message", "")).startswith("No data") for v in values)


# -- homes ---------------------------------------------------------------------------------------
def _frames(led: kl.KeyLedger, *, top_n: int = 10) -> dict[str, pd.DataFrame]:
    status = an.key_status(led)
    findings = led.findings()
    return {
        "key_status": status,
        "keys_by_state": an.keys_by_state(status),
        "version_timeline": an.version_timeline(led),
        "ops": an.ops_per_period(led, include_reads=True),  # every record
        "ops_by_key": an.ops_per_period(led, by="key"),
        "ops_by_outcome": an.ops_per_period(led, by="outcome"),
        "ops_daily_20": an.ops_per_period(led, by="key", bucket="day", top=20),
        "version_usage": an.version_usage(led),
        "top_keys": an.top_keys(led, n=top_n),
        "findings": findings,
        "matrix": an.compliance_matrix(findings),
        "trend": led.compliance_trend(),
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """A real home: four keys, a month of use, a rotation whose old version still decrypts, a
    suspended key, an overdue key, two compliance runs."""
    clock = FakeClock(START)
    home = tmp_path_factory.mktemp("small") / "home"
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("orders", spec="AES_256", owner="payments", tags={"team": "payments"})
        led.create_key("hr-data", spec="AES_256", owner="people", rotation_period="7d")
        led.create_key("tokens", spec="HMAC_SHA256", owner="platform")
        led.create_key("legacy", spec="AES_128", owner="payments")
        old = [led.encrypt("orders", b"card %d" % i) for i in range(5)]
        led.compliance()
        for day in range(30):
            clock.advance(days=1)
            led.encrypt("orders", b"x")
            led.mac("tokens", b"m")
            if day == 5:
                led.rotate("orders")
            if day >= 20:
                led.decrypt(old[day % 5])  # version 1 of "orders" is still needed
        led.disable("legacy")
        led.rotate("tokens")  # tokens v1 now old and never used for decrypts
        led.compliance()
        frames = _frames(led)
    frames["home"] = home
    return frames


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """A real home with 1,005 keys and 1,000,000 synthetic audit records over 18 months,
    aggregated by analytics.py (built once per module)."""
    clock = FakeClock(START)
    home = tmp_path_factory.mktemp("large") / "home"
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("payments", spec="AES_256", owner="payments", tags={"team": "payments"})
        led.create_key("hr", spec="AES_256", owner="people", tags={"team": "hr"},
                       rotation_period="30d")
        led.create_key("tokens", spec="HMAC_SHA256", owner="platform")
        led.create_key("signer", spec="EC_P256", owner="platform")
        led.create_key("legacy", spec="AES_128", owner="payments")
        for month in range(18):
            clock.advance(days=30)
            if month % 6 == 0:
                led.rotate("payments")
            if month == 8:
                led.rotate("tokens")
            if month in (8, 17):
                led.compliance()
        led.disable("legacy")
    con = duckdb.connect(str(home / "keyledger.duckdb"))
    try:
        now = clock().replace(tzinfo=None)
        # A fleet of 1,000 more keys (catalog rows only: never used for crypto here).
        con.execute("""
            INSERT INTO keys
            SELECT uuid()::VARCHAR, printf('fleet-%04d', i),
                   (['AES_256', 'AES_256', 'HMAC_SHA256', 'EC_P256'])[1 + i % 4],
                   (['encrypt', 'encrypt', 'mac', 'sign'])[1 + i % 4],
                   CASE WHEN i % 50 = 1 THEN 'suspended' WHEN i % 50 = 2 THEN 'deactivated'
                        WHEN i % 50 = 3 THEN 'pending-deletion' WHEN i % 50 = 4 THEN 'destroyed'
                        WHEN i % 50 = 5 THEN 'compromised' ELSE 'active' END,
                   NULL, (['payments', 'people', 'platform', 'analytics'])[1 + i % 4],
                   $now - INTERVAL 500 DAY, $now - to_days((i * 37) % 420),
                   90 * 86400, false, 1 + i % 3, 1, 1,
                   CASE WHEN i % 50 = 3 THEN $now + INTERVAL 10 DAY END,
                   json_object('team', (['payments', 'hr', 'platform', 'analytics'])[1 + i % 4]),
                   '{}'
            FROM range($n) t(i)""", {"now": now, "n": N_FLEET})
        con.execute("""
            INSERT INTO versions
            SELECT k.key_id, v, md5(k.key_id || v),
                   CASE WHEN k.state = 'destroyed' THEN 'destroyed'
                        WHEN v = k.latest_version THEN 'active' ELSE 'retired' END,
                   k.created_at + to_days((v - 1) * 150),
                   CASE WHEN k.state = 'destroyed' THEN $now - INTERVAL 1 DAY END
            FROM keys k, range(1, 4) r(v)
            WHERE k.name LIKE 'fleet-%' AND v <= k.latest_version""", {"now": now})
        # 1,000,000 audit records: 60 % on the five real keys, the rest over the fleet; six
        # principals; encrypt/decrypt/data keys/reads; 97 % ok, 2 % denied, 1 % failed.
        con.execute("""
            INSERT INTO audit_log
            WITH k AS (SELECT name, key_id, latest_version,
                              row_number() OVER (ORDER BY name LIKE 'fleet-%', name) - 1 AS idx
                       FROM keys),
                 m AS (SELECT coalesce(max(seq), 0) AS s FROM audit_log),
                 r AS (SELECT range AS i, (hash(range) >> 2)::BIGINT AS h FROM range($n))
            SELECT m.s + r.i + 1, 'synthetic', r.i + 1,
                   $start + to_microseconds(r.i * 46656000 + h % 30000000),
                   (['alice', 'svc-pay', 'svc-hr', 'batch', 'bob', 'carol'])[1 + (h // 7) % 6],
                   CASE WHEN h % 100 < 45 THEN 'encrypt' WHEN h % 100 < 85 THEN 'decrypt'
                        WHEN h % 100 < 92 THEN 'generate_data_key'
                        WHEN h % 100 < 97 THEN 'get_key' ELSE 'list_keys' END,
                   CASE WHEN h % 100 < 97 THEN k.name END,
                   CASE WHEN h % 100 < 97 THEN k.key_id END,
                   CASE WHEN h % 100 < 92 THEN 1 + (h // 11) % k.latest_version END,
                   CASE WHEN (h // 13) % 100 < 97 THEN 'ok'
                        WHEN (h // 13) % 100 < 99 THEN 'denied' ELSE 'failed' END,
                   NULL, NULL, NULL, 4242, 'synthetic', 'synthetic'
            FROM r, m, k
            WHERE k.idx = CASE WHEN (h // 3) % 10 < 6 THEN (h // 5) % 5
                               ELSE 5 + (h // 17) % $fleet END""",
                    {"n": N_AUDIT, "start": START.replace(tzinfo=None), "fleet": N_FLEET})
        total = con.execute("SELECT count(*) FROM audit_log").fetchall()[0][0]
    finally:
        con.close()
    # The synthetic rows break the hash chain and the signed checkpoint: ingest refuses to
    # extend it (AuditError), which query() tolerates, so the analytics read what is there.
    with kl.open(home, principal="alice", clock=clock) as led:
        frames = _frames(led, top_n=50)
        frames["audit_total"] = an.audit_count(led)
    frames["inserted_total"] = total
    return frames


# -- palettes ------------------------------------------------------------------------------------
def test_palettes_mean_the_same_everywhere():
    assert (klc.ROTATION_COLORS["overdue"] == klc.SEVERITY_COLORS["critical"]
            == klc.STATE_COLORS["compromised"] == klc.OUTCOME_COLORS["failed"] == RED)
    assert (klc.ROTATION_COLORS["due soon"] == klc.SEVERITY_COLORS["high"]
            == klc.OUTCOME_COLORS["denied"] == ORANGE)
    assert klc.ROTATION_COLORS["ok"] == klc.OUTCOME_COLORS["ok"] == klc.STATE_COLORS["active"]
    assert set(klc.ROTATION_COLORS) == set(an.ROTATION_STATUSES)
    assert set(klc.SEVERITY_COLORS) == set(an.SEVERITY_ORDER)
    assert set(klc.STATE_COLORS) == set(an.STATES)
    assert set(klc.OUTCOME_COLORS) == {"ok", "denied", "failed"}
    # the display module (HTML badges) uses the very same dicts
    assert klc.SEVERITY_COLORS is display.SEVERITY_COLORS
    # categorical groups (actions, keys, principals) never borrow a colour that means something
    meaningful = {RED, ORANGE, GREEN}
    assert not meaningful & set(klc.GROUP_COLORS)


# -- every builder, every size -------------------------------------------------------------------
BUILDERS = {
    "rotation_status": (klc.rotation_status, "key_status"),
    "keys_by_state": (klc.keys_by_state, "keys_by_state"),
    "version_timeline": (klc.version_timeline, "version_timeline"),
    "operations": (klc.operations, "ops"),
    "operations_by_key": (klc.operations, "ops_by_key"),
    "operations_by_outcome": (klc.operations, "ops_by_outcome"),
    "operations_daily": (klc.operations, "ops_daily_20"),
    "version_usage": (klc.version_usage, "version_usage"),
    "top_keys": (klc.top_keys, "top_keys"),
    "compliance_heatmap": (klc.compliance_heatmap, "matrix"),
    "finding_trend": (klc.finding_trend, "trend"),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_every_builder_gives_no_data_for_an_empty_frame(name, small):
    builder, frame = BUILDERS[name]
    empty = small[frame].iloc[0:0]
    spec = spec_of(builder(empty))
    assert is_no_data(spec)
    assert spec["title"]["text"]  # the title still says what would be shown
    spec = spec_of(builder(empty, width="container", height=90))
    assert spec["width"] == "container" and spec["height"] == 90


@pytest.mark.parametrize("name", BUILDERS)
def test_every_builder_draws_the_small_home(name, small):
    builder, frame = BUILDERS[name]
    spec = spec_of(builder(small[frame], width=480))
    assert not is_no_data(spec) and rows(spec)
    assert spec["width"] == 480
    assert spec["title"]["text"] and subtitle(spec)
    assert len(json.dumps(spec)) < 100_000
    assert spec_of(builder(small[frame], width="container"))["width"] == "container"


@pytest.mark.parametrize("name", BUILDERS)
def test_every_builder_stays_small_for_a_million_audit_records(name, large):
    builder, frame = BUILDERS[name]
    spec = spec_of(builder(large[frame]))  # no MaxRowsError
    assert len(json.dumps(spec)) < ONE_MB
    assert len(rows(spec)) <= klc.MAX_ROWS
    assert not is_no_data(spec)


def test_the_large_home_really_holds_a_million_records(large):
    assert large["inserted_total"] >= N_AUDIT
    # analytics still read every record although ingest refuses the forged tail
    assert large["audit_total"] >= N_AUDIT
    assert len(large["key_status"]) == N_FLEET + 5
    assert large["ops"]["count"].sum() >= N_AUDIT
    assert len(large["version_usage"]) > 1_000  # big enough that limits matter


# -- rotation status -----------------------------------------------------------------------------
def test_rotation_status_colours_overdue_keys_red_and_puts_them_first(small):
    status = small["key_status"]
    spec = spec_of(klc.rotation_status(status))
    colours = colour_map(spec, "status")
    assert colours["overdue"] == RED and colours["due soon"] == ORANGE
    assert colours["ok"] == GREEN and colours["inactive"] == display.LIGHT_GREY
    data = {r["key"]: r for r in rows(spec)}
    assert data["hr-data"]["status"] == "overdue" and data["hr-data"]["days"] < 0
    assert data["hr-data"]["label"].startswith("overdue by ")
    assert data["legacy"]["status"] == "inactive" and data["legacy"]["label"] == (
        "inactive (suspended)")
    order = sorted(rows(spec), key=lambda r: r["order"])
    assert order[0]["key"] == "hr-data" and order[-1]["key"] == "legacy"
    assert "Days until rotation due" in spec["title"]["text"]
    assert "1 overdue" in subtitle(spec)
    # only the columns the chart needs: no key ids, tags or other catalog fields
    assert set(rows(spec)[0]) <= {"key", "status", "days", "order", "label", "label_x",
                                  "due_at", "owner"}


def test_rotation_status_limits_a_large_fleet_to_the_most_urgent(large):
    status = large["key_status"]
    spec = spec_of(klc.rotation_status(status, top=50))
    data = rows(spec)
    assert len(data) == 50
    assert "showing the 50 most urgent of 1,005 keys" in subtitle(spec)
    overdue = int((status["rotation_status"] == "overdue").sum())
    assert overdue >= 50  # the fleet has hundreds of overdue keys: all 50 shown are overdue
    assert {r["status"] for r in data} == {"overdue"}
    shown = sorted(data, key=lambda r: r["order"])
    assert [r["days"] for r in shown] == sorted(r["days"] for r in shown)  # most overdue first
    assert f"{overdue} overdue" in subtitle(spec)


# -- keys by state -------------------------------------------------------------------------------
def test_keys_by_state_shows_every_state_in_lifecycle_order(small, large):
    spec = spec_of(klc.keys_by_state(small["keys_by_state"]))
    data = sorted(rows(spec), key=lambda r: r["order"])
    assert [r["state"] for r in data] == list(an.STATES)
    assert {r["state"]: r["keys"] for r in data}["suspended"] == 1
    assert colour_map(spec)["compromised"] == RED
    spec = spec_of(klc.keys_by_state(large["keys_by_state"]))
    assert sum(r["keys"] for r in rows(spec)) == N_FLEET + 5


# -- version timeline ----------------------------------------------------------------------------
def test_version_timeline_outlines_current_versions(small, large):
    spec = spec_of(klc.version_timeline(small["version_timeline"]))
    data = rows(spec)
    orders = [r for r in data if r["key"] == "orders"]
    assert [(r["version"], r["current"], r["state"]) for r in orders] == [
        (1, False, "retired"), (2, True, "active")]
    assert orders[0]["end"] == orders[1]["start"]  # v1 lasted until v2 was created
    assert colour_map(spec, "state")["active"] == GREEN
    spec = spec_of(klc.version_timeline(large["version_timeline"], top=40))
    assert len({r["key"] for r in rows(spec)}) == 40
    assert "showing the first 40 of 1,005 keys" in subtitle(spec)


# -- operations ----------------------------------------------------------------------------------
def test_operations_stack_per_day_by_group(small):
    ops = small["ops"]
    spec = spec_of(klc.operations(ops))
    assert spec["title"]["text"] == "Operations per day"
    assert spec["encoding"]["y"]["title"] == "Operations per day"
    assert spec["encoding"]["y"]["stack"] == "zero"
    data = rows(spec)
    assert sum(r["count"] for r in data) == int(ops["count"].sum())
    assert {r["group"] for r in data} >= {"encrypt", "mac", "decrypt"}


def test_operations_by_outcome_use_the_outcome_colours(large):
    spec = spec_of(klc.operations(large["ops_by_outcome"]))
    colours = colour_map(spec)
    assert colours["ok"] == GREEN and colours["denied"] == ORANGE and colours["failed"] == RED
    assert spec["title"]["text"] == "Operations per week"  # 18 months: weekly buckets


def test_operations_regroup_a_big_daily_frame_and_keep_every_count(large):
    daily = large["ops_daily_20"]
    assert daily.attrs["bucket"] == "day" and len(daily) > 2 * klc.MAX_ROWS
    spec = spec_of(klc.operations(daily))
    data = rows(spec)
    assert len(data) <= klc.MAX_ROWS
    assert sum(r["count"] for r in data) == int(daily["count"].sum())
    assert spec["title"]["text"] == "Operations per week"
    assert "re-grouped by week" in subtitle(spec)


def test_operations_fold_extra_groups_into_other():
    days = pd.date_range("2026-01-01", periods=10, freq="D", tz="UTC")
    df = pd.DataFrame([{"period": d, "group": f"key-{g:02d}", "count": g + 1}
                       for d in days for g in range(30)])
    df.attrs.update(bucket="day", by="key")
    spec = spec_of(klc.operations(df, max_groups=5))
    groups = {r["group"] for r in rows(spec)}
    assert groups == {"key-29", "key-28", "key-27", "key-26", "key-25", "other"}
    assert colour_map(spec)["other"] == klc.OTHER_COLOR
    assert sum(r["count"] for r in rows(spec)) == int(df["count"].sum())


# -- version usage (retire safety) ---------------------------------------------------------------
def test_version_usage_flags_an_old_version_that_still_decrypts(small):
    spec = spec_of(klc.version_usage(small["version_usage"]))
    colours = colour_map(spec, "verdict")
    data = {r["label"]: r for r in rows(spec)}
    old = data["orders v1"]
    assert old["verdict"] == "still decrypting" and old["decryptions"] == 10
    assert colours[old["verdict"]] == ORANGE
    assert "not safe to retire" in old["verdict_text"]
    assert data["tokens v1"]["verdict"] == "no decrypts"  # old, unused: safe
    assert colours["no decrypts"] == GREEN
    assert data["orders v2"]["verdict"] == "current"
    first = min(rows(spec), key=lambda r: r["order"])
    assert first["label"] == "orders v1"  # the version that blocks retiring comes first


def test_version_usage_limits_a_large_fleet(large):
    usage = large["version_usage"]
    spec = spec_of(klc.version_usage(usage, top=40))
    data = rows(spec)
    assert len(data) == 40
    assert {r["verdict"] for r in data} == {"still decrypting"}
    assert f"of {len(usage):,} versions" in subtitle(spec)


# -- busiest keys --------------------------------------------------------------------------------
def test_top_keys_split_operations_by_outcome(large):
    top = large["top_keys"]
    spec = spec_of(klc.top_keys(top, top=10))
    data = rows(spec)
    assert {r["key"] for r in data} == set(top["key"].head(10))
    per_key = pd.DataFrame(data).groupby("key")["count"].sum()
    expected = top.set_index("key")["operations"].head(10)
    assert per_key.sort_index().tolist() == expected.sort_index().tolist()
    assert colour_map(spec)["failed"] == RED
    assert "showing the 10 busiest of 50 keys" in subtitle(spec)


# -- compliance ----------------------------------------------------------------------------------
def test_compliance_heatmap_has_every_framework_severity_cell(small, large):
    for frames in (small, large):
        matrix = frames["matrix"]
        spec = spec_of(klc.compliance_heatmap(matrix))
        data = rows(spec)
        cells = {(r["framework"], r["severity"]) for r in data}
        frameworks = set(matrix["framework"])
        assert frameworks and cells == {(f, s) for f in frameworks for s in an.SEVERITY_ORDER}
        assert sum(r["findings"] for r in data) == int(matrix["findings"].sum())
        colours = colour_map(spec, "fill")
        for r in data:
            expected = (klc.SEVERITY_COLORS[r["severity"]] if r["findings"] else display.EMPTY)
            assert colours[r["fill"]] == expected
    assert colours["critical"] == RED


def test_finding_trend_stacks_open_findings_by_severity(small):
    trend = small["trend"]
    spec = spec_of(klc.finding_trend(trend))
    assert spec["encoding"]["y"]["stack"] == "zero"
    assert colour_map(spec)["critical"] == RED
    data = rows(spec)
    assert len({r["time"] for r in data}) == trend["run_id"].nunique() == 2
    latest = trend[trend["run_id"] == trend["run_id"].max()]["open"].sum()
    assert f"latest: {latest} open" in subtitle(spec)


def test_finding_trend_thins_out_years_of_daily_runs():
    times = pd.date_range("2024-01-01 06:00", periods=1000, freq="12h", tz="UTC")
    df = pd.DataFrame([{"run_id": i + 1, "time": t, "framework": fw, "severity": sev,
                        "open": (i + len(fw)) % 7, "opened": 0, "resolved": 0}
                       for i, t in enumerate(times) for fw in ("PCI", "SOC 2")
                       for sev in an.SEVERITY_ORDER])
    spec = spec_of(klc.finding_trend(df, max_points=400))
    assert len({r["time"] for r in rows(spec)}) <= 400
    assert "last evaluation of each week" in subtitle(spec)
    only = spec_of(klc.finding_trend(df, framework="PCI"))
    assert "PCI" in subtitle(only)


# -- contract details ----------------------------------------------------------------------------
def test_builders_refuse_the_wrong_frame_and_bad_sizes(small):
    with pytest.raises(kl.InvalidInput, match="analytics.key_status"):
        klc.rotation_status(small["top_keys"])
    with pytest.raises(kl.InvalidInput, match="DataFrame"):
        klc.operations([1, 2, 3])
    with pytest.raises(kl.InvalidInput, match="width"):
        klc.keys_by_state(small["keys_by_state"], width="wide")
    with pytest.raises(kl.InvalidInput, match="height"):
        klc.keys_by_state(small["keys_by_state"], height=-1)
    with pytest.raises(kl.InvalidInput, match="top"):
        klc.rotation_status(small["key_status"], top=0)


def test_charts_combine_without_config_conflicts(small):
    combined = (klc.rotation_status(small["key_status"])
                | klc.keys_by_state(small["keys_by_state"])) & klc.compliance_heatmap(
        small["matrix"])
    spec = spec_of(combined)
    assert len(spec["vconcat"]) == 2


def test_no_builder_embeds_more_than_max_rows_even_when_asked_for_everything():
    """Huge synthetic frames and huge limits: still no MaxRowsError, still under 1 MB."""
    now = pd.Timestamp("2026-01-01", tz="UTC")
    n = 10_000
    status = pd.DataFrame({
        "name": [f"k{i:05d}" for i in range(n)], "rotation_status": "overdue",
        "days_to_due": [-(i % 400) - 1.0 for i in range(n)], "state": "active",
        "owner": "team", "next_rotation_due": now})
    spec = spec_of(klc.rotation_status(status, top=1_000_000))
    assert len(rows(spec)) == klc.MAX_ROWS
    assert "showing the 2,000 most urgent of 10,000 keys" in subtitle(spec)
    versions = pd.DataFrame({
        "key": "busy", "version": range(1, 6001), "state": "retired",
        "start": pd.date_range("2010-01-01", periods=6000, freq="D", tz="UTC"),
        "end": pd.date_range("2010-01-02", periods=6000, freq="D", tz="UTC"),
        "current": [False] * 5999 + [True]})
    spec = spec_of(klc.version_timeline(versions, top=1_000))
    assert len(rows(spec)) == klc.MAX_ROWS and max(r["version"] for r in rows(spec)) == 6000
    months = pd.date_range("1990-01-01", periods=12 * 30, freq="MS", tz="UTC")
    ops = pd.DataFrame([{"period": m, "group": f"g{g}", "count": 1} for m in months
                        for g in range(40)])
    ops.attrs.update(bucket="day", by="principal")
    spec = spec_of(klc.operations(ops, max_groups=40))
    assert len(rows(spec)) <= klc.MAX_ROWS
    assert sum(r["count"] for r in rows(spec)) == len(ops)
    top = pd.DataFrame({"key": [f"k{i}" for i in range(n)], "operations": 10, "denied": 1,
                        "failed": 1})
    assert len(rows(spec_of(klc.top_keys(top, top=n)))) <= klc.MAX_ROWS


def test_operations_guess_weekly_buckets_when_attrs_are_lost():
    weeks = pd.date_range("2025-01-06", periods=30, freq="7D", tz="UTC")
    df = pd.DataFrame({"period": weeks, "group": "encrypt", "count": 5})
    assert not df.attrs
    spec = spec_of(klc.operations(df))
    assert spec["title"]["text"] == "Operations per week"
    first = min(rows(spec), key=lambda r: r["start"])
    assert (first["start"], first["end"]) == ("2025-01-06T00:00:00Z", "2025-01-13T00:00:00Z")
