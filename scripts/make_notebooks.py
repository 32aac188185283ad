#!/usr/bin/env python3
"""Generate the four tour notebooks in notebooks/ from the cell sources below.

This script is the source of the notebooks: edit the cells here, then regenerate. The notebooks
are written without outputs (``execution_count`` None, ``outputs`` []), with stable cell ids, so
a regenerated notebook differs from the committed one only where a cell changed:

    python scripts/make_notebooks.py           # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check   # exit 1 if a notebook differs from what we'd write

Notebooks 01-03 run top to bottom on a fresh home: ``$KEYLEDGER_HOME`` when it names a folder
that does not hold a home yet (the tests set it to a temporary folder), else a new temporary
folder. Notebook 04 opens the demo estate (``$KEYLEDGER_HOME`` or the nearest ``demo-home``
folder holding ``demo.json``; ``make notebook`` seeds it). tests/test_notebooks.py executes
them on a real kernel, tests/test_jupyterlab_browser.py in JupyterLab in Chromium.

Cells carry tags (``metadata.tags``) that the tests use to find the outputs they check; keep a
tag when you rewrite its cell.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "notebooks"

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3",
                 "codemirror_mode": {"name": "ipython", "version": 3},
                 "file_extension": ".py", "mimetype": "text/x-python",
                 "nbconvert_exporter": "python"}


def _clean(*parts: str) -> str:
    """Dedent each part on its own; parts are top-level blocks, two blank lines apart (PEP 8)."""
    return "\n\n\n".join(textwrap.dedent(p).strip("\n") for p in parts)


def md(text: str) -> tuple[str, str, tuple[str, ...]]:
    return ("markdown", _clean(text), ())


def code(*parts: str, tags: tuple[str, ...] = ()) -> tuple[str, str, tuple[str, ...]]:
    return ("code", _clean(*parts), tags)


# The same few lines open every notebook: a fresh home, never someone's real keys.
FRESH_HOME = '''
def fresh_home(tour: str) -> Path:
    """$KEYLEDGER_HOME if it names a folder without a home yet, else a new temporary folder."""
    env = os.environ.get("KEYLEDGER_HOME")
    if env and not (Path(env).is_dir() and any(Path(env).iterdir())):
        return Path(env)
    if env:
        print(f"KEYLEDGER_HOME={env} already holds a home: this tour uses a fresh one instead.")
    return Path(tempfile.mkdtemp(prefix=f"keyledger-{tour}-")) / "home"
'''

SIM_CLOCK = '''
class SimClock:
    """A clock moved by hand. keyledger takes every time it records or compares from the clock
    passed to kl.open(clock=...), so months of history take seconds."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now += timedelta(**kwargs)
        return self.now
'''

# ------------------------------------------------------------------------------------------------
QUICKSTART = [
    md("""
    # keyledger quickstart

    keyledger keeps keys in an HSM (PKCS#11; an embedded SoftHSM2 token by default), their
    metadata in DuckDB, and records **every** call, allowed, denied or failed, in a tamper-evident
    audit ledger. This tour:

    1. opens a home (provisions a private SoftHSM2 token on first use),
    2. creates a key, encrypts with an encryption context,
    3. rotates the key and shows that data encrypted under version 1 still decrypts,
    4. signs and verifies,
    5. reads and verifies the audit ledger.

    It runs against a fresh home in a temporary folder: nothing here touches your real keys.
    """),
    code("""
    import os
    import tempfile
    from pathlib import Path

    import keyledger as kl
    import keyledger.notebook

    keyledger.notebook.setup()  # charts and widgets render offline (docs/notebooks.md)
    """, FRESH_HOME, """

    HOME = fresh_home("quickstart")
    ledger = kl.open(HOME, principal="alice")
    ledger
    """, tags=("open",)),
    md("""
    The first `open` created the token, a PIN file readable only by you (mode 0600) and the
    DuckDB store, and made `alice` the home's first admin. Admins manage keys; using a key for
    crypto needs the `user` role on it. By default whoever creates a key also gets `user` on it,
    which keeps this tour short. Notebook 02 turns that off to separate duties.

    ## Create a key and encrypt

    Key material is generated inside the HSM, sensitive and non-extractable; keyledger only ever
    holds a handle. Owner and tags are plain metadata that policies, filters and reports use.
    """),
    code("""
    key = ledger.create_key("orders", spec="AES_256", owner="commerce",
                            tags={"team": "commerce", "env": "prod"})
    key
    """),
    md("""
    The **encryption context** is bound to the ciphertext as authenticated data (AES-GCM AAD):
    it is not secret, but decryption must present exactly the same context. Use it to tie a
    ciphertext to where it belongs (tenant, table, row), so a blob copied elsewhere does not
    decrypt. The context is recorded in the audit log; the plaintext never is.
    """),
    code("""
    context = {"tenant": "acme", "table": "orders"}
    blob_v1 = ledger.encrypt("orders", b"card 4111 1111 1111 1111", context=context)
    print(f"{len(blob_v1)} bytes, starting {blob_v1[:4]!r}")
    ledger.decrypt(blob_v1, context=context)
    """),
    md("""
    A wrong context (or one flipped bit) gives one opaque `InvalidCiphertext`. The caller learns
    nothing about why; the audit record says exactly what failed. Every error keyledger raises
    is a `kl.KeyLedgerError` with a sentence meant for a person.
    """),
    code("""
    try:
        ledger.decrypt(blob_v1, context={"tenant": "globex", "table": "orders"})
    except kl.KeyLedgerError as exc:
        print(f"{type(exc).__name__}: {exc}")
    """, tags=("wrong-context",)),
    md("""
    ## Rotate, then decrypt old data

    Rotation adds a version; new encryptions use it. Older versions stay available for
    decryption, because ciphertext is self-describing: its header names the key and version, so
    `decrypt` needs no key name and old data keeps working after any number of rotations.
    """),
    code("""
    key = ledger.rotate("orders")
    blob_v2 = ledger.encrypt("orders", b"card 5500 0000 0000 0004", context=context)
    print(key)
    print("v1 ciphertext after rotation ->", ledger.decrypt(blob_v1, context=context).decode())
    print("v2 ciphertext                ->", ledger.decrypt(blob_v2, context=context).decode())
    """, tags=("decrypt-old",)),
    md("""
    Which versions does stored data depend on? A dry run of `rewrap_many` reads only the
    headers: it tells you what is still under old versions before you retire one (notebook 03
    does the full retire-safety analysis). `rewrap` moves a ciphertext to the latest version
    without exposing the plaintext to the caller.
    """),
    code("""
    print(ledger.rewrap_many([blob_v1, blob_v2], dry_run=True, progress=False))
    blob_v1_now_v2 = ledger.rewrap(blob_v1, context=context)
    ledger.rewrap_many([blob_v1_now_v2, blob_v2], dry_run=True, progress=False).counts
    """, tags=("rewrap",)),
    md("""
    For large payloads use envelope encryption: a fresh data key encrypts locally, and only the
    (small) data key goes through the HSM.
    """),
    code("""
    big = os.urandom(1 << 20)
    sealed = ledger.envelope_encrypt("orders", big, context=context)
    assert ledger.envelope_decrypt(sealed, context=context) == big
    print(f"1 MiB sealed into {len(sealed):,} bytes; one HSM call each way")
    """),
    md("""
    ## Sign and verify

    Signing keys never leave the HSM either; share `public_key_pem` with whoever verifies
    outside keyledger.
    """),
    code("""
    ledger.create_key("releases", spec="ED25519", owner="platform", tags={"team": "platform"})
    signature = ledger.sign("releases", b"release v1.4.2 sha256:9f86d0")
    print("genuine :", ledger.verify("releases", b"release v1.4.2 sha256:9f86d0", signature))
    print("tampered:", ledger.verify("releases", b"release v1.4.3 sha256:9f86d0", signature))
    print(ledger.public_key_pem("releases"))
    """, tags=("sign",)),
    md("""
    ## Denied calls are recorded too

    Another principal without a grant on `orders` tries to read the data. The call is refused
    with a message that says what is missing, and the refusal lands in the audit log.
    """),
    code("""
    with kl.open(HOME, principal="mallory") as mallory:
        try:
            mallory.decrypt(blob_v2, context=context)
        except kl.AccessDenied as exc:
            print(f"AccessDenied: {exc}")
    """, tags=("denied",)),
    md("""
    ## The audit ledger

    Each record has time, principal, action, key, version, outcome and error class (plus the
    encryption context). Records are chained per process journal and checkpointed with a
    signature from an HSM-held key, so `verify_audit()` detects any change, deletion,
    insertion, reordering or truncation, even by someone who can write the DuckDB file.
    """),
    code("""
    ledger.audit(newest_first=True, limit=12)[
        ["time", "principal", "action", "key", "version", "outcome", "error"]]
    """, tags=("audit-tail",)),
    md("""
    `audit()` returns the newest 1,000 records (`limit=None`: all), takes filters (key,
    principal, action, outcome, since, until) and pages back with `limit`/`offset`.
    Everything this tour did, by action and outcome: the failed decrypt with the wrong
    context and mallory's refusal are there.
    """),
    code("""
    (ledger.audit(limit=None).groupby(["action", "outcome"]).size().rename("records")
     .reset_index())
    """, tags=("audit-summary",)),
    code("""
    report = ledger.verify_audit()
    report
    """, tags=("verify",)),
    md("""
    ## A key at a glance

    `get_key` returns the catalog entry (never material); in a notebook it renders its
    versions, policy and rotation schedule.
    """),
    code("""
    ledger.get_key("orders")
    """, tags=("key-display",)),
    code("""
    ledger.list_keys()[["name", "spec", "purpose", "state", "latest_version", "owner",
                        "next_rotation_due"]]
    """),
    md("""
    ## The inventory widget

    `keyledger.widgets` puts the same data behind controls: filter and sort keys, select one to
    see its versions, policy, grants and recent activity. The widgets call `KeyLedger` only, so
    they enforce the same permissions and produce the same audit records as code.
    """),
    code("""
    from keyledger.widgets import KeyInventory

    KeyInventory(ledger)
    """, tags=("widget",)),
    md("""
    Close the ledger when you are done: it flushes the audit journal into the store and releases
    the HSM session (`with kl.open(...) as ledger:` does this for you). Next: notebook 02
    (rotation policies and compliance) and notebook 03 (audit analytics).
    """),
    code("""
    ledger.close()
    print("home:", HOME)
    """),
]

# ------------------------------------------------------------------------------------------------
ROTATION = [
    md("""
    # Rotation policies and compliance, over simulated months

    Rotation is only useful if it happens on schedule and you can prove it did. This notebook:

    1. sets home-wide and per-key rotation policies (by purpose, by tag, by key, by usage),
    2. separates duties: admins manage keys, applications use them,
    3. runs `run_due()` (what cron would run) across four simulated months,
    4. evaluates compliance findings against NIST SP 800-57, PCI DSS, SOC 2, ISO 27001, CIS, ...,
    5. remediates, documents an accepted exception, and writes the HTML report for an auditor.

    Time is simulated with a clock object passed to `kl.open(clock=...)`.
    """),
    code("""
    import os
    import tempfile
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    import pandas as pd

    import keyledger as kl
    import keyledger.analytics as kla
    import keyledger.charts as klc
    import keyledger.notebook

    keyledger.notebook.setup()  # charts drawn as SVG in the kernel: no CDN, works offline
    """, FRESH_HOME, SIM_CLOCK, """

    HOME = fresh_home("rotation")
    clock = SimClock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    admin = kl.open(HOME, principal="alice", clock=clock)
    admin
    """, tags=("open",)),
    md("""
    ## Home policy: who may use keys, and how long they live

    * `creator_is_user=False`: the admin who creates a key does not get to use it. Crypto use is
      granted to application principals explicitly (separation of duties; CIS and SOC 2 check
      for it).
    * Rotation periods resolve **key > tag rule > home rule by purpose > default** (90 days for
      symmetric keys, 365 for signing keys). When several tag rules match, the shortest wins.

    Weakening a policy later (a longer period, a lower quorum) needs approvals once the quorum
    is above 1; tightening never does.
    """),
    code("""
    admin.set_policy("*", creator_is_user=False,
                     rotation_by_purpose={"encrypt": "90d", "mac": "30d"},
                     rotation_by_tag={"env=prod": "30d"})

    admin.create_key("payments", spec="AES_256", owner="payments",
                     tags={"team": "payments", "env": "prod"})          # 30 days: tag rule
    admin.create_key("reports", spec="AES_256", owner="analytics",
                     tags={"team": "analytics", "env": "dev"})          # 90 days: purpose rule
    admin.set_policy("reports", usage_limit=36)                         # ... or 36 encryptions
    admin.create_key("sessions", spec="HMAC_SHA256", owner="identity",
                     tags={"team": "identity"})                         # 30 days: purpose rule
    admin.create_key("releases", spec="ED25519", owner="platform",
                     tags={"team": "platform"}, rotation_period="180d")  # the key's own period
    admin.create_key("legacy-archive", spec="AES_128", owner="platform",
                     tags={"team": "platform"})
    admin.set_policy("legacy-archive", auto_rotate=False)               # someone opted out
    admin.create_key("partner-exchange", spec="AES_256", purpose="wrap", exportable=True,
                     owner="payments", tags={"team": "payments"})      # shared with a processor
    admin.set_policy("partner-exchange", quorum=2)                      # exports need 2 admins

    pd.DataFrame([{"key": k.name, "period (days)": k.rotation_period.days,
                   "period from": k.rotation_source, "next due": k.next_rotation_due,
                   "policy": k.policy}
                  for k in (admin.get_key(n) for n in admin.list_keys()["name"])])
    """, tags=("policies",)),
    md("""
    Applications get the `user` role on exactly the keys they need. Each opens the home as its
    own principal; in production these are separate processes sharing the home.
    """),
    code("""
    apps = {"payments": "svc-payments", "reports": "svc-reports", "sessions": "svc-identity",
            "releases": "ci", "legacy-archive": "svc-archive"}
    for key_name, principal in apps.items():
        admin.grant(key_name, principal, "user")
    app = {p: kl.open(HOME, principal=p, clock=clock) for p in apps.values()}
    admin.grants()
    """),
    code("""
    status = kla.key_status(admin)
    klc.rotation_status(status)
    """, tags=("rotation-chart-before",)),
    md("""
    ## Four months of traffic and due work

    The applications do their work and every two simulated weeks `run_due()` runs, as cron or a
    scheduler would. It rotates keys whose period passed or whose current version reached its
    usage limit, destroys keys whose deletion window ended, and evaluates compliance, so the
    findings and their trend stay current. Each report says what it did and why.

    Usage limits are enforced when due work runs: give a limit headroom for the traffic
    between two runs (or run more often), because a version that passes its limit is a
    critical finding (`nist.usage-limit`) until the data written past it is re-encrypted.
    """),
    code("""
    stored = []  # what the payments service keeps in its database
    history = []
    for week in range(2, 17, 2):
        for day in range(14):
            clock.advance(days=1)
            if day < 12:  # payments and reports: 12 encryptions per fortnight each
                stored.append(app["svc-payments"].encrypt(
                    "payments", f"order {week}-{day}".encode(), context={"tenant": "acme"}))
                app["svc-reports"].encrypt("reports", b"monthly figures")
            app["svc-identity"].mac("sessions", f"session {week}-{day}".encode())
        app["ci"].sign("releases", f"build {week}".encode())
        report = admin.run_due()
        history += [{"week": week, "date": report.now.date(), **row}
                    for row in report.to_frame().to_dict("records")]

    due_log = pd.DataFrame(history)
    due_log
    """, tags=("run-due",)),
    md("""
    `payments` rotated after 30 days (tag rule) and `sessions` too (purpose rule), at the first
    run after they were due; `reports` rotated whenever a version reached 36 encryptions;
    `releases` not yet (180 days). `legacy-archive` never rotated: automatic rotation is off for
    it, so it is now overdue. Rotation never breaks old data: everything the payments service
    stored still decrypts.
    """),
    code("""
    plain = [app["svc-payments"].decrypt(b, context={"tenant": "acme"}) for b in stored]
    print(f"{len(plain)} of {len(stored)} stored ciphertexts decrypt across",
          admin.get_key("payments").latest_version, "versions of payments")
    status = kla.key_status(admin)
    status[["name", "state", "latest_version", "next_rotation_due", "days_to_due",
            "rotation_status"]]
    """, tags=("after-run-due",)),
    code("""
    klc.rotation_status(status)
    """, tags=("rotation-chart-after",)),
    md("""
    ## Findings

    `compliance()` evaluates every rule (rules are data: TOML files with SQL over the store) and
    stores the run; `findings()` reads the stored run cheaply (what dashboards poll). Each
    finding carries its evidence (values and audit record ids) and a remediation.
    """),
    code("""
    findings = admin.compliance()
    findings[["severity", "framework", "rule_id", "key", "title"]]
    """, tags=("findings",)),
    code("""
    klc.compliance_heatmap(kla.compliance_matrix(admin.findings()))
    """, tags=("heatmap",)),
    md("""
    Evidence for one finding, and what to do about it:
    """),
    code("""
    overdue = findings[findings["rule_id"].str.contains("rotation-overdue")].iloc[0]
    print(overdue["title"], "-", overdue["key"])
    print("evidence   :", overdue["evidence"])
    print("remediation:", overdue["remediation"])
    """, tags=("evidence",)),
    md("""
    ## Remediate

    * Rotate `legacy-archive` and turn automatic rotation back on.
    * Verify the audit ledger (auditors expect regular verification; it is recorded).
    * The admin acknowledges the key custodian's responsibilities (PCI DSS 3.7.8).
    * `partner-exchange` only had the default period: give it an explicit one (ISO 27001 asks
      for a defined lifecycle per key).
    * `partner-exchange` is exportable on purpose: it is shared, wrapped, with a card processor.
      Document that as an accepted exception, with a reason and an expiry. Accepted findings
      drop out of the open list but stay in the report, and come back when the exception
      expires.
    """),
    code("""
    admin.rotate("legacy-archive", reason="overdue: compliance finding")
    admin.set_policy("legacy-archive", auto_rotate=True)
    print(admin.verify_audit())
    admin.acknowledge_custody()
    admin.set_policy("partner-exchange", rotation_period="90d")  # an explicit lifecycle policy

    for rule_id in ("pci.key-extractable", "soc2.key-movement"):
        admin.accept_finding(rule_id, "partner-exchange", until="90d",
                             reason="exchanged with the card processor under a wrapped-export "
                                    "agreement; exports need 2 approvals; reviewed quarterly")

    after = admin.compliance()
    print(f"open findings: {len(findings)} before, {len(after)} after remediation")
    after[["severity", "framework", "rule_id", "key", "title"]]
    """, tags=("remediate",)),
    code("""
    admin.compliance_exceptions()
    """, tags=("exceptions",)),
    md("""
    Every evaluation was stored (each `run_due` evaluated too), so the trend shows when findings
    opened and when they were resolved:
    """),
    code("""
    klc.finding_trend(admin.compliance_trend())
    """, tags=("trend",)),
    md("""
    ## The report for an auditor

    A self-contained HTML file (inline chart, no external resources): scope, summary by
    framework and severity, every finding with evidence and remediation, and the accepted
    exceptions with their reasons and expiry. `format="md"` writes Markdown instead.
    """),
    code("""
    REPORTS = Path(tempfile.mkdtemp(prefix="keyledger-reports-"))
    html = admin.compliance_report(REPORTS / "compliance.html")
    md_report = admin.compliance_report(REPORTS / "compliance.md", "md")
    print(f"report written to {html} ({html.stat().st_size:,} bytes)")
    print(f"markdown version  {md_report}")
    """, tags=("report",)),
    md("""
    ## The dashboard in the notebook

    Inventory, actions, audit browser and compliance view together. Actions ask for
    confirmation when they are destructive and show errors as messages.
    """),
    code("""
    from keyledger.widgets import dashboard

    dashboard(admin)
    """, tags=("widget",)),
    code("""
    for ledger in app.values():
        ledger.close()
    admin.close()
    """),
]

# ------------------------------------------------------------------------------------------------
ANALYTICS = [
    md("""
    # Audit analytics: SQL over the ledger, Parquet exports, retire-safety

    The audit ledger is a DuckDB table, so questions about key use are SQL. This notebook:

    1. seeds two months of realistic traffic (services, a rotation, refused and failed calls, a
       newcomer and a burst in the last week),
    2. queries the ledger as an **auditor** (reads everything, uses no key),
    3. exports the ledger to Parquet and queries the export with DuckDB alone,
    4. charts usage with `keyledger.analytics` and `keyledger.charts`,
    5. decides when an old key version can be retired, and retires it.
    """),
    code("""
    import os
    import random
    import tempfile
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    import duckdb
    import pandas as pd

    import keyledger as kl
    import keyledger.analytics as kla
    import keyledger.charts as klc
    import keyledger.notebook

    keyledger.notebook.setup()  # charts drawn as SVG in the kernel: no CDN, works offline
    """, FRESH_HOME, SIM_CLOCK, """

    HOME = fresh_home("analytics")
    WORK = Path(tempfile.mkdtemp(prefix="keyledger-analytics-"))
    clock = SimClock(datetime(2026, 1, 5, 9, 0, tzinfo=UTC))
    admin = kl.open(HOME, principal="alice", clock=clock)
    admin.set_policy("*", creator_is_user=False)
    """, tags=("open",)),
    md("""
    ## Seed two months of traffic

    Four services use their keys daily. `payments` and `orders` rotate halfway through. Now and
    then a service tries a key it has no grant on (denied) or presents the wrong context
    (failed). In the last week a new service starts decrypting payments data and a batch job
    causes a burst. `stored` plays the payments database column.
    """),
    code("""
    KEYS = {"payments": ("AES_256", "payments", "svc-payments"),
            "orders": ("AES_256", "commerce", "svc-orders"),
            "sessions": ("HMAC_SHA256", "identity", "svc-identity"),
            "releases": ("EC_P256", "platform", "ci")}
    for name, (spec, team, principal) in KEYS.items():
        admin.create_key(name, spec=spec, owner=team, tags={"team": team})
        admin.grant(name, principal, "user")
    admin.grant("*", "carol", "auditor")
    svc = {p: kl.open(HOME, principal=p, clock=clock) for *_, p in KEYS.values()}
    CTX = {"tenant": "acme", "table": "payments"}

    rng = random.Random(7)
    stored = []
    for day in range(60):
        clock.advance(days=1)
        if day == 30:
            admin.rotate("payments")
            admin.rotate("orders")
        if day == 53:
            admin.grant("payments", "svc-fraud", "user")
            svc["svc-fraud"] = kl.open(HOME, principal="svc-fraud", clock=clock)
        for _ in range(rng.randint(4, 8)):
            stored.append(svc["svc-payments"].encrypt("payments", b"card on file", context=CTX))
        reads = 60 if day == 57 else 4  # day 57: a batch job reads a lot
        for blob in rng.sample(stored, min(reads, len(stored))):
            svc["svc-payments"].decrypt(blob, context=CTX)
        if day >= 53:
            for blob in rng.sample(stored, 3):
                svc["svc-fraud"].decrypt(blob, context=CTX)
        svc["svc-orders"].encrypt("orders", b"order", context={"tenant": "acme"})
        for _ in range(5):
            svc["svc-identity"].mac("sessions", b"session token")
        if day % 7 == 0:
            svc["ci"].sign("releases", f"build {day}".encode())
        for attempt in (lambda: svc["svc-orders"].decrypt(stored[0], context=CTX),
                        lambda: svc["svc-payments"].decrypt(stored[0], context={"tenant": "x"})):
            if day % 10 == 3:
                try:
                    attempt()
                except kl.KeyLedgerError:
                    pass  # refused or failed: recorded either way

    auditor = kl.open(HOME, principal="carol", clock=clock)
    print(f"{len(stored)} ciphertexts stored; ledger now at", clock.now.date())
    """, tags=("seed",)),
    md("""
    ## SQL over the ledger

    `query()` runs one read-only `SELECT` (admins and auditors only) inside a transaction that
    is always rolled back, with file access disabled. The query itself is audited, so reading
    the audit trail leaves a trace too. Tables: `audit_log`, `keys`, `versions`, `transitions`,
    `grants`, `requests`, `approvals`, `usage`, `compliance_findings`, ... (docs/audit.md).
    """),
    code("""
    auditor.query(\"\"\"
        SELECT action, outcome, count(*) AS records, count(DISTINCT principal) AS principals
        FROM audit_log GROUP BY ALL ORDER BY records DESC\"\"\")
    """, tags=("sql-overview",)),
    md("""
    Who was refused, or failed, on which key, and why? Parameters are passed separately (`?`),
    never pasted into the SQL text.
    """),
    code("""
    auditor.query(\"\"\"
        SELECT principal, action, key, outcome, error, count(*) AS times,
               min(time) AS first, max(time) AS last
        FROM audit_log WHERE outcome <> ? GROUP BY ALL ORDER BY times DESC\"\"\", ["ok"])
    """, tags=("sql-denied",)),
    code("""
    auditor.query(\"\"\"
        SELECT principal, version, count(*) AS decrypts, max(time) AS last
        FROM audit_log
        WHERE key = ? AND action = 'decrypt' AND outcome = 'ok'
        GROUP BY ALL ORDER BY principal, version\"\"\", ["payments"])
    """, tags=("sql-who-decrypts",)),
    md("""
    The query interface is read-only: anything but a single `SELECT` is refused before it
    runs, and the refusal is audited.
    """),
    code("""
    try:
        auditor.query("DELETE FROM audit_log WHERE principal = 'svc-fraud'")
    except kl.KeyLedgerError as exc:
        print(f"{type(exc).__name__}: {exc}")
    auditor.audit(action="query", newest_first=True, limit=5)[
        ["time", "principal", "action", "outcome", "error", "detail"]]
    """, tags=("sql-readonly",)),
    md("""
    ## Export to Parquet, query with DuckDB alone

    `export_audit` writes Parquet partitioned by day (Hive layout `day=YYYY-MM-DD/`), the shape
    data lakes and SIEM pipelines ingest. The export keeps each record's `prev` and `hash`, so
    the per-journal chain can be checked without keyledger.
    """),
    code("""
    export = auditor.export_audit(WORK / "audit", "parquet")
    days = sorted(p.name for p in export.iterdir())
    print(f"{export}: {len(days)} day partitions, {days[0]} .. {days[-1]}")
    PARQUET = f"read_parquet('{export}/**/*.parquet', hive_partitioning=true)"
    """, tags=("export",)),
    code("""
    duckdb.sql(f\"\"\"
        SELECT date_trunc('week', day) AS week,
               count(*) FILTER (outcome = 'ok') AS ok,
               count(*) FILTER (outcome = 'denied') AS denied,
               count(*) FILTER (outcome = 'failed') AS failed
        FROM {PARQUET} GROUP BY week ORDER BY week\"\"\").df()
    """, tags=("parquet-weekly",)),
    md("""
    An independent link check: within each journal, every record must point at the hash of the
    record before it. (`verify_audit()` does this and more, including recomputing every hash
    and checking the HSM-signed checkpoints; this is what an outside reviewer can redo from the
    export alone.)
    """),
    code("""
    duckdb.sql(f\"\"\"
        WITH linked AS (
            SELECT journal, jseq, prev,
                   lag(hash) OVER (PARTITION BY journal ORDER BY jseq) AS hash_before,
                   lag(jseq) OVER (PARTITION BY journal ORDER BY jseq) AS jseq_before
            FROM {PARQUET})
        SELECT count(DISTINCT journal) AS journals, count(*) AS records,
               count(*) FILTER (jseq_before IS NOT NULL
                                AND (prev <> hash_before OR jseq <> jseq_before + 1))
                   AS broken_links
        FROM linked\"\"\").df()
    """, tags=("parquet-chain",)),
    md("""
    ## Usage analytics and charts

    `keyledger.analytics` aggregates in DuckDB and returns small frames; `keyledger.charts`
    turns them into Altair charts (the same ones the Panel dashboard shows). A million audit
    records still reach Python as a few hundred rows.
    """),
    code("""
    ops = kla.ops_per_period(auditor, by="action", bucket="day")
    print(ops.attrs, len(ops), "rows")
    klc.operations(ops)
    """, tags=("ops-chart",)),
    code("""
    klc.operations(kla.ops_per_period(auditor, by="principal", bucket="week"))
    """),
    code("""
    klc.top_keys(kla.top_keys(auditor))
    """),
    md("""
    What changed in the last week? A principal using a key for the first time, and a key whose
    daily operations jumped above three times its usual level, are both worth a look.
    """),
    code("""
    kla.unusual_activity(auditor, days=7)
    """, tags=("unusual",)),
    code("""
    klc.version_timeline(kla.version_timeline(auditor))
    """),
    md("""
    ## Retire-safety: when can version 1 go?

    Retiring a version (raising `min_decryption_version`) makes data still encrypted under it
    unreadable; trimming destroys its material, irreversibly. Before either, you need two
    answers:

    1. **Is anyone still decrypting with it?** (audit: decryptions per version, last decrypt)
    2. **Is any stored data still under it?** (a dry run over the stored ciphertexts' headers)
    """),
    code("""
    klc.version_usage(kla.version_usage(auditor))
    """, tags=("usage-chart",)),
    code("""
    def retire_safety(now, since=None):
        \"\"\"The old versions of payments: decrypts (since ``since``), stored ciphertexts
        still under each (a header-only dry run over the data we hold), and a verdict.\"\"\"
        usage = kla.version_usage(auditor, kla.Filters(keys=("payments",), since=since))
        headers = svc["svc-payments"].rewrap_many(stored, dry_run=True, progress=False).counts
        table = usage[~usage["current"]].merge(headers, on=["key", "version"], how="left")
        table["ciphertexts"] = table["ciphertexts"].fillna(0).astype(int)
        table["days_since_decrypt"] = (pd.Timestamp(now) - table["last_decrypt"]).dt.days
        table["safe_to_retire"] = (table["decryptions"] == 0) & (table["ciphertexts"] == 0)
        return table[["key", "version", "state", "decryptions", "last_decrypt",
                      "days_since_decrypt", "ciphertexts", "safe_to_retire"]]

    retire_safety(clock.now)
    """, tags=("retire-safety",)),
    md("""
    `payments` v1 is still decrypted every day and stored data is still under it: **not safe**.
    The audit answers the first question for every key; the second needs the data, so it is
    asked per key by whoever holds that data (here the payments service and its column).

    Rewrap the stored data to the latest version, say in an overnight job. The plaintext never
    reaches the caller, and each rewrapped item is audited.
    """),
    code("""
    clock.advance(hours=8)  # overnight, after the day's traffic
    result = svc["svc-payments"].rewrap_many(stored, context=CTX, progress=False)
    print(result)
    old_blob = stored[0]
    stored = result.ciphertexts
    rewrapped_at = clock.now
    """, tags=("rewrap",)),
    md("""
    Let a week of normal traffic pass and look again, counting only decryptions since the
    rewrap:
    """),
    code("""
    for _ in range(7):
        clock.advance(days=1)
        stored.append(svc["svc-payments"].encrypt("payments", b"card on file", context=CTX))
        for blob in rng.sample(stored, 4):
            svc["svc-payments"].decrypt(blob, context=CTX)

    safety = retire_safety(clock.now, since=rewrapped_at)
    safety
    """, tags=("retire-safety-after",)),
    md("""
    No decryptions of `payments` v1 in a week and no stored data under it: safe. Retire in two
    steps. First raise `min_decryption_version` (reversible: an admin can lower it again, with
    approvals if the quorum asks for them). Old ciphertext is now refused with a clear reason.
    """),
    code("""
    assert safety.set_index(["key", "version"]).loc[("payments", 1), "safe_to_retire"]
    admin.set_policy("payments", min_decryption_version=2)
    try:
        svc["svc-payments"].decrypt(old_blob, context=CTX)
    except kl.KeyLedgerError as exc:
        print(f"{type(exc).__name__}: {exc}")
    """, tags=("retire",)),
    md("""
    Then, after a grace period with no complaints, `trim` destroys the material of versions
    below 2 in the HSM. This is irreversible (quorum-guarded when the policy asks for more than
    one admin) and audited like everything else.
    """),
    code("""
    clock.advance(days=14)
    admin.trim("payments", 2)
    kla.version_usage(auditor, kla.Filters(keys=("payments",)))
    """, tags=("trim",)),
    code("""
    print(auditor.verify_audit())
    for ledger in (*svc.values(), auditor, admin):
        ledger.close()
    """),
]

# ------------------------------------------------------------------------------------------------
# The demo estate: $KEYLEDGER_HOME (`make notebook` sets it; the tests point it at a small demo
# they seed), else the demo-home folder of this checkout. Only a demo home: the tour rotates a key.
DEMO_HOME = """
def demo_home() -> Path:
    \"\"\"$KEYLEDGER_HOME, else the nearest demo-home folder above the notebook; a demo only.\"\"\"
    env = os.environ.get("KEYLEDGER_HOME")
    here = Path.cwd().resolve()
    candidates = [Path(env)] if env else [p / "demo-home" for p in (here, *here.parents)]
    for home in candidates:
        if (home / "demo.json").is_file():
            return home
    raise FileNotFoundError(
        f"no demo estate at {candidates[0]}: this tour rotates a key, so it only runs on a "
        "demo home. Run `make notebook` (it seeds demo-home first) or "
        "`keyledger demo --home demo-home`.")
"""

MORNING = [
    md("""
    # A security engineer's morning

    You look after the keys of eight teams. Each morning, before the stand-up, you check four
    things, and this notebook walks them on the demo estate (`keyledger demo`: about 150 keys,
    18 months of history, a million audit records) as `security-lead`, an admin on every key:

    1. **Overdue keys**: which keys missed their rotation, and since when;
    2. **Findings**: what the last compliance evaluation found, by framework and severity;
    3. **Unusual activity**: a service using a key for the first time, a burst of calls, refusals;
    4. **One rotation**: the most overdue key, rotated from the widgets, and the trace it leaves.

    `make notebook` seeds the estate (once) and opens this notebook in JupyterLab. Everything
    renders offline: charts are drawn in the kernel, the widgets need no internet.
    """),
    code("""
    import html
    import os
    import re
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    import keyledger as kl
    import keyledger.analytics as kla
    import keyledger.charts as klc
    import keyledger.notebook
    from keyledger.widgets import AuditBrowser, ComplianceView, KeyInventory, dashboard

    keyledger.notebook.setup()  # charts drawn as SVG in the kernel: no CDN, works offline
    """, DEMO_HOME, """
    def html_text(value: str) -> str:
        \"\"\"A widget's HTML status line as plain text.\"\"\"
        return html.unescape(re.sub(r"<[^>]+>", "", value))
    """, """

    HOME = demo_home()
    ledger = kl.open(HOME, principal="security-lead")
    morning = datetime.now(UTC)  # every record this notebook leaves is at or after this
    print(f"{HOME}: {len(ledger.list_keys())} keys, as {ledger.principal}")
    """, tags=("open",)),
    md("""
    ## 1. Overdue keys

    `analytics.key_status` is the catalog with each key's rotation status (overdue, due soon,
    ok, not scheduled, inactive), most urgent first. Overdue keys are the ones whose automatic
    rotation is off, or whose team rotates by hand and stopped.
    """),
    code("""
    status = kla.key_status(ledger)
    overdue = status[status["rotation_status"] == "overdue"]
    print(f"{len(overdue)} overdue, "
          f"{(status['rotation_status'] == 'due soon').sum()} due in the next 14 days")
    overdue[["name", "team", "spec", "latest_version", "rotated_at", "next_rotation_due",
             "days_to_due"]]
    """, tags=("overdue",)),
    code("""
    klc.rotation_status(status)
    """, tags=("rotation-chart",)),
    md("""
    The inventory widget shows the same in a compact grid, filtered to the overdue keys: click a
    row to see that key's versions, policy, grants and recent activity; click a header to sort
    (again to reverse). The selection is a trait, `inventory.grid.selected`, that code can read,
    set or `observe`.
    """),
    code("""
    inventory = KeyInventory(ledger, page_size=20)
    inventory.filters["rotation"].value = "overdue"
    inventory
    """, tags=("inventory",)),
    md("""
    ## 2. Findings

    `findings()` reads the open findings of the last stored evaluation (the weekly due work
    evaluates compliance), so it is cheap. Each finding names its rule, framework and control,
    carries its evidence, and says what to do.
    """),
    code("""
    findings = ledger.findings()
    print(findings["severity"].value_counts().to_string())
    findings[["severity", "framework", "rule_id", "key", "title"]].head(12)
    """, tags=("findings",)),
    code("""
    klc.compliance_heatmap(kla.compliance_matrix(findings))
    """, tags=("heatmap",)),
    md("""
    The compliance view: counts per framework and severity, filters, and the evidence and
    remediation of the finding you select. **Evaluate now** runs every rule again.
    """),
    code("""
    view = ComplianceView(ledger)
    view.filters["severity"].value = "high"
    view
    """, tags=("compliance-view",)),
    md("""
    ## 3. Unusual activity

    Two questions over the last week of the audit ledger, answered in DuckDB (the million
    records never reach Python): did any principal start using a key it never used before, and
    did any key's daily calls jump above three times its usual level?
    """),
    code("""
    unusual = kla.unusual_activity(ledger, days=7)
    unusual
    """, tags=("unusual",)),
    md("""
    Refused calls of the last week, per principal and key: a misconfigured service, or someone
    trying keys they hold no grant on. `audit(..., limit=)` reads only the rows it returns.
    """),
    code("""
    week = kla.Filters(since=morning - timedelta(days=7))
    denied = ledger.audit(outcome="denied", since=week.since, newest_first=True, limit=5000)
    (denied.groupby(["principal", "key", "error"], dropna=False).size()
           .rename("refused").reset_index().sort_values("refused", ascending=False).head(10))
    """, tags=("denied",)),
    code("""
    klc.operations(kla.ops_per_period(ledger, week, by="outcome", bucket="day"))
    """, tags=("ops-chart",)),
    md("""
    ## 4. One rotation, from the widgets

    Rotate the most overdue key. The dashboard's Keys tab puts the key grid on the left and the
    actions and the selected key's details beside it; the actions follow the row you click
    (here `select_key` does the click). Rotation runs at once (nothing is lost by it: old
    ciphertext still decrypts with the older versions), while disabling, deletion and quorum
    requests ask for confirmation first. Each run of this notebook rotates the most overdue key
    left, so the estate gets a little healthier every time.
    """),
    code("""
    desk = dashboard(ledger, page_size=100)
    actions = desk.actions
    target = overdue["name"].iloc[0] if len(overdue) else None
    if target is None:
        print("nothing is overdue this morning")
    else:
        desk.inventory.select_key(target)  # as if its row were clicked
        actions.reason.value = "overdue: morning review"
        actions.buttons["rotate"].click()
        print(f"{actions.key.value}: {html_text(actions.status.value)}")
    desk
    """, tags=("rotate",)),
    md("""
    The key now has a new version and a new due date, and the rotation is in the audit ledger,
    recorded with who did it and why, next to the reads of that key this notebook made this
    morning (the widgets' details pane reads it too):
    """),
    code("""
    if target is not None:
        print(ledger.get_key(target))
    ledger.audit(principal="security-lead", key=target, since=morning, newest_first=True,
                 limit=10)[
        ["time", "action", "key", "version", "outcome", "detail"]]
    """, tags=("after-rotate",)),
    md("""
    The audit browser pages through the whole ledger in DuckDB, one page at a time; here the
    last day of the key just rotated. **Verify ledger** checks every record's hash chain and the
    HSM-signed checkpoints (a million records take a few seconds).
    """),
    code("""
    browser = AuditBrowser(ledger, page_size=15)
    if target is not None:
        browser.filters["key"].value = target
    browser
    """, tags=("audit-browser",)),
    md("""
    The widgets above stay live while `ledger` is open: click rows, sort, filter, act. When you
    are done, `ledger.close()` (or shutting the kernel down) releases the home.
    """),
]


NOTEBOOKS = {
    "01-quickstart": QUICKSTART,
    "02-rotation-and-compliance": ROTATION,
    "03-audit-analytics": ANALYTICS,
    "04-security-engineers-morning": MORNING,
}


def build(name: str, cells: list[tuple[str, str, tuple[str, ...]]]) -> nbformat.NotebookNode:
    nb = new_notebook(metadata={"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO})
    for i, (kind, text, tags) in enumerate(cells):
        source = text
        cell_id = f"{name[:2]}-{i:02d}"
        if kind == "markdown":
            cell = new_markdown_cell(source, id=cell_id)
        else:
            cell = new_code_cell(source, id=cell_id)
            if tags:
                cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name, NOTEBOOKS[name]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a committed notebook differs from the generated one")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = OUT_DIR / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            OUT_DIR.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} differs from scripts/make_notebooks.py: regenerate it",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
