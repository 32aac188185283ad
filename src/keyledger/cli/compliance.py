"""``compliance ...``: evaluate the rules, write reports, accept findings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..analytics import SEVERITY_ORDER
from ..demo import format_table
from .common import AddCommand, add_force, ledger_for, print_json


def cmd_compliance_report(args: argparse.Namespace) -> int:
    suffix = Path(args.path).suffix.lower()
    fmt = args.format or ("md" if suffix in (".md", ".markdown") else "html")
    with ledger_for(args) as led:
        out = led.compliance_report(args.path, format=fmt, frameworks=args.framework or None,
                                    overwrite=args.force)
    if args.json:
        print_json({"path": str(out), "format": fmt})
    else:
        print(f"wrote the compliance report to {out} ({fmt})")
    return 0


def cmd_compliance_list(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        df = led.compliance(frameworks=args.framework or None)
    if args.severity:
        df = df[df["severity"].isin(SEVERITY_ORDER[:SEVERITY_ORDER.index(args.severity) + 1])]
    if args.json:
        print_json(df.to_dict("records"))
    elif df.empty:
        print("no open findings")
    else:
        import pandas as pd  # loaded already: df is a DataFrame

        rows = [(r.severity, r.rule_id, r.key or "-", "-" if pd.isna(r.version) else r.version,
                 r.principal or "-", r.title) for r in df.itertuples()]
        print(format_table(("SEVERITY", "RULE", "KEY", "VER", "PRINCIPAL", "TITLE"), rows))
    failing = bool(args.fail_on) and bool(
        (df["severity"].map(SEVERITY_ORDER.index) <= SEVERITY_ORDER.index(args.fail_on)).any())
    return 1 if failing else 0


def cmd_compliance_accept(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        exc = led.accept_finding(args.rule, None if args.name == "-" else args.name,
                                 args.reason, args.until)
    if args.json:
        print_json(exc)
    else:
        print(f"accepted {exc['rule_id']} on {exc['key'] or 'the home'} until "
              f"{exc['until']:%Y-%m-%d %H:%M} UTC (exception {exc['exception_id']})")
    return 0


def register(sub: Any, add: AddCommand) -> None:
    """The ``compliance`` actions."""
    comp = sub.add_parser("compliance", help="evaluate compliance rules, report, accept findings",
                          description="evaluate compliance rules, report, accept findings")
    csub = comp.add_subparsers(dest="compliance_command", metavar="ACTION", required=True)
    p = add(csub, "report", cmd_compliance_report,
            "evaluate and write an HTML or Markdown report for auditors", json_flag=True)
    p.add_argument("path")
    p.add_argument("--format", choices=["html", "md"])
    p.add_argument("--framework", action="append", metavar="NAME")
    add_force(p, "an existing file")
    p = add(csub, "list", cmd_compliance_list, "evaluate and list open findings", json_flag=True)
    p.add_argument("--framework", action="append", metavar="NAME")
    p.add_argument("--severity", choices=SEVERITY_ORDER, help="this severity and worse")
    p.add_argument("--fail-on", choices=SEVERITY_ORDER,
                   help="exit 1 if a finding of this severity or worse is open (CI gate)")
    p = add(csub, "accept", cmd_compliance_accept, "accept a finding as a documented exception "
            "until a date", json_flag=True)
    p.add_argument("rule")
    p.add_argument("name", help="key name, or - for a home-wide finding")
    p.add_argument("--reason", required=True)
    p.add_argument("--until", required=True, help="a date or a period such as 90d")
