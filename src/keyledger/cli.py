"""The ``keyledger`` command line: a thin view over ``keyledger.open()`` (see docs/cli.md).

Exit codes: 0 success; 1 the operation was refused or failed (a ``KeyLedgerError``, an
unreadable input file, an invalid signature, a broken audit ledger), printed as
``error: <message>`` on stderr; 2 usage errors. No traceback is shown for expected failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from . import ciphertext as ct
from . import outputs
from .demo import format_table, run_tour, when
from .demo_fleet import DEMO_FILE, MAX_KEYS, MAX_MONTHS, MIN_KEYS, MIN_MONTHS, seed_demo
from .errors import ConfigError, InvalidCiphertext, KeyLedgerError
from .model import SPECS, Key, Purpose
from .service import KeyLedger
from .service import open as open_ledger

PROG = "keyledger"


class UsageError(Exception):
    """A usage problem found after parsing (exit code 2)."""


# -- small helpers -------------------------------------------------------------------------------
def _pair(text: str) -> tuple[str, str]:
    """argparse type for ``k=v``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _pairs(pairs: Sequence[tuple[str, str]] | None, what: str) -> dict[str, str] | None:
    if not pairs:
        return None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out and out[k] != v:
            raise UsageError(f"{what} {k!r} given twice with different values")
        out[k] = v
    return out


def _period(td: timedelta | None) -> str | None:
    if td is None:
        return None
    secs = int(td.total_seconds())
    for unit, size in (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600),
                       ("m", 60)):
        if secs % size == 0 and secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | str):
        return value
    if pd.api.types.is_scalar(value) and pd.isna(value):  # NaN, NaT, pd.NA
        return None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _period(value)
    if hasattr(value, "item") and not isinstance(value, list | dict):  # numpy scalars
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _print_json(obj: Any) -> None:
    print(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False))


def _key_doc(key: Key) -> dict[str, Any]:
    return {
        "name": key.name, "key_id": key.key_id, "spec": key.spec.name,
        "purpose": key.purpose.value, "state": key.state.value, "owner": key.owner,
        "exportable": key.exportable, "created_at": key.created_at, "rotated_at": key.rotated_at,
        "rotation_period": _period(key.rotation_period),
        "next_rotation_due": key.next_rotation_due, "deletion_due": key.deletion_due,
        "latest_version": key.latest_version, "min_decryption_version": key.min_decryption_version,
        "min_encryption_version": key.min_encryption_version, "aliases": list(key.aliases),
        "tags": dict(key.tags),
        "versions": [{"version": v.version, "state": v.state, "created_at": v.created_at,
                      "destroyed_at": v.destroyed_at, "hsm_id": v.handle.hex()}
                     for v in sorted(key.versions.values(), key=lambda v: v.version)],
    }


def _read_input(path: str | None, what: str = "input") -> bytes:
    if path is None or path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyLedgerError(f"cannot read {what} file {path!r}: {exc.strerror}") from None


def _check_binary_out(path: str | None, what: str) -> None:
    if (path is None or path == "-") and sys.stdout.isatty():
        raise UsageError(f"refusing to write binary {what} to a terminal; "
                         "use --out FILE or redirect stdout")


def _home_of(args: argparse.Namespace) -> Path:
    """The home ``_open`` opens (its files are never an output)."""
    from .config import default_home

    return Path(args.home).expanduser().absolute() if args.home else default_home()


def _output_target(args: argparse.Namespace) -> Path | None:
    """Check ``--out`` before the operation runs: outside the home (and the PIN file it may
    keep elsewhere), new unless ``--force``."""
    from .config import load_settings

    if args.outfile in (None, "-"):
        return None
    home = _home_of(args)
    settings = load_settings(home)
    protected = outputs.protected_paths(settings) if settings is not None else [home]
    return outputs.check_target(args.outfile, protected, overwrite=args.force,
                                what="output file")


def _write_output(target: Path | None, data: bytes, *, overwrite: bool,
                  private: bool = False) -> None:
    """Write to stdout (``None``) or atomically to a file (mode 0600 when ``private``)."""
    if target is None:
        out: BinaryIO = sys.stdout.buffer
        out.write(data)
        out.flush()
        return
    outputs.write_file(target, data, overwrite=overwrite, private=private)


def _open(args: argparse.Namespace) -> KeyLedger:
    led = open_ledger(args.home, principal=args.principal)
    if not led.last_reconcile.clean and args.command != "init":
        print(f"note: {led.last_reconcile}", file=sys.stderr)
    return led


# -- commands ------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    with _open(args) as led:
        on_open = led.last_reconcile
        full = led.reconcile(full=True)
        caps = led.capabilities()
        home, principal = led.home, led.principal
    repaired = on_open.repaired + full.repaired
    problems = on_open.problems + [p for p in full.problems if p not in on_open.problems]
    if args.json:
        _print_json({
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
        _print_json(_key_doc(key))
    else:
        print(text)
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    tags = _pairs(args.tag, "tag")
    with _open(args) as led:
        key = led.create_key(args.name, spec=args.spec, purpose=args.purpose, owner=args.owner,
                             tags=tags, rotation_period=args.rotation_period,
                             exportable=args.exportable)
    due = when(key.next_rotation_due)
    return _emit_key(args, key, f"created key {_key_line(key)}; next rotation due {due} UTC")


def cmd_key_list(args: argparse.Namespace) -> int:
    with _open(args) as led:
        df = led.list_keys()
    if "note" in df.attrs:  # a simulation home: said on stderr, so --json stays parseable
        print(f"note: {df.attrs['note']} (this home was created as a simulation)",
              file=sys.stderr)
    if args.json:
        _print_json(df.to_dict("records"))
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
    with _open(args) as led:
        key = led.get_key(args.name)
    if args.json:
        _print_json(_key_doc(key))
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
    with _open(args) as led:
        key = led.rotate(args.name)
    return _emit_key(args, key, f"rotated {key.name!r} to version {key.latest_version}; "
                                "older versions still decrypt and verify")


def _state_cmd(method: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        with _open(args) as led:
            key = getattr(led, method)(args.name)
        return _emit_key(args, key, f"key {key.name!r} is now {key.state.value}")
    return run


def cmd_key_schedule_deletion(args: argparse.Namespace) -> int:
    with _open(args) as led:
        key = led.schedule_deletion(args.name, days=args.days)
    return _emit_key(args, key, (
        f"key {key.name!r} is {key.state.value}: it cannot be used now; `keyledger key destroy "
        f"{key.name}` is allowed after {when(key.deletion_due)} UTC; "
        f"`keyledger key cancel-deletion {key.name}` keeps it"))


def cmd_key_cancel_deletion(args: argparse.Namespace) -> int:
    with _open(args) as led:
        key = led.cancel_deletion(args.name)
    return _emit_key(args, key, f"deletion of {key.name!r} cancelled; it is {key.state.value} again")


def cmd_key_destroy(args: argparse.Namespace) -> int:
    with _open(args) as led:
        key = led.destroy(args.name)
    return _emit_key(args, key, f"destroyed the HSM material of all {len(key.versions)} "
                                f"version(s) of {key.name!r}; its metadata stays as destroyed")


def cmd_key_compromised(args: argparse.Namespace) -> int:
    with _open(args) as led:
        key = led.mark_compromised(args.name, args.reason)
    return _emit_key(args, key, (
        f"key {key.name!r} marked compromised: it no longer encrypts or signs, existing data "
        f"still decrypts and verifies; `keyledger key rotate {key.name}` makes a fresh version"))


def cmd_encrypt(args: argparse.Namespace) -> int:
    context = _pairs(args.context, "context key")
    _check_binary_out(args.outfile, "ciphertext")
    target = _output_target(args)
    data = _read_input(args.infile)
    with _open(args) as led:
        blob = led.encrypt(args.name, data, context=context)
    _write_output(target, blob, overwrite=args.force)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    context = _pairs(args.context, "context key")
    target = _output_target(args)
    blob = _read_input(args.infile, "ciphertext")
    with _open(args) as led:
        if args.name is not None:
            expected = led.get_key(args.name)
            try:
                header = ct.parse(blob)[0]
            except InvalidCiphertext:
                header = None  # decrypt below reports (and audits) the malformed input
            if header is not None and header.key_id != expected.key_id:
                raise InvalidCiphertext(f"the ciphertext was not made with key {expected.name!r}")
        plaintext = led.decrypt(blob, context=context)
    _write_output(target, plaintext, overwrite=args.force, private=True)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    _check_binary_out(args.outfile, "signature")
    target = _output_target(args)
    data = _read_input(args.infile)
    with _open(args) as led:
        signature = led.sign(args.name, data)
    _write_output(target, signature, overwrite=args.force)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.signature == "-" and args.infile in (None, "-"):
        raise UsageError("the message and the signature cannot both come from stdin")
    signature = _read_input(args.signature, "signature")
    data = _read_input(args.infile)
    with _open(args) as led:
        valid = led.verify(args.name, data, signature)
    if args.json:
        _print_json({"key": args.name, "valid": valid})
    elif valid:
        print(f"signature valid (key {args.name!r})")
    else:
        print(f"error: signature INVALID: key {args.name!r} did not make this signature over "
              "this data", file=sys.stderr)
    return 0 if valid else 1


def cmd_public_key(args: argparse.Namespace) -> int:
    target = _output_target(args)
    with _open(args) as led:
        pem = led.public_key_pem(args.name, version=args.version)
    if target is None:
        sys.stdout.write(pem)
        sys.stdout.flush()
    else:
        _write_output(target, pem.encode(), overwrite=args.force)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    with _open(args) as led:
        report = led.verify_audit()
    if args.json:
        _print_json({"ok": report.ok, "records": report.records,
                     "checkpoints": report.checkpoints, "problems": report.problems,
                     "first_bad": report.first_bad})
    else:
        print(report)
    return 0 if report.ok else 1


def cmd_audit_accept_unproven(args: argparse.Namespace) -> int:
    with _open(args) as led:
        led.accept_unproven(args.journal, args.through_jseq, args.reason)
    print(f"accepted the unproven records of {args.journal} through {args.through_jseq}")
    return 0


_TAIL_COLUMNS = ["seq", "time", "principal", "action", "key", "version", "outcome", "error",
                 "detail", "context"]


def cmd_audit_tail(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise UsageError("-n must be zero or more")
    with _open(args) as led:  # only the newest n records are read (audit() pages in DuckDB)
        df = led.audit(key=args.key, principal=args.who, action=args.action,
                       outcome=args.outcome, limit=max(args.n, 1))
    df = df.tail(args.n) if args.n else df.iloc[0:0]
    if args.json:
        _print_json([{c: rec.get(c) for c in _TAIL_COLUMNS}
                     for rec in df.to_dict("records")])
        return 0
    rows = []
    for rec in df.to_dict("records"):
        rec = {c: _jsonable(rec.get(c)) for c in _TAIL_COLUMNS}
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
    with _open(args) as led:
        out = led.export_audit(args.path, format=fmt, overwrite=args.force)
    if args.json:
        _print_json({"path": str(out), "format": fmt})
    else:
        kind = "a folder partitioned by day" if fmt == "parquet" else "one JSON record a line"
        print(f"exported the audit ledger to {out} ({fmt}, {kind})")
    return 0


SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")


def cmd_compliance_report(args: argparse.Namespace) -> int:
    suffix = Path(args.path).suffix.lower()
    fmt = args.format or ("md" if suffix in (".md", ".markdown") else "html")
    with _open(args) as led:
        out = led.compliance_report(args.path, format=fmt, frameworks=args.framework or None,
                                    overwrite=args.force)
    if args.json:
        _print_json({"path": str(out), "format": fmt})
    else:
        print(f"wrote the compliance report to {out} ({fmt})")
    return 0


def cmd_compliance_list(args: argparse.Namespace) -> int:
    with _open(args) as led:
        df = led.compliance(frameworks=args.framework or None)
    if args.severity:
        df = df[df["severity"].isin(SEVERITY_ORDER[:SEVERITY_ORDER.index(args.severity) + 1])]
    if args.json:
        _print_json(df.to_dict("records"))
    elif df.empty:
        print("no open findings")
    else:
        rows = [(r.severity, r.rule_id, r.key or "-", "-" if pd.isna(r.version) else r.version,
                 r.principal or "-", r.title) for r in df.itertuples()]
        print(format_table(("SEVERITY", "RULE", "KEY", "VER", "PRINCIPAL", "TITLE"), rows))
    failing = bool(args.fail_on) and bool(
        (df["severity"].map(SEVERITY_ORDER.index) <= SEVERITY_ORDER.index(args.fail_on)).any())
    return 1 if failing else 0


def cmd_compliance_accept(args: argparse.Namespace) -> int:
    with _open(args) as led:
        exc = led.accept_finding(args.rule, None if args.name == "-" else args.name,
                                 args.reason, args.until)
    if args.json:
        _print_json(exc)
    else:
        print(f"accepted {exc['rule_id']} on {exc['key'] or 'the home'} until "
              f"{exc['until']:%Y-%m-%d %H:%M} UTC (exception {exc['exception_id']})")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    with _open(args) as led:
        led.grant(args.name, args.who, args.role)
    where = "every key" if args.name == "*" else f"key {args.name!r}"
    print(f"granted {args.role} on {where} to {args.who}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with _open(args) as led:
        removed = led.revoke(args.name, args.who, args.role)
    print(f"revoked {removed} grant(s) of {args.who} on {args.name}")
    return 0 if removed else 1


def _frame_out(args: argparse.Namespace, df: pd.DataFrame, empty: str) -> int:
    if args.json:
        _print_json(df.to_dict("records"))
    elif df.empty:
        print(empty)
    else:
        rows = [tuple(_jsonable(v) for v in r) for r in df.itertuples(index=False)]
        print(format_table(tuple(c.upper() for c in df.columns), rows))
    return 0


def cmd_grants(args: argparse.Namespace) -> int:
    with _open(args) as led:
        df = led.grants(args.name)
    return _frame_out(args, df[["key", "principal", "role", "granted_by", "granted_at"]],
                      "no grants")


def cmd_request(args: argparse.Namespace) -> int:
    with _open(args) as led:
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
        _print_json({"request_id": request_id, "status": status["status"],
                     "quorum": int(status["quorum"])})
    elif status["status"] == "executed":
        print(f"request {request_id}: {args.action} {args.name} executed (quorum 1)")
    else:
        print(f"request {request_id}: waiting for {int(status['quorum']) - 1} more approval(s); "
              f"other admins run `keyledger approve {request_id}`")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    with _open(args) as led:
        result = led.approve(args.request_id)
    if args.json:
        _print_json(result)
    elif result["executed"]:
        print(f"request {args.request_id}: quorum met ({result['approvals']} of "
              f"{result['quorum']}); executed")
    else:
        print(f"request {args.request_id}: {result['approvals']} of {result['quorum']} "
              "approvals")
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    with _open(args) as led:
        df = led.requests(args.status)
    cols = ["request_id", "action", "key", "status", "quorum", "approvers", "requested_by",
            "expires_at", "reason"]
    return _frame_out(args, df[cols], "no approval requests")


def cmd_acknowledge(args: argparse.Namespace) -> int:
    from .governance import CUSTODIAN_STATEMENT

    with _open(args) as led:
        led.acknowledge_custody()
    print(f"recorded: {led.principal} accepts: {CUSTODIAN_STATEMENT}")
    return 0


def cmd_run_due(args: argparse.Namespace) -> int:
    with _open(args) as led:
        report = led.run_due()
    if args.json:
        _print_json({"now": report.now, "done": report.done, "skipped": report.skipped,
                     "compliance": report.compliance})
    else:
        print(report)
    return 0


def cmd_key_trim(args: argparse.Namespace) -> int:
    with _open(args) as led:
        key = led.trim(args.name, args.min_version)
    return _emit_key(args, key, f"destroyed the material of versions below {args.min_version} "
                                f"of {key.name!r}; they can no longer decrypt")


def cmd_key_usage(args: argparse.Namespace) -> int:
    with _open(args) as led:
        df = led.version_usage(args.name)
    return _frame_out(args, df, "no versions")


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
    with _open(args) as led:
        info = led.backup(args.path, passphrase=passphrase, overwrite=args.force)
    if args.json:
        _print_json({k: getattr(info, k) for k in ("path", "bytes", "sha256", "created_at",
                                                   "files", "audit_records", "keys")})
    else:
        print(info)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .backup import restore

    if not args.home:
        raise UsageError("restore needs --home NEW_EMPTY_DIR")
    led = restore(args.path, args.home, passphrase=_passphrase(confirm=False),
                  principal=args.principal)
    with led:
        print(f"restored {args.path} into {led.home}; {led.verify_audit()}")
    return 0


def cmd_restore_test(args: argparse.Namespace) -> int:
    with _open(args) as led:
        report = led.restore_test(args.path, passphrase=_passphrase(confirm=False))
    print(report)
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    if args.tour:
        with _open(args) as led:
            result = run_tour(led, echo=print)
        return 0 if result.audit_ok else 1
    from .config import default_home

    if args.principal:
        raise UsageError("the demo estate has fixed principals; --principal applies to --tour")
    result = seed_demo(args.home or default_home(), keys=args.keys, months=args.months,
                       seed=args.seed, progress=not args.no_progress, force=args.force,
                       echo=print)
    return 1 if result.unexpected else 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard.serve import serve

    home = _home_of(args)
    if not (home / "keyledger.toml").exists():
        raise ConfigError(f"{home} is not a keyledger home yet; create one with `keyledger init` "
                          f"or seed a demo with `keyledger demo --home {home}`")
    _print_demo_principals(home, args.principal)
    panel_args = list(args.panel_args or [])
    if panel_args[:1] == ["--"]:
        panel_args = panel_args[1:]
    return serve(home, address=args.address, port=args.port, principal=args.principal,
                 basic_auth=args.basic_auth, cookie_secret=args.cookie_secret,
                 allow_origin=args.allow_websocket_origin, show=args.show,
                 panel_args=panel_args)


def _print_demo_principals(home: Path, principal: str | None) -> None:
    """A seeded demo home names its principals: say who the dashboard acts as."""
    try:
        doc = json.loads((home / DEMO_FILE).read_text())
    except (OSError, ValueError):
        return
    people = [p for p in doc.get("principals", []) if isinstance(p, dict)]
    if people:
        print(f"demo principals: {', '.join(p['name'] for p in people[:6])}, ... "
              f"({len(people)} in {home / DEMO_FILE})")
    if principal:
        roles = next((p.get("roles") for p in people if p.get("name") == principal), None)
        print(f"signed in as {principal}" + (f" ({', '.join(roles)})" if roles else ""))


def _bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, not {value}")
        return value
    return parse


# -- parser --------------------------------------------------------------------------------------
def _globals(json_flag: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command. SUPPRESS keeps a later default from
    overwriting a value given earlier on the line."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS,
                   help="keyledger home (default: $KEYLEDGER_HOME or ./.keyledger)")
    g.add_argument("--principal", metavar="NAME", default=argparse.SUPPRESS,
                   help="who is acting, as recorded in the audit ledger (default: OS user)")
    if json_flag:
        g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print machine-readable JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--tag", type=_pair, action="append", metavar="K=V",
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

    p = add(sub, "encrypt", cmd_encrypt, "encrypt data with a key (AES-GCM in the HSM)")
    p.add_argument("name")
    _io(p)
    p.add_argument("--context", type=_pair, action="append", metavar="K=V",
                   help="encryption context, bound to the ciphertext (repeatable)")
    p = add(sub, "decrypt", cmd_decrypt,
            "decrypt a keyledger ciphertext (the key is named in the ciphertext)")
    p.add_argument("name", nargs="?",
                   help="optional: fail unless the ciphertext was made with this key")
    _io(p)
    p.add_argument("--context", type=_pair, action="append", metavar="K=V",
                   help="the encryption context used when encrypting (repeatable)")
    p = add(sub, "sign", cmd_sign, "sign data with a signing key")
    p.add_argument("name")
    _io(p, out_help="signature file (default: stdout, raw bytes)")
    p = add(sub, "verify", cmd_verify, "verify a signature (exit 0 valid, 1 invalid)",
            json_flag=True)
    p.add_argument("name")
    p.add_argument("--in", dest="infile", metavar="FILE", help="the signed data (default: stdin)")
    p.add_argument("--signature", required=True, metavar="SIGFILE", help="the signature file")
    p = add(sub, "public-key", cmd_public_key, "print a signing key's public key (PEM)")
    p.add_argument("name")
    p.add_argument("--version", type=int, help="key version (default: latest)")
    p.add_argument("--out", dest="outfile", metavar="FILE", help="write to FILE (default: stdout)")
    _force(p, "an existing --out file")

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
    _force(p, "an existing file (or a folder holding an earlier Parquet export)")

    comp = sub.add_parser("compliance", help="evaluate compliance rules, report, accept findings",
                          description="evaluate compliance rules, report, accept findings")
    csub = comp.add_subparsers(dest="compliance_command", metavar="ACTION", required=True)
    p = add(csub, "report", cmd_compliance_report,
            "evaluate and write an HTML or Markdown report for auditors", json_flag=True)
    p.add_argument("path")
    p.add_argument("--format", choices=["html", "md"])
    p.add_argument("--framework", action="append", metavar="NAME")
    _force(p, "an existing file")
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

    p = add(sub, "backup", cmd_backup, "write an encrypted snapshot of the home (passphrase "
            "from $KEYLEDGER_BACKUP_PASSPHRASE or asked)", json_flag=True)
    p.add_argument("path")
    _force(p, "an existing file, once the new backup is complete")
    add(sub, "restore", cmd_restore, "restore a backup into a new empty --home").add_argument(
        "path")
    add(sub, "restore-test", cmd_restore_test, "restore a backup in a scratch home, check it "
        "works and record the test (exit 1 if it does not)").add_argument("path")

    p = add(sub, "demo", cmd_demo, "seed a demo estate: ~150 keys, 8 teams, 18 months of history "
            "(once per home; --tour: the short scripted lifecycle tour)")
    p.add_argument("--keys", type=_bounded_int(MIN_KEYS, MAX_KEYS), default=150, metavar="N",
                   help="keys in the estate (default 150)")
    p.add_argument("--months", type=_bounded_int(MIN_MONTHS, MAX_MONTHS), default=18, metavar="M",
                   help="months of simulated history, ending now (default 18)")
    p.add_argument("--seed", type=int, default=7, metavar="S",
                   help="random seed: the same seed gives the same estate (default 7)")
    p.add_argument("--force", action="store_true",
                   help="delete an existing demo home (one with demo.json) and seed it again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--tour", action="store_true",
                   help="run the short scripted tour of the key lifecycle instead (re-runnable)")

    p = add(sub, "dashboard", cmd_dashboard, "serve the Panel dashboard (prints the URL; Ctrl-C "
            "stops it); no login on 127.0.0.1, basic auth or OAuth required elsewhere")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs a login)")
    p.add_argument("--port", type=_bounded_int(1, 65535), default=5006,
                   help="port (default 5006)")
    p.add_argument("--basic-auth", metavar="FILE",
                   help="JSON file of user: password (mode 0600) for Panel's basic auth")
    p.add_argument("--cookie-secret", metavar="S",
                   help="cookie secret for the login session (default: generated per run)")
    p.add_argument("--allow-websocket-origin", action="append", metavar="HOST:PORT",
                   help="extra origin allowed to connect (repeatable)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.add_argument("panel_args", nargs=argparse.REMAINDER,
                   help="after --: options passed to `panel serve`, e.g. --oauth-provider")
    return parser


def _io(p: argparse.ArgumentParser, out_help: str = "output file (default: stdout)") -> None:
    p.add_argument("--in", dest="infile", metavar="FILE", help="input file, or - for stdin "
                   "(default: stdin)")
    p.add_argument("--out", dest="outfile", metavar="FILE", help=out_help)
    _force(p, "an existing --out file")


def _force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} (outputs are never "
                   "written inside the home)")


def _command_name(args: argparse.Namespace) -> str:
    parts = [args.command, getattr(args, "key_command", None), getattr(args, "audit_command", None),
             getattr(args, "compliance_command", None)]
    return " ".join(p for p in parts if p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    for name, default in (("home", None), ("principal", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        if args.json and not args.json_ok:
            raise UsageError(f"--json does not apply to `{_command_name(args)}`")
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


if __name__ == "__main__":
    sys.exit(main())
