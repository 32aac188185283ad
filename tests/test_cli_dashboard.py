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

import keyledger as kl

KEYLEDGER = [sys.executable, "-m", "keyledger.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*KEYLEDGER, *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture
def small_home(home: Path, clock) -> Path:
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("orders", spec="AES_256", owner="payments")
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
        deadline, body = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    assert resp.status == 200
                    body = resp.read().decode()
                    break
            except OSError:
                time.sleep(0.3)
        assert "<title>keyledger</title>" in body
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
