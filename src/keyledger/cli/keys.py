"""``init``, ``key ...`` and ``run-due``: the home and the lifecycle of keys."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..demo import format_table, when
from ..model import SPECS, Key, Purpose
from .common import (
    AddCommand,
    format_period,
    ledger_for,
    pair,
    pair_dict,
    print_frame,
    print_json,
)


def _key_doc(key: Key) -> dict[str, Any]:
    return {
        "name": key.name, "key_id": key.key_id, "spec": key.spec.name,
        "purpose": key.purpose.value, "state": key.state.value, "owner": key.owner,
        "exportable": key.exportable, "created_at": key.created_at, "rotated_at": key.rotated_at,
        "rotation_period": format_period(key.rotation_period),
        "next_rotation_due": key.next_rotation_due, "deletion_due": key.deletion_due,
        "latest_version": key.latest_version, "min_decryption_version": key.min_decryption_version,
        "min_encryption_version": key.min_encryption_version, "aliases": list(key.aliases),
        "tags": dict(key.tags),
        "versions": [{"version": v.version, "state": v.state, "created_at": v.created_at,
                      "destroyed_at": v.destroyed_at, "hsm_id": v.handle.hex()}
                     for v in sorted(key.versions.values(), key=lambda v: v.version)],
    }


def cmd_init(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        on_open = led.last_reconcile
        full = led.reconcile(full=True)
        caps = led.capabilities()
        home, principal = led.home, led.principal
    repaired = on_open.repaired + full.repaired
    problems = on_open.problems + [p for p in full.problems if p not in on_open.problems]
    if args.json:
        print_json({
            "home": str(home), "principal": principal,
            "hsm": {"module": caps.module, "manufacturer": caps.manufacturer,
                    "supports": dict(sorted(caps.supports.items()))},
            "reconcile": {"clean": not repaired and not problems, "repaired": repaired,
                          "problems": problems},
        })
    else:
        print(f"home:       {home}")
        print(f"principal:  {principal}")
        print(f"hsm module: {caps.module}")
        print(f"hsm:        {caps}")
        if not repaired and not problems:
            print("reconcile:  catalog and HSM agree")
        for line in repaired:
            print(f"repaired:   {line}")
        for line in problems:
            print(f"problem:    {line}")
    return 1 if problems else 0


def _key_line(key: Key) -> str:
    return (f"{key.name!r}: {key.spec.name} {key.purpose.value}, {key.state.value}, "
            f"version {key.latest_version}")


def _emit_key(args: argparse.Namespace, key: Key, text: str) -> int:
    if args.json:
        print_json(_key_doc(key))
    else:
        print(text)
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    tags = pair_dict(args.tag, "tag")
    with ledger_for(args) as led:
        key = led.create_key(args.name, spec=args.spec, purpose=args.purpose, owner=args.owner,
                             tags=tags, rotation_period=args.rotation_period,
                             exportable=args.exportable)
    due = when(key.next_rotation_due)
    return _emit_key(args, key, f"created key {_key_line(key)}; next rotation due {due} UTC")


def cmd_key_list(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        df = led.list_keys()
    if "note" in df.attrs:  # a simulation home: said on stderr, so --json stays parseable
        print(f"note: {df.attrs['note']} (this home was created as a simulation)",
              file=sys.stderr)
    if args.json:
        print_json(df.to_dict("records"))
        return 0
    if df.empty:
        print("no keys yet; create one with `keyledger key create NAME --spec AES_256`")
        return 0
    rows = [(r.name, r.spec, r.purpose, r.state, r.latest_version, r.owner,
             when(r.rotated_at), when(r.next_rotation_due)) for r in df.itertuples()]
    print(format_table(("NAME", "SPEC", "PURPOSE", "STATE", "VER", "OWNER", "ROTATED",
                        "ROTATION DUE"), rows))
    return 0


def cmd_key_show(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        key = led.get_key(args.name)
    if args.json:
        print_json(_key_doc(key))
        return 0
    doc = _key_doc(key)
    fields = [
        ("name", key.name + (f"  (aliases: {', '.join(key.aliases)})" if key.aliases else "")),
        ("key id", key.key_id),
        ("spec", f"{key.spec.name} ({key.purpose.value})"),
        ("state", key.state.value),
        ("owner", key.owner or "-"),
        ("tags", ", ".join(f"{k}={v}" for k, v in sorted(key.tags.items())) or "-"),
        ("exportable", "yes" if key.exportable else "no"),
        ("created", f"{when(key.created_at)} UTC"),
        ("rotated", f"{when(key.rotated_at)} UTC"),
        ("rotation", f"every {doc['rotation_period'] or '-'}; next due "
                     f"{when(key.next_rotation_due)}"),
        ("deletion due", when(key.deletion_due)),
        ("latest version", str(key.latest_version)),
        ("min decrypt", f"v{key.min_decryption_version}"),
    ]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k.ljust(width)}  {v}")
    print("versions:")
    rows = [(v["version"], v["state"], when(v["created_at"]), when(v["destroyed_at"]))
            for v in doc["versions"]]
    for line in format_table(("VERSION", "STATE", "CREATED", "DESTROYED"), rows).splitlines():
        print(f"  {line}")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        key = led.rotate(args.name)
    return _emit_key(args, key, f"rotated {key.name!r} to version {key.latest_version}; "
                                "older versions still decrypt and verify")


def _state_cmd(method: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        with ledger_for(args) as led:
            key = getattr(led, method)(args.name)
        return _emit_key(args, key, f"key {key.name!r} is now {key.state.value}")
    return run


def cmd_key_schedule_deletion(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        key = led.schedule_deletion(args.name, days=args.days)
    return _emit_key(args, key, (
        f"key {key.name!r} is {key.state.value}: it cannot be used now; `keyledger key destroy "
        f"{key.name}` is allowed after {when(key.deletion_due)} UTC; "
        f"`keyledger key cancel-deletion {key.name}` keeps it"))


def cmd_key_cancel_deletion(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        key = led.cancel_deletion(args.name)
    return _emit_key(args, key, f"deletion of {key.name!r} cancelled; it is {key.state.value} again")


def cmd_key_destroy(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        key = led.destroy(args.name)
    return _emit_key(args, key, f"destroyed the HSM material of all {len(key.versions)} "
                                f"version(s) of {key.name!r}; its metadata stays as destroyed")


def cmd_key_compromised(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        key = led.mark_compromised(args.name, args.reason)
    return _emit_key(args, key, (
        f"key {key.name!r} marked compromised: it no longer encrypts or signs, existing data "
        f"still decrypts and verifies; `keyledger key rotate {key.name}` makes a fresh version"))


def cmd_run_due(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        report = led.run_due()
    if args.json:
        print_json({"now": report.now, "done": report.done, "skipped": report.skipped,
                     "compliance": report.compliance})
    else:
        print(report)
    return 0


def cmd_key_trim(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        key = led.trim(args.name, args.min_version)
    return _emit_key(args, key, f"destroyed the material of versions below {args.min_version} "
                                f"of {key.name!r}; they can no longer decrypt")


def cmd_key_usage(args: argparse.Namespace) -> int:
    with ledger_for(args) as led:
        df = led.version_usage(args.name)
    return print_frame(args, df, "no versions")


def register(sub: Any, add: AddCommand) -> None:
    """``init``, the ``key`` actions and ``run-due``."""
    add(sub, "init", cmd_init, "open (or provision) the home, reconcile it with the HSM and "
        "report the HSM's capabilities", json_flag=True)

    key = sub.add_parser("key", help="create, inspect and change keys",
                         description="create, inspect and change keys")
    ksub = key.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    p = add(ksub, "create", cmd_key_create, "generate a new key in the HSM", json_flag=True)
    p.add_argument("name")
    p.add_argument("--spec", required=True, metavar="SPEC",
                   help=f"one of {', '.join(SPECS)}")
    p.add_argument("--purpose", choices=[x.value for x in Purpose],
                   help="default: the spec's first purpose (encrypt for AES, sign for RSA/EC)")
    p.add_argument("--owner", help="team or person responsible for the key")
    p.add_argument("--tag", type=pair, action="append", metavar="K=V",
                   help="a tag (repeatable)")
    p.add_argument("--rotation-period", metavar="PERIOD",
                   help="e.g. 90d, 12h, 1y (default: 90d symmetric, 1y signing)")
    p.add_argument("--exportable", action="store_true",
                   help="allow wrapped export (keys are non-extractable otherwise)")
    add(ksub, "list", cmd_key_list, "list keys", json_flag=True)
    add(ksub, "show", cmd_key_show, "show one key, its versions, state and dates",
        json_flag=True).add_argument("name")
    add(ksub, "rotate", cmd_key_rotate, "add a new version; old ones keep decrypting",
        json_flag=True).add_argument("name")
    add(ksub, "enable", _state_cmd("enable"), "allow use of a disabled key again",
        json_flag=True).add_argument("name")
    add(ksub, "disable", _state_cmd("disable"), "suspend all use of a key",
        json_flag=True).add_argument("name")
    p = add(ksub, "schedule-deletion", cmd_key_schedule_deletion,
            "block use now and allow destroy after a waiting period", json_flag=True)
    p.add_argument("name")
    p.add_argument("--days", type=int, default=30, help="waiting period, 7..30 (default 30)")
    add(ksub, "cancel-deletion", cmd_key_cancel_deletion,
        "cancel a scheduled deletion (restores the previous state)",
        json_flag=True).add_argument("name")
    add(ksub, "destroy", cmd_key_destroy,
        "destroy the key material once the deletion waiting period has passed",
        json_flag=True).add_argument("name")
    p = add(ksub, "compromised", cmd_key_compromised,
            "mark a key compromised (no more encrypt/sign; decrypt/verify still work)",
            json_flag=True)
    p.add_argument("name")
    p.add_argument("--reason", required=True, help="why the key is considered compromised")

    p = add(ksub, "trim", cmd_key_trim, "destroy the material of versions below MIN_VERSION "
            "(irreversible; check `key usage` first)", json_flag=True)
    p.add_argument("name")
    p.add_argument("min_version", type=int)
    add(ksub, "usage", cmd_key_usage, "encryptions and decryptions per key version, and when "
        "each version last decrypted", json_flag=True).add_argument("name", nargs="?")
    add(sub, "run-due", cmd_run_due, "rotate, destroy and deactivate what is due (cron-safe)",
        json_flag=True)
