"""Starting `keyledger serve` as a subprocess on a copied home, and real AWS clients for it
(tests/test_serve.py, tests/test_kms_clients.py)."""

from __future__ import annotations

import re
import selectors
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from conftest import copy_home

import keyledger as kl

REGION = "us-east-1"
AWS = Path(sys.executable).with_name("aws")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    home: Path
    log: Path

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start(home: Path, *args: str) -> Server:
    """Start `keyledger serve --port 0` and wait for its "listening on <url>" line."""
    log = home.parent / f"serve-{len(list(home.parent.glob('serve-*')))}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyledger.cli", "--home", str(home), "--principal", "admin",
             "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=err, text=True)
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = proc.stdout.readline() if sel.select(timeout=90) else ""
    m = re.search(r"listening on (\S+)", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {log.read_text()}")
    return Server(proc, m.group(1), home, log)


def new_home(tmp: Path, template) -> tuple[Path, dict[str, dict[str, str]]]:
    """A home whose admin is ``admin``, with access keys for app1 and app2."""
    home = tmp / "home"
    copy_home(template, home)
    with kl.open(home, principal="admin") as led:
        keys = {p: led.create_access_key(p).as_aws() for p in ("app1", "app2")}
    return home, keys


def client(url: str, key: dict[str, str], *, secret: str | None = None,
           verify: str | bool | None = None):
    return boto3.client("kms", endpoint_url=url, region_name=REGION,
                        aws_access_key_id=key["AccessKeyId"],
                        aws_secret_access_key=secret or key["SecretAccessKey"],
                        config=Config(retries={"max_attempts": 1}), verify=verify)


def audit(home: Path, **filters):
    with kl.open(home, principal="admin") as led:
        led.flush_audit()
        return led.audit(**filters)
