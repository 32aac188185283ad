"""Rotation and use of one key from several processes at once: no call fails.

Two processes encrypt with ``k0`` and rotate it every ``ROTATE_EVERY`` calls until each has
rotated it ``ROTATIONS`` times; a third one encrypts and decrypts with it (so it keeps meeting
versions another process just made) and reads its metadata until both are done. Each is a real
process with its own PKCS#11 login and journal. The run is a fixed amount of work, not a fixed
time: on a busy machine a timed run did whatever the cores allowed (20 s each of three
processes and 110,000 ciphertexts to decrypt afterwards when alone), and none of it added an
interleaving the fixed count does not already give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from proc_support import Zygote, zygote_fixture

import keyledger as kl

# the three processes are forked from this module's zygote (tests/proc_support.py), each a
# separate process with its own login and journal, without an interpreter start of its own
zygote = zygote_fixture()
ROTATIONS = int(os.environ.get("KEYLEDGER_TEST_ROTATIONS", "25"))  # by each of r1 and r2
ROTATE_EVERY = 100
READER_LIMIT_S = 600  # the reader stops by itself if the test never tells it to

_WORKER = """
import json, os, sys, time
import keyledger as kl
home, who, rotations, rotate_every, out, stop, limit_s = (
    sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6],
    float(sys.argv[7]))
calls, errors, made, rotated = 0, [], [], []
def call(fn, *args, **kwargs):
    global calls
    calls += 1
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
        return None
calls += 1
led = kl.open(home, principal=who)
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + limit_s
i = 0
# a rotator: until it has rotated `rotations` times; the reader: until the test makes `stop`
while (i < rotations * rotate_every if rotate_every
       else not os.path.exists(stop) and time.monotonic() < deadline):
    i += 1
    ctx = {"who": who, "i": str(i)}
    blob = call(led.encrypt, "k0", b"secret %d" % i, context=ctx)
    if blob is not None:
        made.append([blob.hex(), i])
    if rotate_every and i % rotate_every == 0:
        key = call(led.rotate, "k0")
        if key is not None:
            rotated.append(key.latest_version)
    if not rotate_every:  # the reader: decrypt what it just made, read the key now and then
        if blob is not None and call(led.decrypt, blob, context=ctx) != b"secret %d" % i:
            errors.append(f"round trip {i} failed")
        if i % 50 == 0:
            call(led.get_key, "k0")
led.close()
with open(out, "w") as fh:
    json.dump(made, fh)
print(json.dumps({"calls": calls, "errors": errors, "pid": os.getpid(), "rotated": rotated,
                  "encrypts": len(made)}))
"""


def _spawn(zygote: Zygote, code: str, *args: str) -> subprocess.Popen:
    return zygote.popen([sys.executable, "-c", textwrap.dedent(code), *args],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)


def _ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        pytest.fail(f"child said {line!r}; stderr:\n{proc.communicate(timeout=30)[1]}")


@pytest.fixture(scope="module")
def rotation_run(tmp_path_factory, zygote):
    """r1 and r2 encrypt and rotate k0 ROTATIONS times each; meanwhile reader encrypts,
    decrypts and reads it, until both are done."""
    base = tmp_path_factory.mktemp("rotation")
    home, stop = base / "home", base / "stop"
    with kl.open(home, principal="setup") as led:
        led.create_key("k0", spec="AES_256")
        for who in ("r1", "r2"):
            led.grant("*", who, "admin")
            led.grant("*", who, "user")
        led.grant("*", "reader", "user")
        led.grant("*", "auditor", "auditor")
        led.grant("*", "auditor", "user")
    procs = {}
    try:
        for who, every in (("r1", ROTATE_EVERY), ("r2", ROTATE_EVERY), ("reader", 0)):
            procs[who] = _spawn(zygote, _WORKER, str(home), who, str(ROTATIONS), str(every),
                                str(base / f"{who}.json"), str(stop), str(READER_LIMIT_S))
        for proc in procs.values():
            _ready(proc)
        for proc in procs.values():
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = {}
        for who, proc in procs.items():
            if who == "reader":  # the rotators are done: the reader stops at its next call
                stop.touch()
            out, err = proc.communicate(timeout=READER_LIMIT_S + 60)
            assert proc.returncode == 0, f"{who} crashed:\n{err}"
            results[who] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    made = {who: json.loads((base / f"{who}.json").read_text()) for who in procs}
    return home, results, made


@pytest.mark.slow
def test_concurrent_rotation_and_use_make_no_errors(rotation_run):
    _, results, _ = rotation_run
    for who, res in results.items():
        assert res["errors"] == [], f"{who}: {len(res['errors'])} errors, e.g. {res['errors'][:5]}"
    assert len(results["r1"]["rotated"]) == len(results["r2"]["rotated"]) == ROTATIONS
    assert results["reader"]["encrypts"] > 0


@pytest.mark.slow
def test_concurrent_rotation_audits_every_call_once(rotation_run):
    home, results, _ = rotation_run
    with kl.open(home, principal="auditor") as led:
        df = led.audit(limit=None)
        report = led.verify_audit()
        key = led.get_key("k0")
    assert report.ok, str(report)
    counts = df.groupby(["principal", "pid"]).size().to_dict()
    for who, res in results.items():
        assert counts.get((who, res["pid"]), 0) == res["calls"], who
        assert set(df[df["principal"] == who]["outcome"]) == {"ok"}, who
    # each rotate() made exactly one version: none lost, none made twice, none shared
    returned = results["r1"]["rotated"] + results["r2"]["rotated"]
    assert sorted(returned) == list(range(2, key.latest_version + 1))
    rotations = df[df["action"] == "rotate"]
    assert sorted(rotations["version"]) == sorted(returned)


@pytest.mark.slow
def test_every_returned_ciphertext_decrypts_afterwards(rotation_run):
    home, _, made = rotation_run
    with kl.open(home, principal="auditor") as led:
        for who, items in made.items():
            for blob, i in items:
                got = led.decrypt(bytes.fromhex(blob), context={"who": who, "i": str(i)})
                assert got == b"secret %d" % i, (who, i)
