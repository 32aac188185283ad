"""``access-key ...``: the credentials applications sign ``keyledger serve`` requests with."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import AddCommand, UsageError, ledger_for, print_frame, print_json


def _stdin_secret() -> str:
    """The secret from the first line of stdin (never an argument: argv is visible to others)."""
    line = sys.stdin.readline()
    if not line:
        raise UsageError("--secret-stdin: no secret on stdin")
    return line.rstrip("\r\n")


def cmd_access_key_create(args: argparse.Namespace) -> int:
    if (args.id is None) != (not args.secret_stdin):
        raise UsageError("--id and --secret-stdin go together (registering an existing pair)")
    secret = _stdin_secret() if args.secret_stdin else None
    with ledger_for(args) as led:
        made = led.create_access_key(args.principal_name, key_id=args.id, secret=secret)
    if args.json:
        print_json(made.as_aws())
    elif args.secret_stdin:
        print(f"registered access key {made.access_key_id} for {made.principal}")
    else:
        print(f"access key for {made.principal} (the secret is shown only now):")
        print(f"AccessKeyId     {made.access_key_id}")
        print(f"SecretAccessKey {made.secret_access_key}")
    return 0


def cmd_access_key_list(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        df = led.access_keys()
    return print_frame(args, df, "no access keys")


def _state_command(method: str, verb: str):
    def run(args: argparse.Namespace) -> int:
        with ledger_for(args) as led:
            getattr(led, method)(args.access_key_id)
        print(f"{verb} access key {args.access_key_id}")
        return 0
    return run


def register(sub: Any, add: AddCommand) -> None:
    """The ``access-key`` actions."""
    ak = sub.add_parser("access-key", help="access keys for keyledger serve (admin only)",
                        description="access keys (AWS style) that sign keyledger serve requests")
    asub = ak.add_subparsers(dest="access_key_command", metavar="ACTION", required=True)
    p = add(asub, "create", cmd_access_key_create,
            "make an access key for PRINCIPAL and print its secret once", json_flag=True)
    p.add_argument("principal_name", metavar="PRINCIPAL")
    p.add_argument("--id", metavar="ID", help="register an existing pair: its access key id")
    p.add_argument("--secret-stdin", action="store_true",
                   help="read the existing pair's secret from the first line of stdin")
    add(asub, "list", cmd_access_key_list, "list access keys (never their secrets)",
        json_flag=True)
    for name, method, verb, what in (
            ("disable", "disable_access_key", "disabled", "refuse its requests from now on"),
            ("enable", "enable_access_key", "enabled", "accept its requests again"),
            ("delete", "delete_access_key", "deleted", "remove it for good")):
        p = add(asub, name, _state_command(method, verb), f"{name} an access key: {what}")
        p.add_argument("access_key_id", metavar="ID")
