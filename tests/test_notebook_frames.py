"""DataFrames as a notebook user meets them (issue: notebooks, item 6; docs/notebooks.md).

- Every time column is tz-aware UTC, in grants(), requests(), version_usage() and
  analytics.version_usage() as in audit() and list_keys(), so comparing times across frames
  never raises ``TypeError``.
- Every public frame follows one convention (``keyledger.frames``): ``datetime64[us, UTC]``,
  ``string``/``Int64``/``boolean`` with ``<NA>``, floats only for measures, ordered
  categoricals for states, rotation status and severity.
- ``audit()`` is an ``AuditFrame`` of the newest records (1,000 by default), read with a LIMIT
  in DuckDB, oldest first so ``.tail()`` is the newest.
(DuckDB's progress bar, which it turns on only inside a Jupyter kernel, is checked in a kernel:
tests/test_notebook_setup.py.)
"""

from __future__ import annotations

from datetime import UTC, timedelta

import pandas as pd
import pytest
from conftest import FakeClock, copy_home

import keyledger as kl
import keyledger.analytics as ka
import keyledger.service as service
import keyledger.store.audit as audit_repo
from keyledger.display import AuditFrame, FindingsFrame
from keyledger.errors import InvalidInput

TIME_COLUMNS = {
    "grants": ("granted_at",),
    "requests": ("requested_at", "expires_at", "executed_at"),
    "version_usage": ("last_decrypt",),
    "ledger.version_usage": ("created_at", "last_decrypt", "last_used"),
}


def _populated(ledger, clock):
    """A key used, rotated, granted and with a pending quorum request."""
    ledger.create_key("orders", spec="AES_256")
    blob = ledger.encrypt("orders", b"x", context={"t": "a"})
    clock.advance(hours=1)
    ledger.decrypt(blob, context={"t": "a"})
    ledger.grant("orders", "svc-orders", "user")
    ledger.set_policy("orders", quorum=2)
    ledger.schedule_deletion("orders", days=7)
    clock.advance(days=8)
    ledger.request("destroy", "orders", "retired service")
    return {"grants": ledger.grants(), "requests": ledger.requests(),
            "version_usage": ka.version_usage(ledger),
            "ledger.version_usage": ledger.version_usage()}


def test_every_time_column_is_utc_aware(ledger, clock) -> None:
    frames = _populated(ledger, clock)
    for name, columns in TIME_COLUMNS.items():
        df = frames[name]
        assert len(df), name
        for col in columns:
            assert isinstance(df[col].dtype, pd.DatetimeTZDtype), (name, col, df[col].dtype)
            assert str(df[col].dt.tz) == "UTC", (name, col)


def test_times_compare_across_frames_without_type_errors(ledger, clock) -> None:
    frames = _populated(ledger, clock)
    audit = ledger.audit()
    first = audit["time"].min()
    assert (frames["grants"]["granted_at"] >= first).all()
    assert (frames["requests"]["requested_at"] > first).all()
    assert (frames["version_usage"]["last_decrypt"].dropna() > first).all()
    assert (frames["ledger.version_usage"]["created_at"] >= first).all()
    assert frames["requests"]["expires_at"].iloc[0] > clock.now.replace(tzinfo=UTC)


def test_audit_limit_newest_first_is_the_tail_of_the_ledger(ledger, clock) -> None:
    _populated(ledger, clock)
    before = ledger.audit()  # the full load (this read is the next record)
    newest = ledger.audit(limit=5, newest_first=True)
    assert len(newest) == 5
    # the newest record is the full load's own 'audit' record; the four after it are its tail
    assert newest.iloc[0]["action"] == "audit"
    assert list(newest["seq"].iloc[1:]) == list(before["seq"].tail(4).iloc[::-1])
    assert list(newest["action"].iloc[1:]) == list(before["action"].tail(4).iloc[::-1])



# -- one convention for every public frame ----------------------------------------------------
# frame -> (time columns that must be there, {column: its ordered categories})
KEY_STATE = ("pre-activation", "active", "suspended", "deactivated", "compromised",
             "pending-deletion", "destroyed")
VERSION_STATE = ("active", "retired", "compromised", "destroyed")
SEVERITY = ("critical", "high", "medium", "low", "info")  # most urgent first, sorts first
ROTATION = ("overdue", "due soon", "ok", "not scheduled", "inactive")
MEASURES = {"days_to_due", "baseline", "mean_open_days", "max_open_days"}  # may be float
FRAMES = {
    "list_keys": (("created_at", "rotated_at", "next_rotation_due", "deletion_due"),
                  {"state": KEY_STATE}),
    "audit": (("time",), {}),
    "query": (("time",), {}),
    "version_usage": (("created_at", "last_decrypt", "last_used"), {"state": VERSION_STATE}),
    "grants": (("granted_at",), {}),
    "requests": (("requested_at", "expires_at", "executed_at"), {}),
    "compliance": (("first_seen",), {"severity": SEVERITY}),
    "findings": (("first_seen", "last_seen"), {"severity": SEVERITY}),
    "compliance_trend": (("time",), {"severity": SEVERITY}),
    "compliance_rules": ((), {"severity": SEVERITY}),
    "compliance_exceptions": (("accepted_at", "until"), {}),
    "backups": (("time",), {}),
    "run_due": ((), {}),
    "rewrap_many.counts": ((), {}),
    "rewrap_many.errors": ((), {}),
    "ka.key_status": (("created_at", "next_rotation_due"),
                      {"state": KEY_STATE, "rotation_status": ROTATION}),
    "ka.keys_by_state": ((), {"state": KEY_STATE}),
    "ka.upcoming": (("due",), {}),
    "ka.version_timeline": (("start", "end"), {"state": VERSION_STATE}),
    "ka.ops_per_period": (("period",), {}),
    "ka.version_usage": (("last_decrypt",), {"state": VERSION_STATE}),
    "ka.top_keys": (("last_used",), {}),
    "ka.unusual_activity": (("time",), {}),
    "ka.audit_page": (("time",), {}),
    "ka.compliance_matrix": ((), {"severity": SEVERITY}),
}


@pytest.fixture(scope="module")
def _frames_once(tmp_path_factory, simulation_template) -> dict[str, pd.DataFrame]:
    """Every public frame of a small home with some history (``_public_frames``), made once
    for the module in a copy of the template home (closed again before any test runs)."""
    home = tmp_path_factory.mktemp("frames") / "home"
    copy_home(simulation_template, home)
    clock = FakeClock()
    with kl.open(home, principal="alice", clock=clock) as led:
        return _public_frames(led, clock)


@pytest.fixture
def frames(_frames_once) -> dict[str, pd.DataFrame]:
    """The module's frames, copied for each test (the tests only read them)."""
    return {name: df.copy() for name, df in _frames_once.items()}


def _public_frames(ledger, clock) -> dict[str, pd.DataFrame]:
    """Every public frame of a small home with some history: keys in several states, use,
    a rotation, grants, a pending quorum request, findings and an accepted exception."""
    _populated(ledger, clock)
    ledger.create_key("sig", spec="EC_P256", purpose="sign", owner="team-a",
                      tags={"team": "a"})
    ledger.sign("sig", b"m")
    ledger.create_key("paused", spec="AES_256")
    ledger.disable("paused")
    ledger.create_key("pay", spec="AES_256")
    blob = ledger.encrypt("pay", b"y")
    ledger.rotate("pay")
    ledger.compliance()
    rule = ledger.findings()["rule_id"].iloc[0]
    ledger.accept_finding(rule, None, "mitigated elsewhere", "30d")
    clock.advance(days=100)
    rewrap = ledger.rewrap_many([blob, b"not a ciphertext"], progress=False)
    status = ka.key_status(ledger)
    findings = ledger.findings()
    return {
        "list_keys": ledger.list_keys(), "audit": ledger.audit(),
        "query": ledger.query("SELECT seq, time, key, version, error FROM audit_log"),
        "version_usage": ledger.version_usage(), "grants": ledger.grants(),
        "requests": ledger.requests(), "compliance": ledger.compliance(),
        "findings": findings, "compliance_trend": ledger.compliance_trend(),
        "compliance_rules": ledger.compliance_rules(),
        "compliance_exceptions": ledger.compliance_exceptions(), "backups": ledger.backups(),
        "run_due": ledger.run_due().to_frame(),
        "rewrap_many.counts": rewrap.counts, "rewrap_many.errors": rewrap.errors,
        "ka.key_status": status, "ka.keys_by_state": ka.keys_by_state(status),
        "ka.upcoming": ka.upcoming(status, now=clock(), days=400),
        "ka.version_timeline": ka.version_timeline(ledger),
        "ka.ops_per_period": ka.ops_per_period(ledger), "ka.version_usage": ka.version_usage(ledger),
        "ka.top_keys": ka.top_keys(ledger), "ka.unusual_activity": ka.unusual_activity(ledger),
        "ka.audit_page": ka.audit_page(ledger),
        "ka.compliance_matrix": ka.compliance_matrix(findings),
    }


def _convention_breaks(name: str, df: pd.DataFrame) -> list[str]:
    """What in ``df`` breaks the frames convention (docs/notebooks.md "DataFrames")."""
    times, categories = FRAMES[name]
    bad = [f"{c}: missing" for c in (*times, *categories) if c not in df.columns]
    for col in df.columns:
        dtype, values = df[col].dtype, df[col]
        if col in categories:
            if not (isinstance(dtype, pd.CategoricalDtype) and dtype.ordered
                    and tuple(dtype.categories[:len(categories[col])]) == categories[col]):
                bad.append(f"{col}: {dtype} is not ordered {categories[col]}")
        elif col in times or pd.api.types.is_datetime64_any_dtype(dtype):
            if str(dtype) != "datetime64[us, UTC]":
                bad.append(f"{col}: time as {dtype}")
        elif pd.api.types.is_object_dtype(dtype):
            scalars = {type(v).__name__ for v in values if not isinstance(v, list | dict)
                       and not hasattr(v, "__array__")}
            if scalars:  # object only for lists and mappings, never None/NaN/text
                bad.append(f"{col}: object column holding {sorted(scalars)}")
        elif pd.api.types.is_float_dtype(dtype):
            if col not in MEASURES:
                bad.append(f"{col}: float {dtype} outside the measures")
        elif str(dtype) not in ("string", "Int64", "boolean"):
            bad.append(f"{col}: {dtype} (text is string, whole numbers Int64, flags boolean)")
        if isinstance(dtype, pd.StringDtype) and dtype.na_value is not pd.NA:
            bad.append(f"{col}: text missing as {dtype.na_value!r}, not <NA>")
    return bad


def test_every_public_frame_follows_one_convention(frames) -> None:
    assert set(frames) == set(FRAMES)
    breaks = {name: _convention_breaks(name, df) for name, df in frames.items()}
    assert {n: b for n, b in breaks.items() if b} == {}
    # the history reached the frames that show it (an empty frame proves little)
    for name in ("list_keys", "requests", "findings", "compliance_exceptions", "ka.upcoming",
                 "rewrap_many.errors", "run_due"):
        assert len(frames[name]), name
    # so frames from different calls concatenate and compare
    both = pd.concat([frames["grants"]["granted_at"], frames["audit"]["time"]])
    assert str(both.dtype) == "datetime64[us, UTC]"
    assert frames["compliance"]["severity"].dtype == frames["findings"]["severity"].dtype
    assert isinstance(frames["findings"], FindingsFrame)
    assert isinstance(frames["compliance"], FindingsFrame)


def test_missing_values_are_na_in_text_and_number_columns(frames) -> None:
    findings = frames["findings"]
    home_wide = findings[findings["key"].isna()]
    assert len(home_wide) and all(v is pd.NA for v in home_wide["key"])
    assert all(v is pd.NA for v in home_wide["version"])
    requests = frames["requests"]
    assert requests["executed_by"].iloc[0] is pd.NA and requests["executed_at"].isna().all()
    keys = frames["list_keys"].set_index("name")
    assert keys.loc["sig", "owner"] == "team-a" and keys.loc["orders", "owner"] is pd.NA


def test_severity_and_state_sort_in_their_meaning_not_alphabetically(frames) -> None:
    findings = frames["findings"]
    ranked = findings.sort_values("severity")["severity"].astype(str).tolist()
    assert ranked == sorted(ranked, key=SEVERITY.index)
    assert len(set(ranked)) > 1  # more than one severity, so the order means something
    severe = findings[findings["severity"] <= "high"]["severity"].astype(str)
    assert set(severe) <= {"high", "critical"} and len(severe)
    keys = frames["list_keys"].sort_values("state")
    assert keys["state"].astype(str).tolist() == ["active", "active", "suspended",
                                                 "pending-deletion"]
    assert keys["name"].tolist()[-1] == "orders"
    status = frames["ka.key_status"]
    assert status["rotation_status"].min() in ("overdue", "due soon")
    matrix = frames["ka.compliance_matrix"]
    assert matrix.sort_values("severity")["severity"].astype(str).unique().tolist() == \
        list(SEVERITY)


# -- audit(limit=): the newest records, read with a LIMIT ---------------------------------------
@pytest.fixture
def busy(ledger, clock):
    """A log of a few thousand records (3,000 encryptions a second apart, and more)."""
    ledger.create_key("k", spec="AES_256")
    for _ in range(3000):
        ledger.encrypt("k", b"x")
        clock.advance(seconds=1)
    return ledger


def test_audit_default_is_an_audit_frame_of_the_newest_records(busy, monkeypatch) -> None:
    sqls: list[str] = []
    real = audit_repo._page_sql
    monkeypatch.setattr(audit_repo, "_page_sql",
                        lambda *a: sqls.append(real(*a)) or sqls[-1])
    everything = busy.audit(limit=None)
    assert len(everything) > service.AUDIT_LIMIT + 2000
    five = busy.audit(limit=5)
    assert isinstance(five, AuditFrame) and isinstance(five.tail(2), AuditFrame)
    # exactly the newest five, oldest first: .tail() shows the newest
    # (the newest record is the audit(limit=None) read just before)
    assert five["seq"].tolist() == everything["seq"].tail(4).tolist() + [five["seq"].iloc[-1]]
    assert five["action"].iloc[-1] == "audit" and five["time"].is_monotonic_increasing
    assert "LIMIT 5" in sqls[-1] and "ORDER BY time DESC, seq DESC" in sqls[-1]
    default = busy.audit()
    assert len(default) == service.AUDIT_LIMIT == 1000
    assert default["seq"].iloc[-1] == five["seq"].iloc[-1] + 1  # the limit=5 read
    assert f"LIMIT {service.AUDIT_LIMIT}" in sqls[-1]
    assert "LIMIT" not in sqls[0]  # limit=None: everything


def test_audit_pages_back_from_the_newest_with_filters(busy, clock) -> None:
    enc = busy.audit(action="encrypt", limit=None)
    assert len(enc) == 3000
    page = busy.audit(action="encrypt", limit=10, offset=10)
    assert page["seq"].tolist() == enc["seq"].iloc[-20:-10].tolist()
    newest = busy.audit(action="encrypt", limit=3, newest_first=True)
    assert newest["seq"].tolist() == enc["seq"].iloc[::-1].head(3).tolist()
    since = clock.now - timedelta(seconds=100)
    recent = busy.audit(action="encrypt", since=since, limit=None)
    assert len(recent) == 100 and (recent["time"] >= since).all()
    with pytest.raises(InvalidInput, match="limit"):
        busy.audit(limit=-1)
    assert busy.audit(action="audit", outcome="failed", limit=None)["action"].tolist() == [
        "audit"]


def test_query_frames_follow_the_convention_even_with_a_repeated_column(ledger) -> None:
    ledger.create_key("k", spec="AES_256")
    df = ledger.query("SELECT seq, seq, time, key, error FROM audit_log")
    assert [str(t) for t in df.dtypes] == ["Int64", "Int64", "datetime64[us, UTC]", "string",
                                          "string"]
    assert df["error"].isna().all() and all(v is pd.NA for v in df["error"])
