"""The ``keyledger`` command line: a thin view over ``keyledger.open()`` (see docs/cli.md).

Exit codes: 0 success; 1 the operation was refused or failed (a ``KeyLedgerError``, an
unreadable input file, an invalid signature, a broken audit ledger), printed as
``error: <message>`` on stderr; 2 usage errors. No traceback is shown for expected failures.

One module per command group (``keys``, ``crypto``, ``audit``, ``compliance``, ``governance``,
``backup``, ``demo``), each with its ``cmd_*`` functions and a ``register`` that adds its
parsers; ``common`` holds what they share. This module builds the parser and runs a command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import KeyLedgerError
from . import accesskeys, audit, backup, compliance, crypto, demo, governance, keys, serve
from .common import PROG, UsageError, check_url


def _globals(json_flag: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command. SUPPRESS keeps a later default from
    overwriting a value given earlier on the line."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS,
                   help="keyledger home (default: $KEYLEDGER_HOME or ./.keyledger)")
    g.add_argument("--principal", metavar="NAME", default=argparse.SUPPRESS,
                   help="who is acting, as recorded in the audit ledger (default: OS user)")
    g.add_argument("--url", metavar="URL", default=argparse.SUPPRESS,
                   help="run the command through `keyledger serve` at URL (kl.connect: the "
                        "access key from $KEYLEDGER_ACCESS_KEY_ID/$KEYLEDGER_SECRET_ACCESS_KEY "
                        "or ~/.keyledger/credentials) instead of opening a home")
    if json_flag:
        g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print machine-readable JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole parser: the global options, then each command group's ``register``."""
    plain, with_json = _globals(False), _globals(True)
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[with_json],
        description="Manage keys held in an HSM, with every call in a tamper-evident audit ledger.",
        epilog="Exit codes: 0 ok, 1 operation refused or failed, 2 usage error. "
               "See docs/cli.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(parent, name: str, func, help: str, json_flag: bool = False, **kw):
        p = parent.add_parser(name, help=help, description=help,
                              parents=[with_json if json_flag else plain], **kw)
        p.set_defaults(func=func, json_ok=json_flag)
        return p

    for group in (keys, crypto, audit, compliance, governance, backup, demo, accesskeys, serve):
        group.register(sub, add)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    parts = [args.command, getattr(args, "key_command", None), getattr(args, "audit_command", None),
             getattr(args, "compliance_command", None), getattr(args, "access_key_command", None)]
    return " ".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    for name, default in (("home", None), ("principal", None), ("json", False), ("url", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        if args.json and not args.json_ok:
            raise UsageError(f"--json does not apply to `{_command_name(args)}`")
        check_url(args)
        return args.func(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyLedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `keyledger audit tail | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
