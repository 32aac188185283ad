"""Trusted time: a caller's clock cannot shorten (or stretch) a waiting period.

A home is created real or as a simulation. In a real home every time keyledger records or
compares (deletion windows, request expiry, import tokens, ...) is the system clock's, and
``kl.open(home, clock=...)`` is refused. A home created with ``kl.open(new_home, clock=...)`` is
a simulation home: the clock is accepted, and the store, list_keys, the dashboard and the
compliance report say so. The mode is kept in the store and in the HSM, so flipping the store's
copy is caught on open.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from conftest import FakeClock, hsm_objects

import keyledger as kl

SIMULATION_LABEL = "SIMULATION \u2014 simulated clock"  # what a person sees
MODE_LABEL_PREFIX = "keyledger-home-mode:"  # the HSM data object keeping the home's mode

needs_pkcs11_tool = pytest.mark.skipif(shutil.which("pkcs11-tool") is None,
                                       reason="needs pkcs11-tool (opensc)")


def in_days(days: float):
    """A caller's clock ``days`` ahead of (or, negative, behind) the system clock."""
    return lambda: datetime.now(UTC) + timedelta(days=days)


def store_value(home: Path, sql: str, params: list | None = None) -> object:
    """Read the home's DuckDB file directly (every ledger of the home must be closed)."""
    con = duckdb.connect(str(home / "keyledger.duckdb"), read_only=True)
    try:
        row = con.execute(sql, params or []).fetchone()
    finally:
        con.close()
    return row[0] if row else None


def write_store(home: Path, sql: str) -> None:
    """What someone with write access to the home's files (but no PIN) can do."""
    con = duckdb.connect(str(home / "keyledger.duckdb"))
    try:
        con.execute(sql)
    finally:
        con.close()


# -- a real home ------------------------------------------------------------------------------------
def test_real_home_refuses_an_injected_clock_and_audits_the_try(home: Path) -> None:
    with kl.open(home, principal="solo") as led:
        assert led.simulation is False
        with pytest.raises(kl.ConfigError, match="simulation home") as err:
            kl.open(home, principal="solo", clock=in_days(31))  # while another one is open
        assert "kl.open(new_home, clock=...)" in str(err.value)
        assert "SIMULATION" not in led.list_keys().attrs.get("note", "")
    with pytest.raises(kl.ConfigError, match="real clock"):
        kl.open(home, principal="mallory", clock=in_days(-3))  # first opener of the process
    with kl.open(home, principal="solo") as led:
        opens = led.audit(action="open")
    assert list(opens["outcome"]) == ["ok", "failed", "failed", "ok"]
    assert list(opens["error"].iloc[1:3]) == ["ConfigError", "ConfigError"]
    assert "real home" in opens["detail"].iloc[0]
    assert opens["principal"].iloc[2] == "mallory"
    # the refused opens were recorded at trusted time, not at the offered clock's
    assert (opens["time"] - pd.Timestamp.now(tz="UTC")).abs().max() < pd.Timedelta(hours=1)
    assert store_value(home, "SELECT value FROM meta WHERE name = 'home_mode'") == "real"


def test_destroy_right_after_schedule_deletion_is_refused_in_a_real_home(home: Path) -> None:
    """The issue's case: a clock 31 days ahead used to destroy a key right away."""
    with kl.open(home, principal="solo") as led:
        led.create_key("z", spec="AES_256")
        led.schedule_deletion("z", 30)
    with pytest.raises(kl.ConfigError):
        kl.open(home, principal="solo", clock=in_days(31))
    with kl.open(home, principal="solo") as led:
        with pytest.raises(kl.PolicyViolation, match="waiting period"):
            led.destroy("z")
        assert led.get_key("z").state.value == "pending-deletion"
        assert led.verify_audit().ok


def test_request_expiry_is_judged_on_trusted_time(home: Path) -> None:
    """A request filed 73 h ago (on the system clock) has expired: an approver cannot bring
    it back to life with a clock set back."""
    with kl.open(home, principal="alice") as alice:
        alice.grant("*", "bea", "admin")
        alice.set_policy("*", quorum=2)
        alice.create_key("k", spec="AES_256")
        rid = alice.request("set_policy", "k", "batch job", rotation_period="180d")
    write_store(home, "UPDATE requests SET requested_at = requested_at - INTERVAL 73 HOUR, "
                      "expires_at = expires_at - INTERVAL 73 HOUR")  # as if 73 h had passed
    with pytest.raises(kl.ConfigError):
        kl.open(home, principal="bea", clock=in_days(-73 / 24))
    with kl.open(home, principal="bea") as bea:
        with pytest.raises(kl.PolicyViolation, match="expired"):
            bea.approve(rid)
        assert bea.get_key("k").rotation_period == timedelta(days=90)
        assert bea.requests()["status"].tolist() == ["expired"]


# -- a simulation home ------------------------------------------------------------------------------
def test_simulation_home_simulates_and_says_so(ledger, clock: FakeClock, home: Path,
                                               tmp_path: Path) -> None:
    assert ledger.simulation is True
    ledger.create_key("z", spec="AES_256")
    ledger.schedule_deletion("z", 7)
    clock.advance(days=8)
    assert ledger.destroy("z").state.value == "destroyed"
    assert ledger.list_keys().attrs["note"] == SIMULATION_LABEL
    assert "simulation home" in ledger.audit(action="open")["detail"].iloc[0]
    for fmt in ("html", "md"):
        text = ledger.compliance_report(tmp_path / f"report.{fmt}", fmt).read_text()
        head = text.split("About this report")[0]
        assert SIMULATION_LABEL in head, fmt
    with kl.open(home, principal="bob") as bob:  # no clock: the real one, still a simulation
        assert bob.simulation is True
        assert abs(bob.now() - datetime.now(UTC)) < timedelta(hours=1)
    with kl.open(home, principal="carol", clock=FakeClock(clock.now + timedelta(days=1))) as c:
        assert c.now() == clock.now + timedelta(days=1)  # each ledger keeps its own clock
    assert ledger.now() == clock.now
    ledger.close()
    assert store_value(home, "SELECT value FROM meta WHERE name = 'home_mode'") == "simulation"


def test_real_home_report_and_list_carry_no_simulation_label(home: Path, tmp_path: Path) -> None:
    with kl.open(home, principal="solo") as led:
        led.create_key("k", spec="AES_256")
        assert "note" not in led.list_keys().attrs
        text = led.compliance_report(tmp_path / "report.md", "md").read_text()
    assert "SIMULATION" not in text


def test_dashboard_labels_a_simulation_home(ledger, home: Path, tmp_path: Path) -> None:
    from keyledger.dashboard.app import TITLE, build_app

    template = build_app(ledger=ledger)
    assert SIMULATION_LABEL in template.title
    assert template.dashboard.banner.visible
    assert any(SIMULATION_LABEL in str(getattr(o, "object", "")) for o in template.header)
    real_home = tmp_path / "real"
    ledger.close()  # one embedded home per process at a time
    with kl.open(real_home, principal="solo") as led:
        template = build_app(ledger=led)
        assert template.title == TITLE and not template.dashboard.banner.visible
        assert not any(SIMULATION_LABEL in str(getattr(o, "object", ""))
                       for o in template.header)


@needs_pkcs11_tool
def test_the_mode_is_kept_in_the_hsm_too(ledger, home: Path) -> None:
    home_id = ledger._rt.home_id
    ledger.close()
    labels = [o.get("label", "") for o in hsm_objects(home) if o["type"].startswith("Data")]
    assert MODE_LABEL_PREFIX + home_id in labels


def test_flipping_the_mode_in_the_store_is_detected_on_open(home: Path) -> None:
    with kl.open(home, principal="solo"):
        pass
    write_store(home, "UPDATE meta SET value = 'simulation' WHERE name = 'home_mode'")
    with pytest.raises(kl.ConfigError, match="HSM"):
        kl.open(home, principal="solo", clock=in_days(31))
    with pytest.raises(kl.ConfigError, match="HSM"):
        kl.open(home, principal="solo")
    # the store's copy removed: the HSM's copy is written back, still a real home
    write_store(home, "DELETE FROM meta WHERE name = 'home_mode'")
    with kl.open(home, principal="solo") as led:
        assert led.simulation is False
    with pytest.raises(kl.ConfigError, match="real clock"):
        kl.open(home, principal="solo", clock=in_days(31))
    assert store_value(home, "SELECT value FROM meta WHERE name = 'home_mode'") == "real"


def test_checkpoints_use_trusted_time_not_the_first_openers_clock(ledger, clock: FakeClock
                                                                  ) -> None:
    ledger.create_key("k", spec="AES_256")
    ledger.flush_audit()
    newest = ledger.query("SELECT max(time) AS t FROM checkpoints")["t"].iloc[0]
    assert abs(newest - pd.Timestamp.now(tz="UTC")) < pd.Timedelta(hours=1)
    assert ledger.audit(action="create_key")["time"].iloc[0] == pd.Timestamp(clock.now)


def test_trusted_time_never_goes_back_within_a_process(home: Path, monkeypatch) -> None:
    """A stepped-back system clock does not make this process's audit times go backwards."""
    import time

    with kl.open(home, principal="solo") as led:
        first = led.now()
        system_ns = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: system_ns() - 2 * 3600 * 10**9)
        assert led.now() == first
        led.create_key("k", spec="AES_256")
        times = led.audit()["time"]
        assert times.is_monotonic_increasing
