"""``backup``, ``restore`` and ``restore-test``: encrypted snapshots of a home."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .common import AddCommand, UsageError, add_force, ledger_for, print_json


def _passphrase(confirm: bool) -> str:
    """From $KEYLEDGER_BACKUP_PASSPHRASE, or asked on the terminal (never an argument: argv is
    visible to other users)."""
    env = os.environ.get("KEYLEDGER_BACKUP_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        raise UsageError("set KEYLEDGER_BACKUP_PASSPHRASE or run on a terminal to be asked")
    import getpass

    first = getpass.getpass("backup passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise UsageError("the passphrases differ")
    return first


def cmd_backup(args: argparse.Namespace) -> int:
    passphrase = _passphrase(confirm=True)
    with ledger_for(args) as led:
        info = led.backup(args.path, passphrase=passphrase, overwrite=args.force)
    if args.json:
        print_json({k: getattr(info, k) for k in ("path", "bytes", "sha256", "created_at",
                                                   "files", "audit_records", "keys")})
    else:
        print(info)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ..service import restore

    if not args.home:
        raise UsageError("restore needs --home NEW_EMPTY_DIR")
    led = restore(args.path, args.home, passphrase=_passphrase(confirm=False),
                  principal=args.principal)
    with led:
        print(f"restored {args.path} into {led.home}; {led.verify_audit()}")
    return 0


def cmd_restore_test(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        report = led.restore_test(args.path, passphrase=_passphrase(confirm=False))
    print(report)
    if report.ok:
        return 0
    problems = "; ".join(report.problems) or "see the report above"
    print(f"error: the restore test of {args.path} failed: {problems}", file=sys.stderr)
    return 1


def register(sub: Any, add: AddCommand) -> None:
    """``backup``, ``restore`` and ``restore-test``."""
    p = add(sub, "backup", cmd_backup, "write an encrypted snapshot of the home (passphrase "
            "from $KEYLEDGER_BACKUP_PASSPHRASE or asked)", json_flag=True)
    p.add_argument("path")
    add_force(p, "an existing file, once the new backup is complete")
    add(sub, "restore", cmd_restore, "restore a backup into a new empty --home").add_argument(
        "path")
    add(sub, "restore-test", cmd_restore_test, "restore a backup in a scratch home, check it "
        "works and record the test (exit 1 if it does not)").add_argument("path")
