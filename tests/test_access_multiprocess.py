"""Access changes reach other processes within the documented bound.

Each process keeps the catalog (keys and grants) in memory and reloads ``catalog.json`` when it
changes, checking at most every ``catalog_refresh_ms`` (100 ms by default). A revocation in one
process must therefore stop another process's crypto calls within that bound; the child here
polls for up to 2 s (20x the bound) so a slow machine does not make the test flaky.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import keyledger as kl

POLL_S = 2.0

# Encrypts in a loop as "bob". Prints "ready" once it has succeeded a few times, then reads
# the parent's "revoked" line (without blocking the loop) and reports when it was refused.
_CHILD = textwrap.dedent("""
    import json, select, sys, time
    import keyledger as kl
    led = kl.open(sys.argv[1], principal="bob")
    ok_before, ok_after, signalled, ready = 0, 0, None, False
    result = {}
    while True:
        if signalled is None and select.select([sys.stdin], [], [], 0)[0]:
            sys.stdin.readline()
            signalled = time.monotonic()
        try:
            led.encrypt("k", b"payload", context={"n": str(ok_before + ok_after)})
        except kl.AccessDenied as exc:
            now = time.monotonic()
            result = {"denied": True, "message": str(exc), "ok_before": ok_before,
                      "ok_after": ok_after,
                      "after_signal_s": None if signalled is None else now - signalled}
            break
        if signalled is None:
            ok_before += 1
        else:
            ok_after += 1
            if time.monotonic() - signalled > %(poll)r:
                result = {"denied": False, "ok_before": ok_before, "ok_after": ok_after}
                break
        if not ready and ok_before >= 20:
            ready = True
            print("ready", flush=True)
        time.sleep(0.002)
    still = 0
    for _ in range(5):  # once refused, refused for good
        try:
            led.encrypt("k", b"payload")
            still += 1
        except kl.AccessDenied:
            pass
    result["allowed_again"] = still
    led.close()
    print(json.dumps(result), flush=True)
""") % {"poll": POLL_S}


def test_revocation_reaches_another_process_within_the_bound(home: Path) -> None:
    with kl.open(home, principal="alice") as alice:
        alice.create_key("k", spec="AES_256")
        alice.grant("k", "bob", "user")
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(home)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            if line.strip() != "ready":
                child.kill()
                pytest.fail(f"child said {line!r}; stderr:\n{child.communicate(timeout=30)[1]}")
            assert alice.revoke("k", "bob", "user") == 1
            child.stdin.write("revoked\n")
            child.stdin.flush()
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate(timeout=30)
        assert child.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report["ok_before"] >= 20, "bob was allowed before the revocation"
        assert report["denied"], f"bob was still allowed {POLL_S} s after the revocation: {report}"
        assert report["allowed_again"] == 0, report
        assert "'bob'" in report["message"] and "'k'" in report["message"]
        assert "user" in report["message"]
        # the child's refusals are in the ledger, as bob's, with the key named
        denied = alice.audit(principal="bob", action="encrypt", outcome="denied")
        assert len(denied) == 1 + 5
        assert set(denied["error"]) == {"AccessDenied"} and set(denied["key"]) == {"k"}
        ok = alice.audit(principal="bob", action="encrypt", outcome="ok")
        assert len(ok) == report["ok_before"] + report["ok_after"]
        assert alice.verify_audit().ok
