"""Dashboard data benchmark: the analytics behind every page over 1,000 keys and 2M records.

Builds (or reuses, with ``--home``) a real home through the public API: ``--keys`` AES keys
owned by 8 teams and ``--records`` audited calls (encrypt/decrypt by three principals over
``--days`` simulated days, so every record is a real, chained, checkpointed audit record).
Then it times, on that home:

- the full data set of a first render (every page's analytics, as the dashboard loads them),
- a filter change (the same with an owner filter),
- the served app's first render (``build_app`` + Bokeh model, server side), when the
  dashboard package is importable,

and prints each against the raw baseline measured in the same run: the same main
aggregations run by bare DuckDB on the same file (no authorisation, no audit record, no
ingest check).

Usage: ``.venv/bin/python bench/dashboard.py [--keys 1000] [--records 2000000]
[--home PATH] [--repeat 3] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

import keyledger as kl
from keyledger import analytics as an

TARGET_FIRST_S, TARGET_FILTER_S = 3.0, 1.0  # issue 9, 2-core machine
TEAMS = ("payments", "identity", "data", "platform", "mobile", "billing", "hr", "search")


class SimClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(home: Path, keys: int, records: int, days: int) -> None:
    start = datetime.now(UTC) - timedelta(days=days)
    clock = SimClock(start)
    with kl.open(home, principal="security-lead", clock=clock) as admin:
        admin.grant("*", "audit-anna", "auditor")
        names = [f"{TEAMS[i % len(TEAMS)]}-key-{i:04d}" for i in range(keys)]
        for i, name in enumerate(names):
            admin.create_key(name, spec="AES_256", owner=TEAMS[i % len(TEAMS)],
                             tags={"team": TEAMS[i % len(TEAMS)], "env": "prod"})
            admin.grant(name, "svc-app", "user")
        svc = kl.open(home, principal="svc-app", clock=clock)
        per_day = max(1, records // days)
        step = timedelta(days=1) / per_day
        done, blob = 0, None
        t0 = time.perf_counter()
        while done < records:
            name = names[(done * 7919) % len(names)]
            if done % 3 == 2 and blob is not None:
                svc.decrypt(blob)
            else:
                blob = svc.encrypt(name, b"x" * 32)
            clock.now += step
            done += 1
            if done % 200_000 == 0:
                log(f"  {done:,} records ({done / (time.perf_counter() - t0):,.0f}/s)")
            if done % (per_day * 30) == 0:
                admin.rotate(names[(done // per_day) % len(names)])
        svc.close()
        admin.flush_audit()
        admin.compliance()
        admin.verify_audit()


def page_data(led: kl.KeyLedger, flt: an.Filters) -> None:
    """What the five pages load on a first render."""
    status = an.key_status(led, flt)
    an.keys_by_state(status)
    an.upcoming(status, now=led.now())
    an.activity_24h(led, flt)
    an.last_verification(led)
    an.compliance_matrix(led.findings())
    led.compliance_trend()
    an.version_timeline(led, flt)
    an.ops_per_period(led, flt, by="action")
    an.version_usage(led, flt)
    an.top_keys(led, flt)
    an.unusual_activity(led, flt)
    an.audit_count(led, flt)
    an.audit_page(led, flt)


BASELINE = (
    "SELECT date_trunc('week', time), action, count(*) FROM audit_log GROUP BY ALL",
    "SELECT key_id, version, count(*) FILTER (action = 'decrypt') FROM audit_log GROUP BY ALL",
    "SELECT key, count(*) FROM audit_log GROUP BY key ORDER BY 2 DESC LIMIT 10",
    "SELECT count(*) FROM audit_log",
    "SELECT * FROM audit_log ORDER BY time DESC, seq DESC LIMIT 50",
)


def baseline(db: Path) -> None:
    con = duckdb.connect(str(db), config={"threads": 2})
    for sql in BASELINE:
        con.execute(sql).fetchall()
    con.close()


def timed(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def app_first_render(home: Path) -> float | None:
    try:
        from keyledger.dashboard.app import build_app
    except ImportError:
        return None
    from bokeh.document import Document

    t0 = time.perf_counter()
    app = build_app(home, principal="security-lead")
    app.server_doc(Document())  # what `panel serve` does for a new session
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=540)
    parser.add_argument("--home", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="kl-bench-")) / "home"
    if not (home / "keyledger.toml").exists():
        log(f"building {home}: {args.keys} keys, {args.records:,} audited calls ...")
        t0 = time.perf_counter()
        build(home, args.keys, args.records, args.days)
        log(f"built in {time.perf_counter() - t0:.0f} s")
    with kl.open(home, principal="audit-anna") as led:
        records = int(led.query("SELECT count(*) FROM audit_log").iloc[0, 0])
        nkeys = int(led.query("SELECT count(*) FROM keys").iloc[0, 0])
        base = timed(lambda: baseline(home / "keyledger.duckdb"), args.repeat)
        first = timed(lambda: page_data(led, an.EVERYTHING), args.repeat)
        flt = an.Filters(owners=("payments",))
        change = timed(lambda: page_data(led, flt), args.repeat)
    render = app_first_render(home)
    result = {"keys": nkeys, "records": records, "baseline_raw_duckdb_s": round(base, 3),
              "all_pages_data_s": round(first, 3), "filter_change_data_s": round(change, 3),
              "ratio_vs_raw": round(first / base, 2),
              "app_first_render_s": None if render is None else round(render, 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"home: {home}  keys: {nkeys:,}  audit records: {records:,}")
        print(f"raw DuckDB, 5 main aggregations:   {base:6.3f} s")
        print(f"analytics, every page (first load): {first:6.3f} s  = {first / base:.1f}x raw "
              f"(target {TARGET_FIRST_S} s for the whole render)")
        print(f"analytics, owner filter change:     {change:6.3f} s  (target {TARGET_FILTER_S} s)")
        if render is not None:
            print(f"app build + Bokeh model:           {render:6.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
