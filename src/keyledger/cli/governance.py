"""Grants, quorum-guarded requests and approvals, custodian acknowledgement."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import AddCommand, UsageError, ledger_for, print_frame, print_json


def cmd_grant(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        led.grant(args.name, args.who, args.role)
    where = "every key" if args.name == "*" else f"key {args.name!r}"
    print(f"granted {args.role} on {where} to {args.who}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        removed = led.revoke(args.name, args.who, args.role)
    if not removed:  # exit 1 with an error line, as every failure (docs/cli.md, "Exit codes")
        what = f"the {args.role} role" if args.role else "a role"
        print(f"error: no grant on {args.name} gives {args.who} {what}; nothing revoked "
              f"(`keyledger grants {args.name}` lists the grants)", file=sys.stderr)
        return 1
    print(f"revoked {removed} grant(s) of {args.who} on {args.name}")
    return 0


def cmd_grants(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        df = led.grants(args.name)
    return print_frame(args, df[["key", "principal", "role", "granted_by", "granted_at"]],
                      "no grants")


def cmd_request(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        params = {}
        if args.action == "trim":
            if args.min_version is None:
                raise UsageError("request trim needs --min-version N")
            params["min_version"] = args.min_version
        elif args.action in ("grant", "revoke"):
            if args.who is None:
                raise UsageError(f"request {args.action} needs --who PRINCIPAL")
            params["principal"] = args.who
            role = args.role or ("admin" if args.action == "grant" else None)
            if role is not None:
                params["role"] = role
        request_id = led.request(args.action, args.name, args.reason, **params)
        status = led.requests().set_index("request_id").loc[request_id]
    if args.json:
        print_json({"request_id": request_id, "status": status["status"],
                     "quorum": int(status["quorum"])})
    elif status["status"] == "executed":
        print(f"request {request_id}: {args.action} {args.name} executed (quorum 1)")
    else:
        print(f"request {request_id}: waiting for {int(status['quorum']) - 1} more approval(s); "
              f"other admins run `keyledger approve {request_id}`")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        result = led.approve(args.request_id)
    if args.json:
        print_json(result)
    elif result["executed"]:
        print(f"request {args.request_id}: quorum met ({result['approvals']} of "
              f"{result['quorum']}); executed")
    else:
        print(f"request {args.request_id}: {result['approvals']} of {result['quorum']} "
              "approvals")
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        df = led.requests(args.status)
    cols = ["request_id", "action", "key", "status", "quorum", "approvers", "requested_by",
            "expires_at", "reason"]
    return print_frame(args, df[cols], "no approval requests")


def cmd_acknowledge(args: argparse.Namespace) -> int:
    from ..governance import CUSTODIAN_STATEMENT

    with ledger_for(args) as led:
        led.acknowledge_custody()
    print(f"recorded: {led.principal} accepts: {CUSTODIAN_STATEMENT}")
    return 0


def register(sub: Any, add: AddCommand) -> None:
    """Grants, quorum requests and approvals, custodian acknowledgement."""
    p = add(sub, "grant", cmd_grant, "give a principal a role on a key, or on every key (*)")
    p.add_argument("name", help="key name, or * for every key")
    p.add_argument("who", metavar="PRINCIPAL", help="principal, or * for everyone")
    p.add_argument("role", choices=["admin", "user", "auditor"])
    p = add(sub, "revoke", cmd_revoke, "take a role (or all roles) away (exit 1 if none)")
    p.add_argument("name", help="key name, or * for every key")
    p.add_argument("who", metavar="PRINCIPAL")
    p.add_argument("role", nargs="?", choices=["admin", "user", "auditor"])
    add(sub, "grants", cmd_grants, "who holds which role where",
        json_flag=True).add_argument("name", nargs="?")
    p = add(sub, "request", cmd_request,
            "ask for a quorum-guarded action (destroy, trim, grant or revoke admin)",
            json_flag=True)
    p.add_argument("action", choices=["destroy", "trim", "grant", "revoke"])
    p.add_argument("name")
    p.add_argument("--reason", required=True, help="why; approvers read it")
    p.add_argument("--min-version", type=int, help="for trim: the lowest version to keep")
    p.add_argument("--who", help="for grant/revoke: the principal whose role changes")
    p.add_argument("--role", choices=["admin", "user", "auditor"],
                   help="for grant (default admin) / revoke (default: all roles)")
    add(sub, "approve", cmd_approve, "approve a pending request (the last approval executes it)",
        json_flag=True).add_argument("request_id")
    add(sub, "requests", cmd_requests, "list approval requests",
        json_flag=True).add_argument("--status",
                                     choices=["pending", "executed", "expired", "executing"])
    add(sub, "acknowledge", cmd_acknowledge,
        "record that you accept the key custodian's responsibilities (PCI DSS 3.7.8)")
