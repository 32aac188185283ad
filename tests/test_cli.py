"""The `keyledger` command line on a tmp home.

Most commands run in the test process through ``main(argv)`` (tests/cli_support.py: a real
process costs ~1.3 s of CPU to start); ``subprocess=True`` runs the installed console script
where the process boundary is the point: the entry point and its exit statuses, binary data
through real pipes, the environment alone naming the home, ``demo``, and one command of each
group. Each CLI process opens the home, so the tests group several checks per home.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from cli_support import run_cli
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from proc_support import Zygote, zygote_fixture

from keyledger.cli import main

# `keyledger` processes (subprocess=True) are forked from this module's zygote
# (tests/proc_support.py): the console script runs as __main__ in a real process with real pipes,
# environment and exit status, without an interpreter start and `import keyledger` (~0.7 s of
# CPU) of its own; test_bad_usage_exits_2_from_the_console_script and test_help_exits_0 start
# real interpreters for the entry points themselves.
zygote = zygote_fixture()

# Binary payload with NUL bytes, CR/LF, ^Z and every byte value.
BINARY = b"\x00head\x00\r\n\x1a" + bytes(range(256)) * 3 + b"\x00\x00tail\n"


class Cli:
    """Runs `keyledger --home <home> ...` with cwd in the tmp dir; output kept as bytes. In
    this process unless ``subprocess=True`` (the console script in a process forked from the
    zygote) or ``fresh=True`` (the console script in a new interpreter)."""

    def __init__(self, tmp: Path, zygote: Zygote) -> None:
        self.tmp = tmp
        self.home = tmp / "home"
        self.zygote = zygote

    def __call__(self, *args: str, input: bytes | None = None, home: bool = True,
                 env: dict[str, str] | None = None, subprocess: bool = False,
                 fresh: bool = False) -> subprocess.CompletedProcess:
        argv = [*(["--home", str(self.home)] if home else []), *args]
        base = {k: v for k, v in os.environ.items() if k != "KEYLEDGER_HOME"}
        return run_cli(argv, input=input, cwd=self.tmp, env={**base, **(env or {})},
                       subprocess=subprocess or fresh,
                       zygote=None if fresh else self.zygote)

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess:
        proc = self(*args, **kw)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr.decode())
        return proc

    def json(self, *args: str, **kw):
        return json.loads(self.ok(*args, "--json", **kw).stdout)


def refused(proc: subprocess.CompletedProcess) -> str:
    """Assert exit 1 with an `error: ...` line and no traceback; return stderr."""
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, err)
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def cli(tmp_path: Path, zygote: Zygote) -> Cli:
    return Cli(tmp_path, zygote)


# -- usage -----------------------------------------------------------------------------------------
def test_bad_usage_exits_2_from_the_console_script(cli):
    # the first in a new interpreter (the entry point as a shell starts it), the second in a
    # process forked from the zygote (the same script as __main__, the same exit path)
    for args, fresh in ((["key", "frobnicate", "x"], True),
                        (["encrypt", "k", "--context", "no-equals-sign"], False)):
        proc = cli(*args, subprocess=True, fresh=fresh)
        assert proc.returncode == 2, (args, proc.stderr)
        assert b"usage:" in proc.stderr and b"Traceback" not in proc.stderr
    assert not cli.home.exists()


@pytest.mark.parametrize("args, message", [
    ([], "required"),
    (["key"], "required"),
    (["encrypt"], "required"),
    (["key", "create", "k"], "--spec"),
    (["key", "create", "k", "--spec", "AES_256", "--purpose", "dance"], "invalid choice"),
    (["key", "create", "k", "--spec", "AES_256", "--tag", "novalue"], "KEY=VALUE"),
    (["key", "schedule-deletion", "k", "--days", "soon"], "invalid int"),
    (["key", "compromised", "k"], "--reason"),
    (["audit", "export", "x", "--format", "csv"], "invalid choice"),
    # found after parsing, still before any home is opened
    (["--json", "encrypt", "k"], "--json does not apply"),
    (["encrypt", "k", "--context", "a=1", "--context", "a=2"], "given twice"),
    (["verify", "k", "--signature", "-"], "both come from stdin"),
])
def test_usage_errors_exit_2_without_touching_the_home(tmp_path, capsys, args, message):
    home = tmp_path / "home"
    assert main(["--home", str(home), *args]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err and "Traceback" not in err
    assert not home.exists()


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "Exit codes" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "keyledger.cli", "key", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "schedule-deletion" in proc.stdout


# -- init and keys -----------------------------------------------------------------------------------
def test_init_provisions_reports_and_never_prints_the_pin(cli):
    proc = cli.ok("init", subprocess=True)
    out = proc.stdout.decode()
    assert str(cli.home) in out and "catalog and HSM agree" in out and "AES_GCM" in out
    report = cli.json("init")
    assert report["home"] == str(cli.home)
    assert report["hsm"]["supports"]["AES_GCM"] is True
    assert report["reconcile"] == {"clean": True, "repaired": [], "problems": []}
    pin = (cli.home / "user.pin").read_text().strip()
    so_pin = (cli.home / "so.pin").read_text().strip()
    for text in (out, proc.stderr.decode(), json.dumps(report)):
        assert pin not in text and so_pin not in text


def test_create_list_show_rotate(cli):
    out = cli.ok("key", "create", "orders", "--spec", "aes_256", "--owner", "payments",
                 "--tag", "team=pay", "--tag", "env=prod", "--rotation-period", "30d").stdout
    assert b"orders" in out and b"AES_256" in out
    cli.ok("key", "create", "release", "--spec", "EC_P256")

    keys = cli.json("key", "list")
    assert [k["name"] for k in keys] == ["orders", "release"]
    orders = keys[0]
    assert orders["spec"] == "AES_256" and orders["purpose"] == "encrypt"
    assert orders["state"] == "active" and orders["latest_version"] == 1
    assert orders["owner"] == "payments" and orders["tags"] == {"env": "prod", "team": "pay"}
    assert keys[1]["owner"] is None and keys[1]["purpose"] == "sign"
    assert keys[1]["deletion_due"] is None

    text = cli.ok("key", "list").stdout.decode()
    assert text.splitlines()[0].split()[:4] == ["NAME", "SPEC", "PURPOSE", "STATE"]
    assert "orders" in text and "release" in text and "nan" not in text

    rotated = cli.json("key", "rotate", "orders")
    assert rotated["latest_version"] == 2
    shown = cli.json("key", "show", "orders")
    assert shown["rotation_period"] == "30d"
    assert [(v["version"], v["state"]) for v in shown["versions"]] == [(1, "retired"),
                                                                        (2, "active")]
    assert shown["created_at"].endswith("+00:00") and shown["next_rotation_due"]
    text = cli.ok("key", "show", "orders").stdout.decode()
    assert "versions:" in text and "retired" in text and "team=pay" in text

    assert "already exists" in refused(cli("key", "create", "orders", "--spec", "AES_256",
                                           subprocess=True))
    err = refused(cli("key", "create", "k2", "--spec", "DES"))
    assert "unknown key spec" in err and "AES_256" in err


def test_unknown_key_exits_1_and_names_the_key(cli):
    for args in (["key", "show", "no-such-key"], ["encrypt", "no-such-key"]):
        assert "no-such-key" in refused(cli(*args, input=b"data"))


# -- encrypt / decrypt ---------------------------------------------------------------------------------
def test_encrypt_decrypt_round_trip_via_files(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    (cli.tmp / "plain.bin").write_bytes(BINARY)
    cli.ok("encrypt", "orders", "--in", "plain.bin", "--out", "blob.kl",
           "--context", "tenant=acme", "--context", "purpose=test")
    blob = (cli.tmp / "blob.kl").read_bytes()
    assert blob[:2] == b"KL" and BINARY not in blob
    # context order does not matter; the plaintext file is private to its owner
    cli.ok("decrypt", "--in", "blob.kl", "--out", "back.bin",
           "--context", "purpose=test", "--context", "tenant=acme")
    assert (cli.tmp / "back.bin").read_bytes() == BINARY
    assert stat.S_IMODE((cli.tmp / "back.bin").stat().st_mode) == 0o600
    # naming the key is optional, and checked when given
    cli.ok("decrypt", "orders", "--in", "blob.kl", "--out", "again.bin",
           "--context", "tenant=acme", "--context", "purpose=test")
    assert (cli.tmp / "again.bin").read_bytes() == BINARY


def test_encrypt_file_decrypt_file_stream_any_size_and_write_only_authentic_output(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    data = BINARY * 40  # ~31 KiB: 31 chunks of 1 KiB
    (cli.tmp / "big.bin").write_bytes(data)
    cli.ok("encrypt-file", "orders", "big.bin", "big.kle", "--chunk-size", "1024",
           "--context", "tenant=acme")
    sealed = (cli.tmp / "big.kle").read_bytes()
    assert sealed[:4] == b"KLE\x02" and BINARY not in sealed
    cli.ok("decrypt-file", "big.kle", "back.bin", "--context", "tenant=acme")
    assert (cli.tmp / "back.bin").read_bytes() == data
    assert stat.S_IMODE((cli.tmp / "back.bin").stat().st_mode) == 0o600
    assert "already exists" in refused(cli("decrypt-file", "big.kle", "back.bin",
                                           "--context", "tenant=acme"))
    # pipes both ways
    piped = cli.ok("encrypt-file", "orders", "-", "-", input=data, subprocess=True).stdout
    assert cli.ok("decrypt-file", "-", "-", input=piped, subprocess=True).stdout == data
    # a cut file: refused, and no output file appears
    (cli.tmp / "cut.kle").write_bytes(sealed[:-500])
    assert "truncated" in refused(cli("decrypt-file", "cut.kle", "cut.bin",
                                      "--context", "tenant=acme"))
    assert "context" in refused(cli("decrypt-file", "big.kle", "x.bin"))
    assert not (cli.tmp / "cut.bin").exists() and not (cli.tmp / "x.bin").exists()
    assert "inside the keyledger home" in refused(
        cli("encrypt-file", "orders", "big.bin", str(cli.home / "x.kle")))


def test_encrypt_decrypt_via_stdin_stdout_across_a_rotation(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    blob = cli.ok("encrypt", "orders", "--context", "tenant=acme", input=BINARY,
                  subprocess=True).stdout
    assert blob[:2] == b"KL" and len(blob) == len(BINARY) + 36 + 16
    assert blob[20:24] == (1).to_bytes(4, "big")  # key version in the header
    back = cli.ok("decrypt", "--in", "-", "--out", "-", "--context", "tenant=acme",
                  input=blob, subprocess=True).stdout
    assert back == BINARY
    cli.ok("key", "rotate", "orders")
    new = cli.ok("encrypt", "orders", input=b"", subprocess=True).stdout  # empty input is data
    assert new[20:24] == (2).to_bytes(4, "big")
    assert cli.ok("decrypt", "--context", "tenant=acme", input=blob).stdout == BINARY


def test_context_mismatch_and_bad_ciphertext_exit_1_with_clear_message(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    blob = cli.ok("encrypt", "orders", "--context", "tenant=acme", input=b"secret").stdout
    for args in (["--context", "tenant=evil"], []):
        proc = cli("decrypt", *args, input=blob)
        assert "context differs" in refused(proc)
        assert proc.stdout == b"" and b"secret" not in proc.stderr
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert "altered" in refused(cli("decrypt", "--context", "tenant=acme", input=tampered))
    assert "not a keyledger ciphertext" in refused(cli("decrypt", input=b"not a ciphertext"))
    assert "missing.kl" in refused(cli("decrypt", "--in", "missing.kl"))
    assert "encrypt key" in refused(cli("sign", "orders", input=b"m"))
    cli.ok("key", "create", "other", "--spec", "AES_256")
    assert "'other'" in refused(cli("decrypt", "other", "--context", "tenant=acme", input=blob))
    # the failed decrypts are audited with their error class, never the plaintext
    failed = cli.json("audit", "tail", "-n", "50", "--action", "decrypt", "--outcome", "failed")
    assert len(failed) == 4 and {r["error"] for r in failed} == {"InvalidCiphertext"}
    assert all("secret" not in json.dumps(r) for r in failed)


def test_disabled_key_refuses_encrypt_until_enabled(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    blob = cli.ok("encrypt", "orders", input=b"x").stdout
    assert cli.json("key", "disable", "orders")["state"] == "suspended"
    err = refused(cli("encrypt", "orders", input=b"x"))
    assert "suspended" in err and "enable" in err
    refused(cli("decrypt", input=blob))
    assert cli.json("key", "enable", "orders")["state"] == "active"
    assert cli.ok("decrypt", input=blob).stdout == b"x"


# -- sign / verify -----------------------------------------------------------------------------------
def test_sign_verify_and_tampered_file(cli):
    cli.ok("key", "create", "release", "--spec", "EC_P256")
    (cli.tmp / "artifact.bin").write_bytes(BINARY)
    cli.ok("sign", "release", "--in", "artifact.bin", "--out", "artifact.sig")
    proc = cli.ok("verify", "release", "--in", "artifact.bin", "--signature", "artifact.sig")
    assert b"signature valid" in proc.stdout

    # the PEM public key verifies the signature outside keyledger
    pem = cli.ok("public-key", "release").stdout
    pub = serialization.load_pem_public_key(pem)
    sig = (cli.tmp / "artifact.sig").read_bytes()
    pub.verify(sig, BINARY, ec.ECDSA(hashes.SHA256()))

    (cli.tmp / "artifact.bin").write_bytes(BINARY + b"!")
    proc = cli("verify", "release", "--in", "artifact.bin", "--signature", "artifact.sig",
               subprocess=True)
    assert proc.returncode == 1 and b"INVALID" in proc.stderr and b"Traceback" not in proc.stderr
    proc = cli("verify", "release", "--in", "artifact.bin", "--signature", "artifact.sig",
               "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout) == {"key": "release", "valid": False}

    # signatures from before a rotation still verify (message from stdin)
    cli.ok("key", "rotate", "release")
    proc = cli.ok("verify", "release", "--signature", "artifact.sig", input=BINARY)
    assert b"signature valid" in proc.stdout


def test_ed25519_signature_via_stdout(cli):
    cli.ok("key", "create", "ed", "--spec", "ED25519")
    sig = cli.ok("sign", "ed", input=b"hello", subprocess=True).stdout
    assert len(sig) == 64
    (cli.tmp / "s.sig").write_bytes(sig)
    cli.ok("verify", "ed", "--signature", "s.sig", input=b"hello")


# -- lifecycle ------------------------------------------------------------------------------------
def test_deletion_window_and_compromise(cli):
    cli.ok("key", "create", "old", "--spec", "AES_128")
    assert "7 to 30 days" in refused(cli("key", "schedule-deletion", "old", "--days", "3"))
    doc = cli.json("key", "schedule-deletion", "old", "--days", "7")
    assert doc["state"] == "pending-deletion" and doc["deletion_due"]
    assert "pending-deletion" in refused(cli("encrypt", "old", input=b"x"))
    assert "may be destroyed after" in refused(cli("key", "destroy", "old"))
    assert cli.json("key", "cancel-deletion", "old")["state"] == "active"

    doc = cli.json("key", "compromised", "old", "--reason", "pasted in a ticket")
    assert doc["state"] == "compromised"
    assert "compromised" in refused(cli("encrypt", "old", input=b"x"))
    doc = cli.json("key", "rotate", "old")
    assert doc["state"] == "active" and doc["latest_version"] == 2


# -- audit -----------------------------------------------------------------------------------------
def test_audit_verify_tail_and_principal(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    denied = cli("--principal", "bob", "encrypt", "orders", input=b"x")
    assert denied.returncode == 1 and b"keyledger grant orders bob user" in denied.stderr
    cli.ok("grant", "orders", "bob", "user")
    err = refused(cli("revoke", "orders", "bob", "admin"))  # exit 1 said why (found by
    assert "nothing revoked" in err and "keyledger grants orders" in err  # test_hostile)
    cli.ok("--principal", "bob", "encrypt", "orders", "--context", "tenant=acme", input=b"x")
    proc = cli.ok("audit", "verify", subprocess=True)
    assert b"audit ledger OK" in proc.stdout

    tail = cli.json("audit", "tail", "-n", "5")
    assert len(tail) == 5
    assert {"time", "principal", "action", "key", "version", "outcome", "error"} <= set(tail[0])
    enc = cli.json("audit", "tail", "--action", "encrypt")
    assert [e["outcome"] for e in enc] == ["denied", "ok"]  # the refusal is recorded too
    assert enc[0]["error"] == "AccessDenied"
    enc = enc[1:]
    assert enc[0]["principal"] == "bob" and enc[0]["key"] == "orders"
    assert enc[0]["version"] == 1 and enc[0]["outcome"] == "ok"
    assert json.loads(enc[0]["context"]) == {"tenant": "acme"}
    text = cli.ok("audit", "tail", "-n", "3").stdout.decode()
    assert text.startswith("TIME (UTC)") and len(text.strip().splitlines()) == 4


def test_audit_verify_exits_1_when_the_ledger_was_tampered_with(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    con = duckdb.connect(str(cli.home / "keyledger.duckdb"))  # no keyledger process is running
    try:
        con.execute("UPDATE audit_log SET principal = 'mallory' "
                    "WHERE seq = (SELECT min(seq) FROM audit_log WHERE action = 'create_key')")
    finally:
        con.close()
    proc = cli("audit", "verify", subprocess=True)
    assert proc.returncode == 1 and b"BROKEN" in proc.stdout and b"First bad record" in proc.stdout
    proc = cli("audit", "verify", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["ok"] is False and report["first_bad"]


def test_audit_export_jsonl_and_parquet(cli):
    cli.ok("key", "create", "orders", "--spec", "AES_256")
    cli.ok("audit", "export", "audit.jsonl")  # format from the suffix
    rows = [json.loads(line) for line in (cli.tmp / "audit.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and "create_key" in {r["action"] for r in rows}
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)

    cli.ok("audit", "export", "audit-pq", "--format", "parquet")
    out = cli.tmp / "audit-pq"
    assert out.is_dir() and list(out.glob("day=*/*.parquet"))
    table = pq.read_table(out)
    assert table.num_rows >= len(rows) and "create_key" in table.column("action").to_pylist()


# -- homes, globals, demo ------------------------------------------------------------------------------
def test_home_from_env_default_home_and_options_after_the_command(cli):
    env_home = cli.tmp / "env-home"
    cli.ok("key", "create", "k", "--spec", "HMAC_SHA256", home=False,
           env={"KEYLEDGER_HOME": str(env_home)}, subprocess=True)
    assert (env_home / "keyledger.duckdb").exists() and not cli.home.exists()
    keys = json.loads(cli.ok("key", "list", "--json", "--home", str(env_home),
                             home=False).stdout)
    assert [k["name"] for k in keys] == ["k"]
    # without --home and $KEYLEDGER_HOME the home is ./.keyledger
    cli.ok("init", home=False)
    assert (cli.tmp / ".keyledger" / "keyledger.toml").exists()


def test_demo_tour_runs_twice_on_the_same_home(cli):
    first = cli.ok("demo", "--tour", subprocess=True)
    second = cli.ok("demo", "--tour", "--home", str(cli.home), home=False, subprocess=True)
    out1, out2 = first.stdout.decode(), second.stdout.decode()
    assert "demo-1-orders" in out1 and "demo-2-orders" in out2
    for out in (out1, out2):
        assert "refused" in out and "audit ledger OK" in out
    states = {k["name"]: k["state"] for k in cli.json("key", "list")}
    assert {"demo-1-orders", "demo-2-orders", "demo-2-release-signing"} <= set(states)
    assert states["demo-2-legacy"] == "pending-deletion"
    assert states["demo-2-orders"] == "active"
    pin = (cli.home / "user.pin").read_text().strip()
    assert pin not in out1 + out2


def test_request_trim_executes_with_quorum_one_and_needs_min_version(cli):
    cli.ok("key", "create", "t", "--spec", "AES_128")
    old = cli("encrypt", "t", input=b"v1 data").stdout
    cli.ok("key", "rotate", "t")
    assert cli("request", "trim", "t", "--reason", "x").returncode == 2  # no --min-version
    cli.ok("request", "trim", "t", "--min-version", "2", "--reason", "v1 unused",
           subprocess=True)
    assert cli.json("key", "show", "t")["min_decryption_version"] == 2
    refused = cli("decrypt", input=old)
    assert refused.returncode == 1 and b"version 1" in refused.stderr


def test_admin_grant_goes_through_a_request_when_the_quorum_is_two(cli):
    cli.ok("grant", "*", "bea", "admin")  # quorum 1: direct
    cli.zygote.run_python(f"import keyledger as kl\nwith kl.open({str(cli.home)!r}) as led:\n"
               "    led.set_policy('*', quorum=2)", check=True)
    err = refused(cli("grant", "*", "erin", "admin"))
    assert "request('grant'" in err and "2 distinct admins" in err
    assert cli("request", "grant", "*", "--reason", "x").returncode == 2  # no --who
    rid = cli.json("request", "grant", "*", "--who", "erin", "--reason", "new custodian")
    assert rid["status"] == "pending"
    cli.ok("--principal", "bea", "approve", rid["request_id"])
    roles = {(g["principal"], g["role"]) for g in cli.json("grants")}
    assert ("erin", "admin") in roles


def test_key_list_notes_a_simulation_home_on_stderr(cli, tmp_path):
    out = cli.ok("key", "list")
    assert b"SIMULATION" not in out.stderr  # a real home
    sim = tmp_path / "sim"
    cli.zygote.run_python("import keyledger as kl\nfrom datetime import UTC, datetime\n"
               f"kl.open({str(sim)!r}, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))"
               ".create_key('k', spec='AES_256')", check=True)
    proc = cli.ok("--home", str(sim), "key", "list", "--json", home=False)
    assert "SIMULATION \u2014 simulated clock" in proc.stderr.decode()
    assert [k["name"] for k in json.loads(proc.stdout)] == ["k"]


def test_an_in_process_call_refuses_to_mix_with_an_open_home(ledger, cli):
    """tests/cli_support.py: one embedded home per process; with a ledger open here the CLI
    must run as its own process (which sees the same home as any other process would)."""
    ledger.create_key("open-here", spec="AES_256")
    with pytest.raises(AssertionError, match="subprocess=True"):
        cli("key", "list")
    assert ledger.home == cli.home  # both are tmp_path / "home"
    proc = cli.ok("--principal", "alice", "key", "list", "--json", subprocess=True)
    assert [k["name"] for k in json.loads(proc.stdout)] == ["open-here"]
