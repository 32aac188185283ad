"""Crash consistency (DESIGN invariant 4): SIGKILL at every step of every HSM change.

For each fault point of ``keyledger.intents`` (every kind of change x every step: create,
rotate, import, destroy, trim), a child process performs the operation with
``KEYLEDGER_FAULT`` set and is killed right there. Before reopening, the HSM token is inspected
with ``pkcs11-tool`` to prove the kill happened at that step (e.g. an orphan object exists).
Then the home is reopened: the open reports the repair, the catalog and the HSM agree, a full
reconcile finds nothing more, every earlier ciphertext still decrypts (a destroyed key's are
refused), the operation can be done again, the audit chain verifies and the child's audit
record of a call that returned before the kill is not lost (invariant 6).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import FakeClock, HomeTemplate, copy_home, verify_after_kill
from conftest import hsm_labels as token_labels
from proc_support import Zygote, zygote_fixture

import keyledger as kl
from keyledger import intents

pytestmark = pytest.mark.slow

# the children are forked from this module's zygote (tests/proc_support.py): each is a real,
# separate process that the fault point SIGKILLs, without an interpreter start of its own
zygote = zygote_fixture()

DOCS = Path(__file__).resolve().parent.parent / "docs"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "keyledger"

# every kind of HSM change x every step it has: one HSM call (after_intent, after_hsm) or one
# call per object (destroy, trim: also after_first_object)
MULTI_OBJECT = {"destroy", "trim"}
POINTS = [f"{kind}:{step}" for kind in intents.KINDS for step in intents.STEPS
          if step != "after_first_object" or kind in MULTI_OBJECT]

CHILD = """
import sys
from datetime import datetime
import keyledger as kl

home, op, now = sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3])
wrapped, token = sys.argv[4], sys.argv[5]  # for op == "import"
led = kl.open(home, principal="alice", clock=lambda: now)
blob = led.encrypt("other", b"written by the child", context={"from": "child"})
print(blob.hex(), flush=True)  # returned to its caller: its audit record must survive the kill
if op == "create":
    led.create_key("fresh", spec="AES_256")
elif op == "rotate":
    led.rotate("target")
elif op == "trim":
    led.trim("target", 3)
elif op == "import":
    led.import_key("fresh", spec="AES_256", wrapped=bytes.fromhex(wrapped), token=token)
else:
    led.destroy("target")
print("NOT KILLED", flush=True)
"""


def hsm_labels(home: Path) -> list[str]:
    """Every object label on the home's token, as pkcs11-tool lists them."""
    return token_labels(home, prefix="")


def key_labels(home: Path, name: str) -> set[str]:
    return {label for label in hsm_labels(home) if label.startswith(f"kl:{name}:")}


def _setup(home: Path, clock, op: str) -> dict[str, object]:
    """Keys and ciphertexts made before the crash; returns what the test checks later."""
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("target", spec="AES_256")
        target_v1 = led.encrypt("target", b"target v1", context={"n": "1"})
        led.rotate("target")
        target_v2 = led.encrypt("target", b"target v2")
        led.create_key("other", spec="AES_256")
        other = led.encrypt("other", b"other data", context={"tenant": "acme"})
        extra: dict[str, object] = {}
        if op == "trim":  # v1 and v2 go: two objects, so a kill after the first is possible
            led.rotate("target")
        elif op == "import":
            params = led.import_parameters("fresh")
            extra = {"material": os.urandom(32), "token": params["token"]}
            extra["wrapped"] = _wrap_for_import(params, extra["material"])
        elif op == "destroy":
            led.create_key("spare", spec="AES_128")
            for name in ("target", "spare"):
                led.schedule_deletion(name, days=7)
            clock.advance(days=8)  # past the waiting period (the child gets this time too)
            with pytest.raises(kl.KeyStateError):
                led.decrypt(target_v1, context={"n": "1"})  # pending deletion blocks use
    return {
        "target": [(target_v1, {"n": "1"}, b"target v1"), (target_v2, None, b"target v2")],
        "other": [(other, {"tenant": "acme"}, b"other data")],
        **extra,
    }


@pytest.fixture(scope="module")
def set_up(tmp_path_factory):
    """``set_up(home, clock, op)``: the home ``_setup(home, clock, op)`` makes (with an RSA key
    "signer" too if ``signer``), its ciphertexts, and ``clock`` moved as ``_setup`` moves it. The
    home is set up once per kind in this module and copied for each test (conftest.copy_home:
    an independent home of its own, with its own token files)."""
    made: dict[tuple[str, bool], tuple[Path, dict[str, object], float]] = {}

    def set_up(home: Path, clock: FakeClock, op: str, signer: bool = False) -> dict[str, object]:
        if (op, signer) not in made:
            path = tmp_path_factory.mktemp(f"{op}-set-up") / "home"
            own_clock = FakeClock(clock())
            before = _setup(path, own_clock, op)
            if signer:
                with kl.open(path, principal="alice", clock=own_clock) as led:
                    led.create_key("signer", spec="RSA_2048")
            made[op, signer] = (path, before, (own_clock() - clock()).total_seconds())
        path, before, moved = made[op, signer]
        copy_home(HomeTemplate(path, None), home)
        clock.advance(seconds=moved)
        return copy.deepcopy(before)

    return set_up


def _wrap_for_import(params: dict, material: bytes) -> bytes:
    """The customer's side of an import, as docs/byok.md prints it."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "byok.md").read_text(), re.S)
    scope: dict = {}
    exec(textwrap.dedent(next(b for b in blocks if "def wrap_for_import" in b)), scope)
    return scope["wrap_for_import"](params, material)


def _check_hsm_at_kill(home: Path, point: str) -> None:
    """The token as the killed child left it: proves the kill happened at that step."""
    target = key_labels(home, "target")
    if point in ("create:after_intent", "import:after_intent"):
        assert key_labels(home, "fresh") == set()
    elif point in ("create:after_hsm", "import:after_hsm"):
        assert key_labels(home, "fresh") == {"kl:fresh:v1"}  # an orphan the catalog lacks
    elif point == "rotate:after_intent":
        assert target == {"kl:target:v1", "kl:target:v2"}
    elif point == "rotate:after_hsm":
        assert target == {"kl:target:v1", "kl:target:v2", "kl:target:v3"}  # orphan v3
    elif point == "destroy:after_intent":
        assert target == {"kl:target:v1", "kl:target:v2"}
    elif point == "destroy:after_first_object":
        assert len(target) == 1  # one of the two versions is gone, the catalog says nothing
    elif point == "destroy:after_hsm":
        assert target == set()  # all material gone, the catalog still lists the versions
    elif point == "trim:after_intent":
        assert target == {"kl:target:v1", "kl:target:v2", "kl:target:v3"}
    elif point == "trim:after_first_object":
        assert len(target) == 2 and "kl:target:v3" in target  # one of v1, v2 is gone
    elif point == "trim:after_hsm":
        assert target == {"kl:target:v3"}
    assert key_labels(home, "other") == {"kl:other:v1"}


@pytest.mark.parametrize("point", POINTS)
def test_crash_is_reconciled_on_next_open(home, clock, zygote, set_up, point):
    op = point.split(":")[0]
    before = set_up(home, clock, op)

    proc = subprocess_child(zygote, home, op, clock(), point, before)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    out = proc.stdout.split()
    assert "NOT" not in out and len(out) == 1
    child_blob = bytes.fromhex(out[0])

    _check_hsm_at_kill(home, point)

    with kl.open(home, principal="alice", clock=clock) as led:
        report = led.last_reconcile
        assert not report.clean and report.problems == [] and len(report.repaired) == 1
        text = str(report)
        # the repair is reported to the caller and recorded in the audit log of the open
        opens = led.audit(action="open")
        repaired = opens[opens["detail"].str.contains("interrupted", na=False)]
        assert len(repaired) == 1 and text in repaired["detail"].iloc[0]
        assert repaired["pid"].iloc[0] == os.getpid() and repaired["outcome"].iloc[0] == "ok"

        if op == "create":
            assert "rolled back interrupted key creation" in text
            with pytest.raises(kl.KeyNotFound):
                led.get_key("fresh")
            assert "fresh" not in set(led.list_keys()["name"])
            assert key_labels(home, "fresh") == set()
        elif op == "import":
            assert "rolled back interrupted import of 'fresh'" in text
            with pytest.raises(kl.KeyNotFound):
                led.get_key("fresh")
            assert key_labels(home, "fresh") == set()
        elif op == "trim":
            assert "completed interrupted trim of 'target'" in text
            key = led.get_key("target")
            assert key.min_decryption_version == 3 and key.min_encryption_version == 3
            assert {n: v.state for n, v in key.versions.items()} == {
                1: "destroyed", 2: "destroyed", 3: "active"}
            assert key_labels(home, "target") == {"kl:target:v3"}
        elif op == "rotate":
            assert "rolled back interrupted rotation to v3 of 'target'" in text
            key = led.get_key("target")
            assert key.latest_version == 2 and sorted(key.versions) == [1, 2]
            assert key.state is kl.KeyState.ACTIVE
            assert key_labels(home, "target") == {"kl:target:v1", "kl:target:v2"}
        else:
            assert "completed interrupted destruction of 'target'" in text
            key = led.get_key("target")
            assert key.state is kl.KeyState.DESTROYED
            assert {v.state for v in key.versions.values()} == {"destroyed"}
            assert key_labels(home, "target") == set()
            assert led.get_key("spare").state is kl.KeyState.PENDING_DELETION

        full = led.reconcile(full=True)
        assert full.clean, str(full)
        assert led.last_reconcile is report  # the open's report is kept for the caller

        # earlier ciphertexts (including the child's, returned before the kill)
        assert led.decrypt(child_blob, context={"from": "child"}) == b"written by the child"
        for blob, ctx, plain in before["other"]:
            assert led.decrypt(blob, context=ctx) == plain
        for blob, ctx, plain in before["target"]:
            if op in ("destroy", "trim"):
                with pytest.raises(kl.KeyStateError, match="destroyed"):
                    led.decrypt(blob, context=ctx)
            else:
                assert led.decrypt(blob, context=ctx) == plain

        # the interrupted operation can be done again
        if op == "create":
            fresh = led.create_key("fresh", spec="AES_256")
            assert fresh.latest_version == 1
            assert led.decrypt(led.encrypt("fresh", b"again")) == b"again"
            assert key_labels(home, "fresh") == {"kl:fresh:v1"}
        elif op == "import":  # with the same token: the rolled-back import did not use it
            fresh = led.import_key("fresh", spec="AES_256", wrapped=before["wrapped"],
                                   token=before["token"])
            assert fresh.latest_version == 1
            assert led.decrypt(led.encrypt("fresh", b"again")) == b"again"
            assert key_labels(home, "fresh") == {"kl:fresh:v1"}
        elif op == "trim":  # trimming again changes nothing; the remaining version works
            assert led.trim("target", 3).min_decryption_version == 3
            assert led.decrypt(led.encrypt("target", b"v3 data")) == b"v3 data"
            assert key_labels(home, "target") == {"kl:target:v3"}
        elif op == "rotate":
            assert led.rotate("target").latest_version == 3
            new = led.encrypt("target", b"v3 data")
            assert led.decrypt(new) == b"v3 data"
            for blob, ctx, plain in before["target"]:
                assert led.decrypt(blob, context=ctx) == plain
            assert key_labels(home, "target") == {"kl:target:v1", "kl:target:v2",
                                                  "kl:target:v3"}
        else:
            # reconcile finished the destroy; doing it again is refused with a clear reason,
            # and the destroy path itself still works for the other scheduled key
            with pytest.raises(kl.KeyStateError, match="destroyed"):
                led.destroy("target")
            assert led.destroy("spare").state is kl.KeyState.DESTROYED
            assert key_labels(home, "spare") == set()
        assert led.reconcile(full=True).clean

        # audit: the child's completed encrypt was not lost, and the chain is intact (the
        # child's unsealed tail accepted)
        child_rows = led.audit(action="encrypt", key="other")
        child_rows = child_rows[child_rows["context"] == '{"from":"child"}']
        assert list(child_rows["outcome"]) == ["ok"]
        assert child_rows["pid"].iloc[0] != os.getpid()
        verify_after_kill(led, int(child_rows["pid"].iloc[0]))

    # and the next open finds nothing left to repair
    with kl.open(home, principal="alice", clock=clock) as led:
        assert led.last_reconcile.clean


def subprocess_child(zygote: Zygote, home: Path, op: str, now: datetime, point: str,
                     before: dict[str, object] | None = None):
    wrapped = before["wrapped"].hex() if before and "wrapped" in before else ""
    token = before["token"] if before and "token" in before else ""
    code = (f"import sys; sys.argv = ['-', {str(home)!r}, {op!r}, {now.isoformat()!r}, "
            f"{wrapped!r}, {token!r}]\n" + CHILD)
    return zygote.run_python(code, env={"KEYLEDGER_FAULT": point})


def test_fault_hook_is_inert_without_the_variable(home, clock, zygote, set_up):
    """Control: the same child with no fault set completes and prints its marker."""
    set_up(home, clock, "rotate")
    proc = subprocess_child(zygote, home, "rotate", clock(), "")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["NOT", "KILLED"]
    with kl.open(home, principal="alice", clock=clock) as led:
        assert led.last_reconcile.clean
        assert led.get_key("target").latest_version == 3


# -- an open in another process while an operation is in flight ---------------------------------
PAUSE_CHILD = """
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import keyledger as kl
from keyledger import intents

home, op, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
now = datetime.fromisoformat(sys.argv[4])


def pause(here):  # instead of dying at the fault point, wait there until the test says go
    if here == point:
        (home / "paused").touch()
        deadline = time.monotonic() + 60
        while not (home / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


intents.fault = pause
with kl.open(home, principal="alice", clock=lambda: now) as led:
    # RSA keys: the store is released across their (slow) generation, so another process may
    # open meanwhile (a quick key's create or rotate holds the store from intent to commit)
    key = led.create_key("fresh", spec="RSA_2048") if op == "create" else led.rotate("signer")
    print(key.name, key.latest_version, flush=True)
    print("usable" if led.verify(key.name, b"m", led.sign(key.name, b"m")) else "unusable",
          flush=True)
"""


@pytest.mark.parametrize("point", ["create:after_intent", "create:after_hsm",
                                   "rotate:after_intent", "rotate:after_hsm"])
def test_open_elsewhere_leaves_in_flight_operation_alone(home, clock, zygote, set_up, point):
    op = point.split(":")[0]
    before = set_up(home, clock, op, signer=True)  # and an RSA key "signer"
    code = (f"import sys; sys.argv = ['-', {str(home)!r}, {op!r}, {point!r}, "
            f"{clock().isoformat()!r}]\n" + PAUSE_CHILD)
    child = zygote.popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "paused").exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never reached the fault point"
            time.sleep(0.01)
        with kl.open(home, principal="bob", clock=clock) as led:  # e.g. a dashboard starting
            concurrent = led.last_reconcile
    finally:
        (home / "go").touch()
        out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    name, version = ("fresh", 1) if op == "create" else ("signer", 2)
    assert out.splitlines() == [f"{name} {version}", "usable"]
    assert concurrent.clean, str(concurrent)  # nothing of the live operation was rolled back
    with kl.open(home, principal="alice", clock=clock) as led:
        assert led.last_reconcile.clean
        assert led.reconcile(full=True).clean
        assert led.get_key(name).latest_version == version
        for blob, ctx, plain in before["target"]:
            assert led.decrypt(blob, context=ctx) == plain
