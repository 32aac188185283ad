"""Must show: two simulated years of due work (issue 5 item 2), on a real SoftHSM2 token.

An injected clock advanced weekly, ``run_due`` at every step: keys rotate on schedule, a key
reaching its usage limit rotates at the next ``run_due``, a deletion window ends in destruction, a
key with ``auto_rotate=False`` is deactivated after its originator-usage period, and every
ciphertext made along the way still decrypts unless its version was deliberately trimmed (or its
key deliberately destroyed). (Split from tests/test_rotation.py so that the two long parts run on
different test workers; its helpers are shared from there.)

The simulation keeps the store open (``keep_store_open``, as a bulk script does) and evaluates
compliance with the due work every ``COMPLIANCE_WEEKS`` weeks only (``run_due(compliance=False)``
otherwise, as a job that runs more often than the findings need refreshing): neither changes what
is due, and together they were most of the module's time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from conftest import FakeClock
from test_rotation import PKCS11_TOOL, done, header_of, key_labels, needs_pkcs11_tool

import keyledger as kl

# == 2. two simulated years ==========================================================================
SIM_WEEKS = 106  # 742 days: just past two years, so a 365-day key rotates twice
USAGE_LIMIT = 50
LIMIT_WEEK = 3  # LIMIT - 1 encryptions in this week, the last one a week later
DELETE_WEEK = 20
TRIM_WEEK = 53
COMPLIANCE_WEEKS = 13  # quarterly: run_due also evaluates compliance in these weeks


def rotation_days(period_days: int, *, first_rotation: int = 0, weeks: int = SIM_WEEKS) -> list[int]:
    """Days at which a weekly run_due rotates a key last rotated on ``first_rotation``."""
    out, last = [], first_rotation
    for week in range(1, weeks + 1):
        day = 7 * week
        if day > first_rotation and day - last >= period_days:
            out.append(day)
            last = day
    return out


@dataclass
class Sim:
    home: Path
    end: datetime
    reports: dict[int, object] = field(default_factory=dict)  # day -> DueReport
    cts: list[tuple[str, int, int, bytes, dict, bytes]] = field(default_factory=list)
    sigs: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    refused_encrypt: dict[str, list[int]] = field(default_factory=dict)
    versions_at: dict[int, dict[str, int]] = field(default_factory=dict)
    enc_latest_at_trim: int = 0
    doomed_versions: int = 0
    labels_before_delete: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def two_years(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    """Two years of weekly due work on one home; closed again before the tests look at it."""
    home = tmp_path_factory.mktemp("two-years") / "home"
    clock = FakeClock()
    sim = Sim(home, clock())
    with kl.open(home, principal="alice", clock=clock) as led, led.keep_store_open():
        led.create_key("enc", spec="AES_256")  # 90 d default
        led.create_key("sig", spec="EC_P256")  # 365 d default
        led.create_key("lim", spec="AES_256")
        led.set_policy("lim", usage_limit=USAGE_LIMIT)
        led.create_key("manual", spec="AES_256")
        led.set_policy("manual", auto_rotate=False)
        led.create_key("doomed", spec="AES_256")
        sim.reports[0] = led.run_due()

        def encrypt(name: str, day: int, n: int) -> None:
            for i in range(n):
                plaintext = f"{name} day {day} #{i}".encode()
                ctx = {"day": str(day), "key": name}
                try:
                    blob = led.encrypt(name, plaintext, context=ctx)
                except kl.KeyStateError:
                    sim.refused_encrypt.setdefault(name, []).append(day)
                    continue
                sim.cts.append((name, header_of(blob)[1], day, plaintext, ctx, blob))

        for week in range(1, SIM_WEEKS + 1):
            clock.advance(days=7)
            day = 7 * week
            encrypt("enc", day, 1)
            encrypt("manual", day, 1)
            if week < DELETE_WEEK:
                encrypt("doomed", day, 1)
            if week == LIMIT_WEEK:
                encrypt("lim", day, USAGE_LIMIT - 1)
            elif week >= LIMIT_WEEK + 1:
                encrypt("lim", day, 1)  # the first of these is the USAGE_LIMIT-th on v1
            message = f"statement day {day}".encode()
            sim.sigs.append((day, message, led.sign("sig", message)))
            if week == DELETE_WEEK:
                sim.doomed_versions = led.get_key("doomed").latest_version
                sim.labels_before_delete = key_labels(home, "doomed") if PKCS11_TOOL else set()
                led.schedule_deletion("doomed", 7)
            if week == TRIM_WEEK:
                sim.enc_latest_at_trim = led.get_key("enc").latest_version
                led.trim("enc", 3)
            sim.reports[day] = led.run_due(compliance=week % COMPLIANCE_WEEKS == 0)
            sim.versions_at[day] = {k.name: k.latest_version for k in
                                    (led.get_key(n) for n in ("enc", "sig", "lim", "manual"))}
        sim.end = clock()
    return sim


def reports_for(sim: Sim, name: str, action: str) -> list[int]:
    return [day for day, r in sorted(sim.reports.items()) if (action, name) in done(r)]


@pytest.mark.slow
def test_two_years_keys_rotate_on_schedule(two_years: Sim) -> None:
    sim = two_years
    assert done(sim.reports[0]) == [] and sim.reports[0].skipped == []
    enc_days, sig_days = rotation_days(90), rotation_days(365)
    assert len(enc_days) + 1 == 9 and len(sig_days) + 1 == 3  # the "~9" and "~3"
    assert reports_for(sim, "enc", "rotate") == enc_days
    assert reports_for(sim, "sig", "rotate") == sig_days
    last = sim.versions_at[7 * SIM_WEEKS]
    assert last["enc"] == 9 and last["sig"] == 3
    for day in enc_days:
        entry = next(d for d in sim.reports[day].done if d["key"] == "enc")
        assert "rotation period of 90 days" in entry["reason"] and "default" in entry["reason"]
    # Nothing ran twice and nothing was skipped along the way.
    for name in ("enc", "sig", "lim"):
        assert len(reports_for(sim, name, "rotate")) == last[name] - 1
    assert all(r.skipped == [] for r in sim.reports.values())
    with kl.open(sim.home, principal="alice", clock=FakeClock(sim.end)) as led:
        df = led.list_keys().set_index("name")
        assert df.loc["enc", "latest_version"] == 9 and df.loc["sig", "latest_version"] == 3
        assert df.loc["enc", "rotated_at"] == pd.Timestamp(
            FakeClock().now + timedelta(days=enc_days[-1]))


@pytest.mark.slow
def test_two_years_usage_limit_rotates_at_the_next_run_due(two_years: Sim) -> None:
    sim = two_years
    limit_day = 7 * LIMIT_WEEK
    assert ("rotate", "lim") not in done(sim.reports[limit_day])  # LIMIT - 1 encryptions
    assert sim.versions_at[limit_day]["lim"] == 1
    hit = limit_day + 7
    entry = next(d for d in sim.reports[hit].done if d["key"] == "lim")
    assert entry["action"] == "rotate"
    assert "usage limit" in entry["reason"] and f"{USAGE_LIMIT} of {USAGE_LIMIT}" in entry["reason"]
    assert sim.versions_at[hit]["lim"] == 2
    # Afterwards the new version counts from zero and the key rotates by time again.
    assert reports_for(sim, "lim", "rotate") == [hit, *rotation_days(90, first_rotation=hit)]
    on_v1 = [c for c in sim.cts if c[0] == "lim" and c[1] == 1]
    assert len(on_v1) == USAGE_LIMIT


@needs_pkcs11_tool
@pytest.mark.slow
def test_two_years_deletion_window_ends_in_destruction(two_years: Sim) -> None:
    sim = two_years
    scheduled = 7 * DELETE_WEEK
    assert sim.doomed_versions == 1 + len(rotation_days(90, weeks=DELETE_WEEK - 1)) == 2
    assert sim.labels_before_delete == {"kl:doomed:v1", "kl:doomed:v2"}
    assert reports_for(sim, "doomed", "destroy") == [scheduled + 7]
    entry = next(d for d in sim.reports[scheduled + 7].done if d["key"] == "doomed")
    assert "deletion window ended" in entry["reason"]
    assert key_labels(sim.home, "doomed") == set()
    with kl.open(sim.home, principal="alice", clock=FakeClock(sim.end)) as led:
        assert led.get_key("doomed").state is kl.KeyState.DESTROYED


@pytest.mark.slow
def test_two_years_key_without_auto_rotate_is_deactivated_after_its_usage_period(
        two_years: Sim) -> None:
    sim = two_years
    first_due = min(d for d in sim.reports if d >= 730)  # 730 d originator-usage period
    assert reports_for(sim, "manual", "deactivate") == [first_due]
    assert reports_for(sim, "manual", "rotate") == []
    entry = next(d for d in sim.reports[first_due].done if d["key"] == "manual")
    assert "730 days" in entry["reason"]
    assert sim.versions_at[7 * SIM_WEEKS]["manual"] == 1
    # It encrypted every week up to then and was refused from the next week on.
    assert sim.refused_encrypt.get("manual") == [d for d in range(7, 7 * SIM_WEEKS + 1, 7)
                                                 if d > first_due]
    made = [c for c in sim.cts if c[0] == "manual"]
    assert [c[2] for c in made] == [d for d in range(7, first_due + 1, 7)]
    with kl.open(sim.home, principal="alice", clock=FakeClock(sim.end)) as led:
        assert led.get_key("manual").state is kl.KeyState.DEACTIVATED
        with pytest.raises(kl.KeyStateError, match="deactivated"):
            led.encrypt("manual", b"new data")
        for _, _, _, plaintext, ctx, blob in made:
            assert led.decrypt(blob, context=ctx) == plaintext


@pytest.mark.slow
def test_two_years_every_ciphertext_still_decrypts_unless_deliberately_trimmed(
        two_years: Sim) -> None:
    sim = two_years
    assert sim.enc_latest_at_trim >= 3
    with kl.open(sim.home, principal="alice", clock=FakeClock(sim.end)) as led:
        ok = refused = 0
        for name, version, day, plaintext, ctx, blob in sim.cts:
            deliberate = (name == "enc" and version < 3) or name == "doomed"
            if deliberate:
                with pytest.raises(kl.KeyStateError):
                    led.decrypt(blob, context=ctx)
                refused += 1
            else:
                assert led.decrypt(blob, context=ctx) == plaintext, (name, version, day)
                ok += 1
        for day, message, signature in sim.sigs:
            assert led.verify("sig", message, signature), day
        versions = {v for n, v, *_ in sim.cts if n == "enc"}
        assert versions == set(range(1, 10))  # something was made under every enc version
    assert refused == sum(1 for c in sim.cts if c[0] == "doomed") + sum(
        1 for c in sim.cts if c[0] == "enc" and c[1] < 3)
    assert ok > 300
