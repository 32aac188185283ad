"""The seeded demo estate (`keyledger demo`): a small one (20 keys, 3 months) seeded once per
module through the Python entry point, then checked for every fact the demo promises, through
the public API as its principals see it.

The CLI and determinism checks run `keyledger demo` / `seed_demo` in subprocesses (a process
uses one SoftHSM2 configuration at a time, and two seedings run in parallel there).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import keyledger as kl
from keyledger.demo_fleet import (
    AUDITOR,
    DAYS_PER_MONTH,
    DEMO_FILE,
    EXPECTED,
    SECURITY_LEAD,
    TEAMS,
    seed_demo,
)
from keyledger.demo_fleet.plan import Plan

SCRIPT = Path(sys.executable).with_name("keyledger")
KEYS, MONTHS, SEED = 20, 3, 11
REFUSED = {"key destroyed": kl.KeyStateError, "key pending deletion": kl.KeyStateError,
           "key suspended": kl.KeyStateError, "below min_decryption_version": kl.KeyStateError,
           "tampered": kl.InvalidCiphertext}


_TWIN = """
import json, sys
from datetime import datetime
import keyledger as kl
from keyledger.demo_fleet import seed_demo
CALLS_SQL = {calls_sql!r}
r = seed_demo(sys.argv[1], keys=int(sys.argv[2]), months=int(sys.argv[3]), seed=int(sys.argv[4]),
              end=datetime.fromisoformat(sys.argv[5]), progress=False, echo=None, workers=0)
with kl.open(sys.argv[1], principal="audit-anna") as led:
    df = led.list_keys()
    end = sys.argv[5][:19].replace("T", " ")
    calls = int(led.query(CALLS_SQL, {"end": end}).iloc[0, 0])
print(json.dumps({"keys": [list(t) for t in zip(df["name"], df["spec"], df["state"],
                                               df["latest_version"].astype(int).tolist())],
                  "calls": calls, "unexpected": r.unexpected,
                  "sample": sorted(s.expected for s in r.sample)}))
"""


# the records of the simulated days, less ledger opens (how many there are depends on how many
# processes made the usage calls); the closing half hour and later calls (these tests') are out
CALLS_SQL = ("SELECT count(*) FROM audit_log WHERE action <> 'open' "
             "AND time < CAST($end AS TIMESTAMP) - INTERVAL 30 MINUTE")
_TWIN = _TWIN.replace("{calls_sql!r}", repr(CALLS_SQL))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo, seeded in this process; meanwhile a twin (same seed, size and end) is seeded
    in a subprocess on the other core, for the determinism test: with its usage calls in the
    seeding process itself (``workers=0``), so the test also shows both modes agree."""
    tmp = tmp_path_factory.mktemp("demo")
    end = datetime.now(UTC).replace(microsecond=0)
    env = {k: v for k, v in os.environ.items() if k not in ("KEYLEDGER_HOME", "SOFTHSM2_CONF")}
    twin = subprocess.Popen([sys.executable, "-c", _TWIN, str(tmp / "twin"), str(KEYS),
                             str(MONTHS), str(SEED), end.isoformat()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        result = seed_demo(tmp / "home", keys=KEYS, months=MONTHS, seed=SEED, progress=False,
                           echo=None, end=end)
    except BaseException:
        twin.kill()
        raise
    result.before, result.twin = end, twin
    yield result
    if twin.poll() is None:
        twin.kill()


def auditor(demo):
    return kl.open(demo.home, principal=AUDITOR)


@pytest.fixture(scope="module")
def findings(demo):
    """One compliance evaluation of the seeded estate, as the auditor (each evaluation is
    stored, and costs ~0.3 s of CPU): the tests below only read its findings."""
    with auditor(demo) as led:
        return led.compliance()


def test_the_estate_spans_the_months_up_to_now_with_every_spec_and_team(demo):
    assert demo.unexpected == [] and not demo.already_seeded
    assert demo.keys == KEYS and demo.records > 10_000
    assert demo.before - timedelta(minutes=1) <= demo.generated_at <= datetime.now(UTC)
    with auditor(demo) as led:
        keys = led.list_keys()
        audit = led.audit(limit=None)
    assert set(keys["spec"]) == set(kl.SPECS)
    assert {t["team"] for t in keys["tags"] if "team" in t} == {t.name for t in TEAMS}
    assert keys["owner"].notna().sum() >= KEYS - 1  # one legacy key has no owner
    assert any(t.get("data") in ("pci", "pii", "phi") for t in keys["tags"])
    # the history: from about `months` ago to the last hour, with activity in the last 24 h
    assert audit["time"].max() >= demo.before - timedelta(hours=1)
    assert audit["time"].min() <= demo.before - timedelta(days=80)
    recent = audit[audit["time"] >= demo.before - timedelta(hours=24)]
    assert recent["action"].isin(["encrypt", "decrypt", "mac", "sign", "verify"]).sum() > 50
    # traffic from several principals, busier on weekdays than at weekends
    use = audit[audit["action"].isin(["encrypt", "decrypt", "mac", "verify_mac", "sign", "verify",
                                      "generate_data_key"])]
    assert use["principal"].nunique() >= 8
    per_day = use.groupby(use["time"].dt.floor("D")).size()
    weekend = per_day[per_day.index.day_of_week >= 5].mean()
    weekday = per_day[per_day.index.day_of_week < 5].mean()
    assert weekday > 1.8 * weekend


def test_the_ledger_verifies_and_records_denials_and_failed_decrypts(demo):
    with auditor(demo) as led:
        report = led.verify_audit()
        assert report.ok, report
        assert report.records >= demo.records
        denied = led.audit(outcome="denied", limit=None)
        failed = led.audit(action="decrypt", outcome="failed", limit=None)
    assert len(denied) >= 100 and set(denied["error"]) == {"AccessDenied"}
    assert len(failed) >= 3 and set(failed["error"]) == {"InvalidCiphertext"}


def test_rotation_on_and_off_schedule_and_overdue_keys(demo, findings):
    with auditor(demo) as led:
        keys = led.list_keys().set_index("name")
        rotations = led.audit(action="rotate", outcome="ok", limit=None)
    active = keys[keys["state"] == "active"]
    overdue = set(active[active["next_rotation_due"] <= demo.generated_at].index)
    assert overdue and overdue == set(demo.overdue)
    assert overdue <= set(findings[findings["rule_id"] == "nist.rotation-overdue"]["key"])
    by = set(rotations["principal"])
    assert "ops-omar" in by  # run_due, weekly
    assert by - {"ops-omar"}  # rotated by hand by team admins
    assert (keys["latest_version"] > 1).sum() >= 5


def test_compromised_keys_findings_and_the_replaced_one(demo, findings):
    h = demo.highlights
    with auditor(demo) as led:
        keys = led.list_keys().set_index("name")
    assert keys.loc[h["compromised"], "state"] == "compromised"
    mine = findings[findings["key"] == h["compromised"]]
    assert "nist.compromised-not-replaced" in set(mine["rule_id"])
    replaced = keys.loc[h["compromised_and_replaced"]]
    assert replaced["state"] == "active" and replaced["latest_version"] >= 2
    assert replaced["min_decryption_version"] >= 2  # the old version's data was rewrapped


def test_deletions_requests_grants_backups_and_usage_limit(demo, findings):
    h = demo.highlights
    with auditor(demo) as led:
        keys = led.list_keys().set_index("name")
        pending = led.requests(status="pending")
        grants = led.grants()
        backups = led.backups()
        near = led.get_key(h["near_usage_limit"])
        usage = led.version_usage(h["near_usage_limit"])
        trend = led.compliance_trend()
    states = set(keys["state"])
    assert {"active", "compromised", "pending-deletion", "destroyed", "suspended",
            "pre-activation"} <= states
    assert set(h["pending_deletion"]) <= set(keys[keys["state"] == "pending-deletion"].index)
    # an approval under way: a destroy request with fewer approvals than its quorum
    row = pending[pending["request_id"] == h["pending_request"]].iloc[0]
    assert row["action"] == "destroy" and row["quorum"] == 2 and len(row["approvers"]) == 1
    # one principal both administers and uses a key; compliance flags it
    roles = grants.groupby(["key", "principal"])["role"].agg(set)
    both = [kp for kp, r in roles.items() if {"admin", "user"} <= set(r) and kp[0] != "*"]
    sod = h["separation_of_duties"]
    assert both == [(sod["key"], sod["principal"])]
    sod_rows = findings[findings["rule_id"] == "soc2.separation-of-duties"]
    assert (sod["key"], sod["principal"]) in set(zip(sod_rows["key"], sod_rows["principal"],
                                                     strict=True))
    # a backup and a passing restore test, recorded
    assert {("backup", True), ("restore_test", True)} <= set(zip(backups["kind"], backups["ok"],
                                                                  strict=True))
    # the usage-limited key: its current version is close to, not at, its limit
    limit = near.policy["usage_limit"]
    used = int(usage.loc[usage["version"] == near.latest_version, "encryptions"].iloc[0])
    assert 0.8 * limit <= used < limit
    # compliance evaluated by run_due across the history (the trend has points over the months)
    times = trend["time"].drop_duplicates()
    assert len(times) >= 10 and times.max() - times.min() >= timedelta(days=70)


def test_every_sampled_ciphertext_decrypts_or_is_refused_by_design(demo):
    assert 10 <= len(demo.sample) <= 500
    assert {s.expected for s in demo.sample} >= {"decrypts", "tampered", "key destroyed",
                                                 "key pending deletion",
                                                 "below min_decryption_version"}
    assert {s.expected for s in demo.sample} <= set(EXPECTED)
    by_who = defaultdict(list)
    for s in demo.sample:
        by_who[s.principal].append(s)
    # the auditor's ledger stays open meanwhile: the principals' opens share its runtime (one
    # HSM login, one start of the store) instead of starting and stopping one each
    with auditor(demo):
        for who, samples in by_who.items():
            with kl.open(demo.home, principal=who) as led:
                for s in samples:
                    if s.expected == "decrypts":
                        assert led.decrypt(s.ciphertext, context=s.context), s.key
                    else:
                        with pytest.raises(REFUSED[s.expected]):
                            led.decrypt(s.ciphertext, context=s.context)


def test_the_demo_home_is_a_simulation_home(demo):
    """Seeded with a simulated clock: the home is a simulation home and says so."""
    with auditor(demo) as led:
        assert led.simulation
        assert "SIMULATION" in led.list_keys().attrs["note"]
        first_open = led.audit(action="open", limit=None)["detail"].iloc[0]
    assert "simulation home" in first_open


def test_demo_json_names_the_principals_and_the_cli_does_not_reseed(demo):
    doc = json.loads((demo.home / DEMO_FILE).read_text())
    assert doc["status"] == "complete"
    assert (doc["seed"], doc["keys"], doc["months"]) == (SEED, KEYS, MONTHS)
    assert datetime.fromisoformat(doc["generated_at"]) == demo.generated_at
    names = {p["name"]: p["roles"] for p in doc["principals"]}
    assert names[SECURITY_LEAD] == ["admin on *"] and names[AUDITOR] == ["auditor on *"]
    assert "svc-payments" in names and all(n in names for n in ("ops-omar", "paula-payments"))
    db = demo.home / "keyledger.duckdb"
    stamp = db.stat().st_mtime_ns, (demo.home / DEMO_FILE).stat().st_mtime_ns
    env = {k: v for k, v in os.environ.items() if k != "KEYLEDGER_HOME"}
    out = subprocess.run([str(SCRIPT), "demo", "--home", str(demo.home), "--no-progress"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "already seeded" in out.stdout and "audit-anna" in out.stdout
    assert (db.stat().st_mtime_ns, (demo.home / DEMO_FILE).stat().st_mtime_ns) == stamp


def test_only_new_or_demo_homes_are_seeded(tmp_path, clock):
    other = tmp_path / "real-home"
    with kl.open(other, principal="alice", clock=clock) as led:
        led.create_key("precious", spec="AES_256")
    for force in (False, True):
        with pytest.raises(kl.ConfigError, match="not a demo home"):
            seed_demo(other, keys=KEYS, months=MONTHS, force=force, echo=None)
    assert (other / "keyledger.duckdb").exists()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / DEMO_FILE).write_text('{"status": "seeding"}')
    with pytest.raises(kl.ConfigError, match="--force"):
        seed_demo(unfinished, echo=None)
    for bad in ({"keys": 5}, {"months": 0}, {"keys": "20"}, {"seed": 1.5}, {"workers": -1},
                {"workers": True}):
        with pytest.raises(kl.InvalidInput):
            seed_demo(tmp_path / "x", **{"echo": None, **bad})
    assert not (tmp_path / "x").exists()


def test_cli_usage_errors_exit_2():
    from keyledger.cli import main

    assert main(["demo", "--keys", "5"]) == 2
    assert main(["demo", "--months", "many"]) == 2


def test_same_seed_same_estate(demo):
    stdout, stderr = demo.twin.communicate(timeout=600)
    assert demo.twin.returncode == 0, stderr
    twin = json.loads(stdout)
    with auditor(demo) as led:
        df = led.list_keys()
    mine = [list(t) for t in zip(df["name"], df["spec"], df["state"],
                                 df["latest_version"].astype(int).tolist(), strict=True)]
    assert twin["keys"] == mine
    with auditor(demo) as led:
        end = demo.before.strftime("%Y-%m-%d %H:%M:%S")
        assert twin["calls"] == int(led.query(CALLS_SQL, {"end": end}).iloc[0, 0])
    assert twin["calls"] > 10_000
    assert twin["sample"] == sorted(s.expected for s in demo.sample)
    assert twin["unexpected"] == []
    # another seed gives another estate (the plan is pure: compared without seeding)
    days = round(MONTHS * DAYS_PER_MONTH)
    names = [sorted(k.name for k in Plan(KEYS, days, random.Random(s)).keys)
             for s in (SEED, SEED + 1)]
    assert names[0] == sorted(df["name"]) and names[1] != names[0]
