"""The restore test's child process: ``python -m keyledger.backup.restore_test``.

A process uses one SoftHSM2 configuration, so a backup is test-restored in a process of its
own. Arguments: archive, temporary home, principal, result file, sample size; the passphrase
comes on stdin (hex), never on the command line. The result (a ``RestoreTestReport`` as a
dict) is written to the result file as JSON.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from ..errors import KeyLedgerError
from ..hsm.backend import HsmBackend
from ..model import Family, parse_spec
from ..runtime import HomeRuntime
from ..services.context import Context
from ..services.home import HomeService
from ..store.verify import verify as verify_ledger
from .archive import sql_count
from .restore import Restored, restore_files


def main(argv: list[str], secret_hex: str) -> None:
    src, home, principal, result_path, sample = argv
    result = _restore_test(src, home, principal, bytes.fromhex(secret_hex.strip()), int(sample))
    Path(result_path).write_text(json.dumps(result, default=str))


def _restore_test(src: str, home: str, principal: str, secret: bytes,
                  sample: int) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "archive": src, "problems": [], "missing": []}
    try:
        restored = restore_files(src, home, secret)
        out.update(sha256=restored.sha256, bytes=restored.bytes,
                   backup_time=restored.manifest.get("created_at"))
        rt = HomeRuntime.acquire(restored.home)
    except KeyLedgerError as exc:
        out["problems"].append(f"{type(exc).__name__}: {exc}")
        return out
    try:
        try:  # opened as KeyLedger opens a home: first admin, repairs (the services' open)
            ctx = Context(restored.home, principal, rt)
            out["reconcile"] = str(HomeService(ctx).open(None))
        except KeyLedgerError as exc:
            out["problems"].append(f"{type(exc).__name__}: {exc}")
            return out
        _check_restored(rt, restored, sample, out)
    finally:
        rt.release()
    out["ok"] = bool(out.get("audit_ok")) and not out["problems"]
    return out


def _check_restored(rt: HomeRuntime, restored: Restored, sample: int, out: dict[str, Any]
                    ) -> None:
    """Into ``out``: does the restored ledger verify, and do sampled versions work?"""
    try:
        rt.ingest()
    except KeyLedgerError as exc:
        out["problems"].append(f"ingest: {exc}")
    head = rt.audit_head()
    with rt.db.write() as tx:
        report = verify_ledger(tx, rt.verify_checkpoint, head)
        rows = tx.execute(
            """SELECT k.name, k.spec, v.version, v.handle FROM versions v
               JOIN keys k USING (key_id)
               WHERE v.state <> 'destroyed' AND k.state <> 'destroyed'""").fetchall()
        keys = sql_count(tx, "SELECT count(*) FROM keys WHERE state <> 'destroyed'")
    out.update(audit_ok=report.ok, audit_records=report.records, keys=keys,
               versions=len(rows))
    out["problems"] += [f"audit: {p}" for p in report.problems]
    expected = restored.manifest.get("audit_records", 0)
    if report.records < expected:
        out["problems"].append(f"the restored ledger has {report.records} records, the "
                               f"backup had {expected}")
    if keys != restored.manifest.get("keys", keys):
        out["problems"].append(f"{keys} keys restored, the backup had "
                               f"{restored.manifest.get('keys')}")
    chosen = random.sample(rows, min(sample, len(rows)))
    for name, spec_name, version, handle in chosen:
        problem = _probe(rt.backend, spec_name, bytes.fromhex(handle))
        if problem:
            out["missing"].append(f"{name} v{version}")
            out["problems"].append(f"{name} v{version}: {problem}")
    out["versions_checked"] = len(chosen)


def _probe(backend: HsmBackend, spec_name: str, handle: bytes) -> str | None:
    """None if the version's material is in the token and works, else what is wrong."""
    spec = parse_spec(spec_name)
    msg = b"keyledger restore test"
    try:
        if not backend.exists(handle):
            return "material missing from the restored token"
        if spec.family is Family.AES:
            nonce = os.urandom(12)
            body = backend.encrypt_gcm(handle, nonce, b"", msg)
            ok = backend.decrypt_gcm(handle, nonce, b"", body) == msg
        elif spec.family is Family.HMAC:
            ok = backend.verify_mac(handle, msg, backend.mac(handle, msg))
        else:
            ok = backend.verify(spec, handle, msg, backend.sign(spec, handle, msg))
    except Exception as exc:  # report, never crash the test run
        return f"{type(exc).__name__}: {exc}"
    return None if ok else "the material does not work"


if __name__ == "__main__":
    main(sys.argv[1:], sys.stdin.read())
