"""``audit ...``: verify, read and export the audit ledger."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..demo import format_table
from .common import AddCommand, UsageError, add_force, jsonable, ledger_for, print_json


def cmd_audit_verify(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        report = led.verify_audit()
    if args.json:
        print_json({"ok": report.ok, "records": report.records,
                     "checkpoints": report.checkpoints, "problems": report.problems,
                     "first_bad": report.first_bad})
    else:
        print(report)
    return 0 if report.ok else 1


def cmd_audit_accept_unproven(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        led.accept_unproven(args.journal, args.through_jseq, args.reason)
    print(f"accepted the unproven records of {args.journal} through {args.through_jseq}")
    return 0


_TAIL_COLUMNS = ["seq", "time", "principal", "action", "key", "version", "outcome", "error",
                 "detail", "context"]


def cmd_audit_tail(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise UsageError("-n must be zero or more")
    with ledger_for(args) as led:  # only the newest n records are read (audit() pages in DuckDB)
        df = led.audit(key=args.key, principal=args.who, action=args.action,
                       outcome=args.outcome, limit=max(args.n, 1))
    df = df.tail(args.n) if args.n else df.iloc[0:0]
    if args.json:
        print_json([{c: rec.get(c) for c in _TAIL_COLUMNS}
                     for rec in df.to_dict("records")])
        return 0
    rows = []
    for rec in df.to_dict("records"):
        rec = {c: jsonable(rec.get(c)) for c in _TAIL_COLUMNS}
        note = ": ".join(x for x in (rec["error"], rec["detail"]) if x)
        rows.append((rec["time"][:19].replace("T", " "), rec["principal"], rec["action"],
                     rec["key"] or "-", f"v{rec['version']}" if rec["version"] else "-",
                     rec["outcome"], note))
    print(format_table(("TIME (UTC)", "PRINCIPAL", "ACTION", "KEY", "VER", "OUTCOME", "NOTE"),
                       rows))
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    fmt = args.format
    if fmt is None:
        fmt = "jsonl" if Path(args.path).suffix.lower() in (".jsonl", ".json", ".ndjson") \
            else "parquet"
    with ledger_for(args) as led:
        out = led.export_audit(args.path, format=fmt, overwrite=args.force)
    if args.json:
        print_json({"path": str(out), "format": fmt})
    else:
        kind = "a folder partitioned by day" if fmt == "parquet" else "one JSON record a line"
        print(f"exported the audit ledger to {out} ({fmt}, {kind})")
    return 0


def register(sub: Any, add: AddCommand) -> None:
    """The ``audit`` actions."""
    audit = sub.add_parser("audit", help="verify, read and export the audit ledger",
                           description="verify, read and export the audit ledger")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    add(asub, "verify", cmd_audit_verify,
        "check the hash chain, signed checkpoints, HSM-held head and journal seals "
        "(exit 1 if broken or unproven)", json_flag=True)
    p = add(asub, "accept-unproven", cmd_audit_accept_unproven,
            "after investigating, accept a journal's unproven records that verify names")
    p.add_argument("journal")
    p.add_argument("through_jseq", type=int)
    p.add_argument("--reason", required=True, help="what the investigation found")
    p = add(asub, "tail", cmd_audit_tail, "show the newest audit records", json_flag=True)
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    p.add_argument("--key", help="only records for this key")
    p.add_argument("--who", metavar="PRINCIPAL", help="only records of this principal")
    p.add_argument("--action", help="only this action, e.g. encrypt")
    p.add_argument("--outcome", choices=["ok", "denied", "failed"], help="only this outcome")
    p = add(asub, "export", cmd_audit_export, "export the audit ledger", json_flag=True)
    p.add_argument("path")
    p.add_argument("--format", choices=["parquet", "jsonl"],
                   help="default: jsonl for *.jsonl/*.json paths, parquet otherwise")
    add_force(p, "an existing file (or a folder holding an earlier Parquet export)")
