"""The single-call hot path remembers what is per-key invariant (a valid name, an allowed
(action, key), an encryption plan, a key id's text) only for one catalog snapshot: a change in
another process or another ledger of this process is still obeyed by the next call."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from proc_support import Zygote, zygote_fixture

import keyledger as kl
from keyledger import ciphertext as ct
from keyledger.config import write_config
from keyledger.errors import AccessDenied, InvalidInput, KeyNotFound, KeyStateError
from keyledger.runtime import IngestBatching


def _refresh_every_call(home: Path) -> None:
    """catalog_refresh_ms = 0: every call looks at catalog.json, so no test waits for the
    refresh interval (the caches must then follow each change at once)."""
    path = home / "keyledger.toml"
    data = tomllib.loads(path.read_text())
    data.setdefault("audit", {})["catalog_refresh_ms"] = 0
    write_config(home, data)


@pytest.fixture
def shared_home(home: Path) -> Path:
    """A real home with key ``k``; alice is admin and user, bob a user and auditor."""
    with kl.open(home, principal="alice") as led:
        led.create_key("k", spec="AES_256")
        led.grant("*", "bob", "user")
        led.grant("*", "bob", "auditor")  # reads his own records back
    _refresh_every_call(home)
    return home


zygote = zygote_fixture()


@pytest.fixture
def elsewhere(zygote: Zygote) -> Callable[[Path, str], None]:
    """``elsewhere(home, code)``: run ``code`` with ``led`` (alice's ledger of ``home``) in
    another process (forked from the module's zygote), which has ended when this returns."""

    def run(home: Path, code: str) -> None:
        script = ("import sys\nimport keyledger as kl\n"
                  "with kl.open(sys.argv[1], principal='alice') as led:\n"
                  + textwrap.indent(textwrap.dedent(code), "    "))
        out = zygote.run([sys.executable, "-c", script, str(home)], capture_output=True,
                         text=True, timeout=300)
        assert out.returncode == 0, out.stderr

    return run


def _crypto_records(led: kl.KeyLedger) -> pd.DataFrame:
    records = led.audit(principal="bob")
    return records[records["action"].isin(["encrypt", "decrypt"])]


def test_a_key_disabled_in_another_process_is_refused_by_the_next_call(shared_home: Path,
        elsewhere: Callable[[Path, str], None]) -> None:
    with kl.open(shared_home, principal="bob") as led:
        blob = led.encrypt("k", b"secret")  # the plan, the name and the grant are remembered
        assert led.decrypt(blob) == b"secret"
        elsewhere(shared_home, "led.disable('k')")
        with pytest.raises(KeyStateError):
            led.encrypt("k", b"secret")
        with pytest.raises(KeyStateError):
            led.decrypt(blob)
        elsewhere(shared_home, "led.enable('k')")
        assert led.decrypt(led.encrypt("k", b"again")) == b"again"
        records = _crypto_records(led)
    assert list(records["outcome"]) == ["ok", "ok", "failed", "failed", "ok", "ok"]


def test_a_key_rotated_in_another_process_encrypts_with_the_new_version(
        shared_home: Path, elsewhere: Callable[[Path, str], None]) -> None:
    with kl.open(shared_home, principal="bob") as led:
        old = led.encrypt("k", b"v1")
        assert ct.parse(old)[0].version == 1
        elsewhere(shared_home, "led.rotate('k')")
        new = led.encrypt("k", b"v2")
        assert ct.parse(new)[0].version == 2
        assert (led.decrypt(old), led.decrypt(new)) == (b"v1", b"v2")
        assert list(led.audit(principal="bob", action="encrypt")["version"]) == [1, 2]


def test_a_version_trimmed_in_another_process_no_longer_decrypts(shared_home: Path,
        elsewhere: Callable[[Path, str], None]) -> None:
    with kl.open(shared_home, principal="bob") as led:
        old = led.encrypt("k", b"v1")
        assert led.decrypt(old) == b"v1"  # version 1 checked and remembered
        elsewhere(shared_home, "led.rotate('k')\nled.trim('k', 2)")
        with pytest.raises(KeyStateError, match="destroyed|minimum decryption"):
            led.decrypt(old)
        assert led.decrypt(led.encrypt("k", b"v2")) == b"v2"


def test_a_grant_revoked_in_another_process_is_refused_by_the_next_call(
        shared_home: Path, elsewhere: Callable[[Path, str], None]) -> None:
    with kl.open(shared_home, principal="bob") as led:
        blob = led.encrypt("k", b"secret")
        assert led.decrypt(blob) == b"secret"  # both allowed once: remembered
        elsewhere(shared_home, "led.revoke('*', 'bob', 'user')")
        with pytest.raises(AccessDenied):
            led.encrypt("k", b"secret")
        with pytest.raises(AccessDenied):
            led.decrypt(blob)
        records = _crypto_records(led)
    assert list(records["outcome"]) == ["ok", "ok", "denied", "denied"]


def test_a_grant_revoked_by_another_ledger_of_this_process_is_refused(
        shared_home: Path) -> None:
    with kl.open(shared_home, principal="alice") as admin, \
            kl.open(shared_home, principal="bob") as bob:
        bob.encrypt("k", b"secret")
        admin.revoke("*", "bob", "user")
        with pytest.raises(AccessDenied):
            bob.encrypt("k", b"secret")
        admin.grant("k", "bob", "user")  # a grant on the key alone is enough again
        assert bob.decrypt(bob.encrypt("k", b"x")) == b"x"


def test_a_key_deleted_and_recreated_under_its_name_is_a_new_key(shared_home: Path) -> None:
    """The name cache keeps only that a name is well formed, never which key it named."""
    with kl.open(shared_home, principal="alice") as led:
        first = led.encrypt("k", b"one")
        led.create_key("k2", spec="AES_256")
        led.set_alias("k2", "moving")
        assert ct.parse(led.encrypt("moving", b"x"))[0].key_id == led.get_key("k2").key_id
        led.remove_alias("moving")
        with pytest.raises(KeyNotFound):
            led.encrypt("moving", b"x")
        led.set_alias("k", "moving")
        assert ct.parse(led.encrypt("moving", b"x"))[0].key_id == ct.parse(first)[0].key_id


def test_an_invalid_name_is_refused_every_time(shared_home: Path) -> None:
    with kl.open(shared_home, principal="alice") as led:
        led.encrypt("k", b"x")
        for _ in range(2):
            with pytest.raises(InvalidInput):
                led.encrypt("k\n", b"x")
            with pytest.raises(InvalidInput):
                led.encrypt(["k"], b"x")  # type: ignore[arg-type]


_FIELDS = ["principal", "action", "key", "key_id", "version", "outcome", "error", "detail",
           "context"]


def _fields(records: pd.DataFrame) -> list[dict]:
    rows = records[_FIELDS].astype(object)
    return rows.where(rows.notna(), None).to_dict("records")


def test_the_hot_path_records_each_call_as_the_full_path_does(shared_home: Path) -> None:
    """encrypt / decrypt of bytes on a warm ledger take the one-function hot path; a bytearray
    takes the full (``Audited``) path, and so does a ledger's first call on a key. Each call,
    worked or refused at any step, leaves one record, the same record either way (a name that
    names no key hashed, the same error and detail)."""
    with kl.open(shared_home, principal="bob") as led:
        led.generate_data_key("k")  # the first call on the key: the full path
        led.generate_data_key("k")  # then the hot path
        blob = led.encrypt("k", b"secret", context={"t": "a"})
        for _ in range(2):  # warm: name, grants, plans, the version to decrypt with
            led.decrypt(led.encrypt("k", b"x"))
            led.decrypt(blob, context={"t": "a"})
            with pytest.raises(KeyNotFound):
                led.encrypt("nokey", b"x")
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        calls: list[tuple[Callable[[bytes], object], bytes, type[Exception] | None]] = [
            (lambda data: led.encrypt("k", data), b"x", None),
            (lambda data: led.encrypt("k", data, context={"t": "a"}), b"x", None),
            (lambda data: led.decrypt(data, context={"t": "a"}), blob, None),
            (lambda data: led.decrypt(data), led.encrypt("k", b"y"), None),
            (lambda data: led.encrypt("nokey", data), b"x", KeyNotFound),
            (lambda data: led.encrypt("k", data, context={"t": 1}), b"x", InvalidInput),
            (lambda data: led.decrypt(data, context={"t": "a"}), tampered, kl.InvalidCiphertext),
            (lambda data: led.decrypt(data, context={"t": "b"}), blob, kl.InvalidCiphertext),
            (lambda data: led.decrypt(data), blob, kl.InvalidCiphertext),
            (lambda data: led.decrypt(data, context=["t"]), blob, InvalidInput),  # type: ignore[arg-type]
        ]
        before = len(led.audit(principal="bob", limit=None))
        for call, data, refused in calls:
            for arg in (data, bytearray(data)):  # the hot path, then the full path
                if refused is None:
                    call(arg)
                else:
                    with pytest.raises(refused):
                        call(arg)
        everything = led.audit(principal="bob", limit=None)
        assert led.verify_audit().ok
    later = everything.iloc[before:]
    records = _fields(later[later["action"].isin(["encrypt", "decrypt"])])
    assert len(records) == 2 * len(calls)  # one record per call
    hot, full = records[0::2], records[1::2]
    assert hot == full
    assert [r["outcome"] for r in hot] == ["ok"] * 4 + ["failed"] * 6
    assert hot[4]["key"].startswith("sha256:")  # a name that names no key is kept hashed
    assert hot[6]["detail"] == "authentication failed: tampered data or wrong context"
    first, second = _fields(everything[everything["action"] == "generate_data_key"])
    assert first == second and first["action"] == "generate_data_key"


# -- the background ingest: every interval while calls are few, batched while they stream ------
def test_background_ingest_runs_every_interval_while_calls_are_few() -> None:
    b = IngestBatching()
    assert not b.due(0)
    for backlog in (200, 400, 600):
        assert b.due(backlog)
        b.ingested(1)


def test_background_ingest_batches_while_calls_stream_in() -> None:
    b = IngestBatching()
    assert b.due(10_000)
    b.ingested(5_000)  # a busy round: the next ones wait while the journals grow
    waits = [b.due(n * 100_000) for n in range(1, b.BUSY_ROUNDS + 1)]
    assert waits == [False] * (b.BUSY_ROUNDS - 1) + [True]  # at most BUSY_ROUNDS intervals


def test_background_ingest_runs_once_calls_stop_or_the_backlog_is_big() -> None:
    b = IngestBatching()
    b.ingested(5_000)
    assert not b.due(100_000)
    assert b.due(100_000)  # the journals stopped growing: ingest now
    b.ingested(5_000)
    assert b.due(b.BUSY_BYTES)  # a big backlog is not left waiting
    b.ingested(5_000)
    assert not b.due(0)  # nothing pending: idle again
    assert b.due(100)


def _functions_entered(fn: Callable[[], object]) -> int:
    """Python functions entered by one call of ``fn`` in this thread (counted, not timed)."""
    entered = 0

    def tracer(frame: object, event: str, arg: object) -> None:
        nonlocal entered
        entered += event == "call"

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return entered


@pytest.mark.parametrize("call", ["encrypt", "decrypt", "generate_data_key"])
def test_an_audited_call_runs_as_few_python_functions(home: Path, call: str) -> None:
    """Issue 18: in the real loop a Python function entered between two HSM calls was
    estimated at up to a microsecond against a ~60 us bare call (inlining ``_gcm_param``
    measured only ~0.2 us in the loop, docs/benchmarks.md), so the hot path (authorisation, state
    checks, usage counter, trusted time, the chained journal record and the HSM call) keeps
    to a handful of them. 25 before the catalog lookup, the HSM key-object lookup, decrypt's
    closure and the audit record's clock were inlined, 18-19 before one function per action
    replaced the ``Audited`` object and the per-step calls (then 12 / 10 / 13), 8 / 7 / 8 since
    the hot path checks one catalog snapshot instead of calling the catalog, inlines the usage
    counter's common case and appends a record pre-rendered with the plan, dated under the
    journal's lock, 5 / 4 / 5 since the facade hands these calls to the service's methods and
    the backend sets one GCM parameter object instead of building one (no
    ``GCMParams.__init__``) and calls python-pkcs11's one-shot encrypt / decrypt under its
    public wrapper, 6 / 5 / 6 since the GCM parameter is the raw ``CK_GCM_PARAMS`` made by
    ``_gcm_param`` (one Python function more, ~9,000 instructions less in python-pkcs11);
    the count includes the test's lambda."""
    with kl.open(home, principal="alice") as led:
        led.create_key("k", spec="AES_256")
    path = home / "keyledger.toml"  # no catalog refresh falls inside the counted call
    data = tomllib.loads(path.read_text())
    data.setdefault("audit", {})["catalog_refresh_ms"] = 3_600_000
    write_config(home, data)
    with kl.open(home, principal="alice") as led:
        blob = led.encrypt("k", b"x" * 32)
        fn: Callable[[], object] = {
            "encrypt": lambda: led.encrypt("k", b"x" * 32),
            "decrypt": lambda: led.decrypt(blob),
            "generate_data_key": lambda: led.generate_data_key("k"),
        }[call]
        for _ in range(3):  # warm: plans made, usage block claimed, key object cached
            fn()
        assert _functions_entered(fn) <= 6
        assert led.verify_audit().ok  # every call still left its chained record


def test_the_hot_paths_data_key_is_the_frozen_data_key_of_the_full_path(
        ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """generate_data_key's hot path fills a new ``DataKey``'s slots without its ``__init__``
    (issue 18, §4: 1.5-2 us per call in the HSM loop). What it returns is the same frozen
    dataclass the full path builds: its fields, immutable, picklable, a repr without the key,
    and a wrapped key that decrypts to its plaintext."""
    ledger.create_key("k", spec="AES_256")
    inits: list[object] = []
    init = kl.DataKey.__init__

    def counted_init(self: kl.DataKey, *args: object, **kwargs: object) -> None:
        inits.append(self)
        init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kl.DataKey, "__init__", counted_init)
    full = ledger.generate_data_key("k")  # the ledger's first call on the key: the full path
    ledger.generate_data_key("k")
    hot = ledger.generate_data_key("k")
    assert inits == [full]  # only the full path ran the constructor
    for dk in (full, hot):
        assert type(dk) is kl.DataKey
        assert [f.name for f in dataclasses.fields(dk)] == ["plaintext", "wrapped", "key",
                                                            "version"]
        assert (dk.key, dk.version, len(dk.plaintext)) == ("k", 1, 32)
        assert ledger.decrypt(dk.wrapped) == dk.plaintext
        assert dk.plaintext.hex() not in repr(dk) and repr(dk.plaintext) not in repr(dk)
        with pytest.raises(dataclasses.FrozenInstanceError):
            dk.plaintext = b"x"  # type: ignore[misc]
        assert pickle.loads(pickle.dumps(dk)) == dk == dataclasses.replace(dk)
    assert hot != full and hot.plaintext != full.plaintext


def test_the_facades_direct_hot_calls_leave_a_subclass_override_in_charge(ledger) -> None:
    """``KeyLedger`` hands encrypt / decrypt / generate_data_key straight to its crypto service
    (one Python call less each); a subclass that overrides them keeps its own methods."""
    ledger.create_key("k", spec="AES_256")
    assert ledger.encrypt.__self__ is ledger._crypto  # the direct hand-off, on the class itself

    class Counting(kl.KeyLedger):
        calls: list[str] = []

        def encrypt(self, name: str, plaintext: bytes, *, context=None) -> bytes:
            self.calls.append("encrypt")
            return super().encrypt(name, plaintext, context=context)

        def decrypt(self, ciphertext: bytes, *, context=None) -> bytes:
            self.calls.append("decrypt")
            return super().decrypt(ciphertext, context=context)

    with Counting(ledger.home, principal="alice") as sub:
        assert sub.decrypt(sub.encrypt("k", b"x")) == b"x"
    assert Counting.calls == ["encrypt", "decrypt"]
