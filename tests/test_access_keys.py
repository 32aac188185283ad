"""Access keys for ``keyledger serve``: admin only and audited, secrets sealed under an HSM key
(the store alone reveals none, and a row moved to another principal stops working), and what
the server's directory sees after create, disable, enable and delete."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from cli_support import run_cli

import keyledger as kl
from keyledger.errors import AccessDenied, InvalidInput, KeyExists, KeyNotFound
from keyledger.services.accesskeys import AccessKeyDirectory

EXISTING_ID, EXISTING_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def directory(ledger: kl.KeyLedger) -> AccessKeyDirectory:
    return AccessKeyDirectory(ledger._rt)


def test_create_shows_the_secret_once_and_the_server_can_use_it(ledger):
    made = ledger.create_access_key("app1")
    assert re.fullmatch(r"KLAK[A-Z2-7]{16}", made.access_key_id)
    assert len(made.secret_access_key) == 40 and made.secret_access_key not in repr(made)
    assert made.as_aws() == {"AccessKeyId": made.access_key_id,
                             "SecretAccessKey": made.secret_access_key}
    assert directory(ledger).credentials(made.access_key_id) == ("app1",
                                                                 made.secret_access_key)
    listed = ledger.access_keys()
    assert list(listed["access_key_id"]) == [made.access_key_id]
    assert list(listed["state"]) == ["active"] and list(listed["created_by"]) == ["alice"]
    assert not any("secret" in c for c in listed.columns)


def test_the_store_alone_does_not_reveal_the_secret(ledger):
    made = ledger.create_access_key("app1")
    ledger.flush_audit()
    with ledger._rt.db.read() as tx:  # the process's own store lock: no race with its ingest
        sealed, = tx.execute("SELECT secret_sealed FROM access_keys").one()
        audit_text = " ".join(str(r) for r in tx.execute("SELECT * FROM audit_log").fetchall())
    assert made.secret_access_key not in sealed and made.secret_access_key not in audit_text
    raw = (ledger.home / "keyledger.duckdb").read_bytes()
    assert made.secret_access_key.encode() not in raw


def test_a_row_moved_to_another_principal_no_longer_authenticates(ledger):
    made = ledger.create_access_key("app1")
    with ledger._rt.db.write(export=False) as tx:  # an edit of the file, under the store lock
        tx.execute("UPDATE access_keys SET principal = 'alice'")
    (ledger.home / "access_keys.stamp").write_text("changed")
    assert directory(ledger).credentials(made.access_key_id) is None


def test_register_an_existing_pair_and_its_checks(ledger):
    made = ledger.create_access_key("ci", key_id=EXISTING_ID, secret=EXISTING_SECRET)
    assert (made.access_key_id, made.secret_access_key) == (EXISTING_ID, EXISTING_SECRET)
    assert directory(ledger).credentials(EXISTING_ID) == ("ci", EXISTING_SECRET)
    with pytest.raises(KeyExists, match="already exists"):
        ledger.create_access_key("other", key_id=EXISTING_ID, secret=EXISTING_SECRET)
    bad = [({"key_id": "akia-lower-case-x", "secret": EXISTING_SECRET}, "capital letters"),
           ({"key_id": "SHORT", "secret": EXISTING_SECRET}, "16 to 128"),
           ({"key_id": "A" * 20, "secret": "short"}, "16 to 128 printable"),
           ({"key_id": "A" * 20, "secret": "has a space in the secret"}, "without spaces"),
           ({"key_id": "A" * 20}, "both key_id and secret")]
    for kwargs, words in bad:
        with pytest.raises(InvalidInput, match=words):
            ledger.create_access_key("app1", **kwargs)
    with pytest.raises(InvalidInput, match="principal"):
        ledger.create_access_key("bad principal")
    assert list(ledger.access_keys()["access_key_id"]) == [EXISTING_ID]


def test_disable_enable_delete_take_effect_in_a_running_directory(ledger):
    made = ledger.create_access_key("app1")
    seen = directory(ledger)
    assert seen.credentials(made.access_key_id) is not None
    ledger.disable_access_key(made.access_key_id)
    assert seen.credentials(made.access_key_id) is None
    ledger.enable_access_key(made.access_key_id)
    assert seen.credentials(made.access_key_id) is not None
    ledger.delete_access_key(made.access_key_id)
    assert seen.credentials(made.access_key_id) is None
    with pytest.raises(KeyNotFound, match="no access key"):
        ledger.disable_access_key(made.access_key_id)
    assert ledger.access_keys().empty


def test_the_directory_unseals_a_secret_once_until_the_access_keys_change(ledger, monkeypatch):
    """The server asks per request; one HSM unseal per key and load (every PKCS#11 call of
    the process is serialised), and a change (disable, enable) still takes effect at once."""
    made = ledger.create_access_key("app1")
    backend, unseals = ledger._rt.backend, []
    real = backend.decrypt_gcm
    monkeypatch.setattr(backend, "decrypt_gcm", lambda *a: unseals.append(1) or real(*a))
    seen = directory(ledger)
    for _ in range(3):
        assert seen.credentials(made.access_key_id) == ("app1", made.secret_access_key)
    assert len(unseals) == 1
    ledger.disable_access_key(made.access_key_id)
    assert seen.credentials(made.access_key_id) is None
    ledger.enable_access_key(made.access_key_id)
    assert seen.credentials(made.access_key_id) == ("app1", made.secret_access_key)
    assert len(unseals) == 2


def test_only_home_admins_manage_access_keys_and_every_call_is_audited(ledger):
    made = ledger.create_access_key("app1")
    with kl.open(ledger.home, principal="bob") as bob:
        for call in (lambda: bob.create_access_key("bob"), bob.access_keys,
                     lambda: bob.disable_access_key(made.access_key_id),
                     lambda: bob.delete_access_key(made.access_key_id)):
            with pytest.raises(AccessDenied, match="admin"):
                call()
    records = ledger.audit(action=None)
    mine = records[records["action"].str.contains("access_key")]
    assert list(zip(mine["principal"], mine["action"], mine["outcome"], strict=True)) == [
        ("alice", "create_access_key", "ok"), ("bob", "create_access_key", "denied"),
        ("bob", "list_access_keys", "denied"), ("bob", "disable_access_key", "denied"),
        ("bob", "delete_access_key", "denied")]
    assert f"access key {made.access_key_id} for principal app1" in set(mine["detail"])
    assert directory(ledger).credentials(made.access_key_id) is not None  # nothing changed


def test_last_use_is_recorded_when_flushed(ledger):
    made = ledger.create_access_key("app1")
    seen = directory(ledger)
    seen.note_used(made.access_key_id, ledger.now())
    seen.flush_used()
    assert ledger.access_keys()["last_used_at"].notna().all()


def test_cli_create_register_list_disable_delete(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "KEYLEDGER_HOME": str(home)}

    def cli(*args: str, stdin: str = "", subprocess: bool = False) -> subprocess.CompletedProcess:
        return run_cli(["--principal", "admin", "access-key", *args], input=stdin, text=True,
                       env=env, subprocess=subprocess)

    made = json.loads(cli("create", "app1", "--json", subprocess=True).stdout)
    assert set(made) == {"AccessKeyId", "SecretAccessKey"}
    out = cli("create", "ci", "--id", EXISTING_ID, "--secret-stdin", stdin=EXISTING_SECRET + "\n")
    assert out.returncode == 0 and EXISTING_SECRET not in out.stdout + out.stderr
    assert cli("create", "ci", "--id", EXISTING_ID).returncode == 2  # --secret-stdin missing
    listed = cli("list", "--json")
    assert made["SecretAccessKey"] not in listed.stdout
    assert {r["access_key_id"]: r["principal"] for r in json.loads(listed.stdout)} == {
        made["AccessKeyId"]: "app1", EXISTING_ID: "ci"}
    assert cli("disable", EXISTING_ID).returncode == 0
    assert cli("delete", made["AccessKeyId"]).returncode == 0
    assert [r["state"] for r in json.loads(cli("list", "--json").stdout)] == ["disabled"]
    missing = cli("delete", made["AccessKeyId"])
    assert missing.returncode == 1 and missing.stderr.startswith("error: no access key")


def test_the_memory_backend_seals_secrets_too(tmp_path, clock):
    from keyledger.hsm import memory

    memory.init_home(tmp_path / "mem")
    with kl.open(tmp_path / "mem", principal="alice", clock=clock) as led:
        made = led.create_access_key("app1")
        assert directory(led).credentials(made.access_key_id) == ("app1",
                                                                  made.secret_access_key)
