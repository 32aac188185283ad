"""`keyledger dashboard`: serves the Panel app and prints its URL; refuses unsafe binds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli_support import run_cli

import keyledger as kl
from keyledger.dashboard.serve import serve_command
from keyledger.errors import ConfigError, InvalidInput

KEYLEDGER = [sys.executable, "-m", "keyledger.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`keyledger *args` in this process (tests/cli_support.py): the refusals below end before
    a server would start, so no process is needed (and none pays ~3.5 s of CPU importing Panel
    for its option check). Panel's option parser is imported first: importing it adds the
    logging handlers of Panel and requests, which run_cli would take for the command's."""
    import panel.command.serve  # noqa: F401

    return run_cli(list(args), text=True)


@pytest.fixture
def small_home(ledger: kl.KeyLedger, home: Path) -> Path:
    """A simulation home (a copy of the worker's template: no provisioning per test) with one
    key, closed again: the dashboard's own processes open it."""
    ledger.create_key("orders", spec="AES_256", owner="payments")
    ledger.close()
    (home / "demo.json").write_text(json.dumps(
        {"principals": [{"name": "alice", "roles": ["admin on *"]}]}))
    return home


def test_dashboard_serves_the_app_and_prints_the_url(small_home: Path):
    port = _free_port()
    proc = subprocess.Popen([*KEYLEDGER, "dashboard", "--home", str(small_home),
                             "--principal", "alice", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        lines = []
        while True:  # the URL comes first, before the server is up
            line = proc.stdout.readline()
            assert line, f"dashboard exited early: {''.join(lines)}"
            lines.append(line)
            if url.rstrip("/") in line:
                break
        text = "".join(lines)
        assert "signed in as alice (admin on *)" in text and "no login, local only" in text
        # until the port accepts, then one request: each request builds a session of the app
        # (seconds of CPU on a loaded machine), so a short timeout retried would build several
        deadline = time.monotonic() + 60
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.3)
        with urllib.request.urlopen(url, timeout=120) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert "<title>keyledger" in body  # (a simulation home adds its label)
        assert "https://" not in body.split("<body")[0]  # nothing from a CDN in the head
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) is not None
    with socket.socket() as s:  # the panel server went with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_dashboard_refuses_a_public_bind_without_login(small_home: Path):
    out = _cli("dashboard", "--home", str(small_home), "--address", "0.0.0.0",
               "--port", str(_free_port()))
    assert out.returncode == 1 and "without a login" in out.stderr


def test_dashboard_refuses_a_folder_that_is_not_a_home(tmp_path: Path):
    out = _cli("dashboard", "--home", str(tmp_path / "nothing"))
    assert out.returncode == 1 and "keyledger demo --home" in out.stderr


def test_basic_auth_file_must_be_private(small_home: Path, tmp_path: Path):
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": "correct horse"}))
    os.chmod(users, 0o644)
    out = _cli("dashboard", "--home", str(small_home), "--address", "0.0.0.0",
               "--basic-auth", str(users), "--port", str(_free_port()))
    assert out.returncode == 1 and "600" in out.stderr
    assert "correct horse" not in out.stderr + out.stdout


# -- what Panel will see: pass-through options after `--` count too ---------------------------------
REFUSED = [
    ["--address", "0.0.0.0"], ["--address=0.0.0.0"], ["--addr", "0.0.0.0"],
    ["--anaconda-project-address", "0.0.0.0"], ["--address", ""], ["--address", "::"],
    ["--address", "127.0.0.1", "--address", "192.168.1.5"],
    ["--allow-websocket-origin", "*"], ["--allow-websocket-origin=*:5006"],
    ["--allow-websocket-origin", "keys.example.com:5006"],
    ["--anaconda-project-host", "evil.example"],
]


@pytest.mark.parametrize("extra", REFUSED, ids=[" ".join(x) or "empty" for x in REFUSED])
def test_pass_through_options_cannot_expose_the_dashboard_without_a_login(tmp_path, extra):
    with pytest.raises(ConfigError, match="without a login"):
        serve_command(tmp_path, principal="alice", panel_args=extra)


@pytest.mark.parametrize(("extra", "address", "port"), [
    (["--port", "7000"], "127.0.0.1", 7000),
    (["--address", "0.0.0.0", "--address", "127.0.0.1"], "127.0.0.1", 5006),  # last one wins
    (["--address", "::1"], "::1", 5006),
    (["--args", "--address", "0.0.0.0"], "127.0.0.1", 5006),  # the app's arguments, not Panel's
], ids=["port", "last-wins", "ipv6-loopback", "app-args"])
def test_loopback_pass_through_options_are_served_as_panel_reads_them(tmp_path, extra, address,
                                                                      port):
    from keyledger.dashboard.serve import panel_options

    cmd = serve_command(tmp_path, principal="alice", panel_args=extra)
    opts = panel_options(cmd.argv[4:], cmd.env)
    assert (opts.address, opts.port, cmd.auth) == (address, port, "none")
    assert f":{port}/" in cmd.url and cmd.env["KEYLEDGER_PRINCIPAL"] == "alice"
    assert opts.origins and all(o.endswith(f":{port}") for o in opts.origins)


def test_a_pass_through_login_allows_a_public_address(tmp_path, monkeypatch):
    cmd = serve_command(tmp_path, principal="alice",
                        panel_args=["--address", "0.0.0.0", "--oauth-provider", "github"])
    assert cmd.auth == "oauth" and "KEYLEDGER_PRINCIPAL" not in cmd.env
    assert "PANEL_COOKIE_SECRET" in cmd.env
    cmd = serve_command(tmp_path, panel_args=["--address=0.0.0.0", "--basic-auth", "s3cret"])
    assert cmd.auth == "basic" and "KEYLEDGER_PRINCIPAL" not in cmd.env
    monkeypatch.setenv("PANEL_BASIC_AUTH", "s3cret")  # Panel's own switch counts as a login
    assert serve_command(tmp_path, address="0.0.0.0").auth == "basic"


def test_options_panel_would_refuse_are_refused(tmp_path):
    with pytest.raises(InvalidInput, match="would not accept"):
        serve_command(tmp_path, panel_args=["--no-such-option"])


def test_check_exposure_without_a_server():
    from keyledger.dashboard.serve import PanelOptions, check_exposure

    check_exposure(PanelOptions("127.0.0.1", 5006,
                                ("127.0.0.1:5006", "localhost:5006", "[::1]:5006"),
                                basic=False, oauth=False))
    for origins in (("127.0.0.*:5006",), ("*",), ("example.com",)):
        with pytest.raises(ConfigError, match="websocket connections"):
            check_exposure(PanelOptions("127.0.0.1", 5006, origins, basic=False, oauth=False))
    check_exposure(PanelOptions("0.0.0.0", 5006, ("*",), basic=True, oauth=False))


def test_cli_refuses_a_public_address_passed_through_to_panel(small_home: Path):
    port = _free_port()
    proc = subprocess.Popen([*KEYLEDGER, "dashboard", "--home", str(small_home), "--principal",
                             "alice", "--port", str(port), "--", "--address", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the dashboard started on 0.0.0.0 without a login")
    assert proc.returncode == 1 and "without a login" in err and "0.0.0.0" in err
    assert "http://" not in out
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
