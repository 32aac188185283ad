"""Harness for the real-browser tests of the Panel dashboard (and scripts/screenshots.py).

- ``seed_home(home)``: a small but realistic home (run in its own interpreter: ``python
  tests/browser_support.py seed <home>``) so the test process never loads a SoftHSM2 config.
- ``DashboardServer``: ``panel serve dashboards/keyledger_dashboard.py`` on 127.0.0.1 and a free
  port as a subprocess of this interpreter, for one principal; waits for HTTP 200, stops cleanly.
- ``launch_chromium(playwright)``: Debian's /usr/bin/chromium driven by Playwright (never
  ``playwright install``), with a fresh profile, headless and offline-friendly flags.
- ``PageErrors``: collects console errors and uncaught page errors of a Playwright page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboards" / "keyledger_dashboard.py"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
ADMIN, AUDITOR = "sec-admin", "audit-anna"
USERS = ("svc-orders", "svc-billing", "svc-reports")
TAB_TITLES = ("Overview", "Rotation", "Usage", "Compliance", "Audit")

# name, spec, owner, tags, rotation period
SEED_KEYS: tuple[tuple[str, str, str, dict[str, str], str], ...] = (
    ("orders-db", "AES_256", "payments", {"team": "payments", "env": "prod"}, "90d"),
    ("billing-pii", "AES_256", "payments", {"team": "payments", "env": "prod", "data": "pii"}, "30d"),
    ("card-tokens", "AES_256", "payments", {"team": "payments", "env": "prod"}, "180d"),
    ("session-mac", "HMAC_SHA256", "identity", {"team": "identity", "env": "prod"}, "60d"),
    ("login-tokens", "AES_128", "identity", {"team": "identity", "env": "dev"}, "90d"),
    ("release-signing", "EC_P256", "platform", {"team": "platform", "env": "prod"}, "1y"),
    ("backup-wrap", "AES_256", "platform", {"team": "platform", "env": "prod"}, "1y"),
    ("reports-archive", "AES_256", "analytics", {"team": "analytics", "env": "dev"}, "90d"),
)
OVERDUE_KEY = "billing-pii"      # 30-day period, never rotated in 75 days
ROTATE_KEY = "orders-db"         # the browser test rotates this one
DISABLE_KEY = "reports-archive"  # the browser test disables this one from another process


def seed_home(home: str | os.PathLike, *, days: int = 75, end: datetime | None = None) -> dict:
    """Build a home whose history ends at ``end`` (default: now), so a server on the real clock
    sees recent activity. Returns a summary (keys, admin, auditor, versions) as a dict."""
    import keyledger as kl

    end = end or datetime.now(UTC)
    now = [end - timedelta(days=days)]

    def clock() -> datetime:
        return now[0]

    summary: dict = {"admin": ADMIN, "auditor": AUDITOR, "keys": [k[0] for k in SEED_KEYS]}
    with kl.open(home, principal=ADMIN, clock=clock) as led:
        for name, spec, owner, tags, period in SEED_KEYS:
            led.create_key(name, spec=spec, owner=owner, tags=tags, rotation_period=period)
        for user in USERS:
            led.grant("*", user, "user")
        led.grant("*", AUDITOR, "auditor")
    # usage: three services, a rising daily volume, rotations along the way
    users = {u: kl.open(home, principal=u, clock=clock) for u in USERS}
    try:
        admin = kl.open(home, principal=ADMIN, clock=clock)
        try:
            blobs: dict[str, list[tuple[bytes, dict[str, str]]]] = {}
            for day in range(days):
                now[0] = end - timedelta(days=days - day, hours=-2)
                if day in (20, 50):
                    admin.rotate(ROTATE_KEY, reason="scheduled rotation")
                if day == 40:
                    admin.rotate("session-mac", reason="scheduled rotation")
                    admin.rotate("card-tokens", reason="algorithm review")
                for i, (user, keys) in enumerate((
                        ("svc-orders", ("orders-db", "card-tokens")),
                        ("svc-billing", ("billing-pii", "orders-db")),
                        ("svc-reports", ("reports-archive",)))):
                    led = users[user]
                    for key in keys:
                        for n in range(1 + (day + i) % 3):
                            now[0] += timedelta(minutes=7)
                            ctx = {"svc": user}
                            blob = led.encrypt(key, b"record %d" % n, context=ctx)
                            blobs.setdefault(key, []).append((blob, ctx))
                        for blob, ctx in blobs[key][-2:]:
                            now[0] += timedelta(minutes=3)
                            led.decrypt(blob, context=ctx)
                if day % 7 == 0:
                    now[0] += timedelta(minutes=5)
                    sig = users["svc-orders"].sign("release-signing", b"release %d" % day)
                    users["svc-orders"].verify("release-signing", b"release %d" % day, sig)
                    users["svc-billing"].mac("session-mac", b"session %d" % day)
            # the last hours: activity in the last 24 h, a denied call, an old-version decrypt
            now[0] = end - timedelta(hours=3)
            for blob, ctx in blobs["orders-db"][:3]:
                users["svc-reports"].decrypt(blob, context=ctx)
            try:
                users["svc-reports"].decrypt(blobs["orders-db"][-1][0], context={"svc": "wrong"})
            except kl.KeyLedgerError:
                pass
            now[0] = end - timedelta(hours=1)
            admin.verify_audit()
            admin.compliance()
            summary["findings"] = int(len(admin.findings()))
            summary["versions"] = {k: int(admin.get_key(k).latest_version)
                                   for k in summary["keys"]}
            admin.flush_audit()
        finally:
            admin.close()
    finally:
        for led in users.values():
            led.close()
    return summary


def run_seed(home: Path, *, timeout: float = 300) -> dict:
    """``seed_home`` in a fresh interpreter; returns its summary."""
    return Seeding(home).result(timeout)


class Seeding:
    """``seed_home`` in a fresh interpreter, started at once; ``result()`` waits for its
    summary (start the dashboard servers and the browser meanwhile: a server opens the home
    only when it builds its first session)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "seed",
                                      str(home)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self._summary: dict | None = None

    def result(self, timeout: float = 300) -> dict:
        if self._summary is None:
            try:
                out, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise
            if self.proc.returncode != 0:
                raise RuntimeError(f"seeding {self.home} failed:\n{out}\n{err}")
            self._summary = json.loads(out.strip().splitlines()[-1])
        return self._summary

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def run_ledger_code(home: Path, principal: str, body: str, *, timeout: float = 120) -> str:
    """Run ``body`` in a fresh interpreter with ``led`` open on ``home``; returns its stdout.

    The ledger is closed before the interpreter exits, so no DuckDB lock outlives the call."""
    code = (f"import json, keyledger as kl\n"
            f"with kl.open({str(home)!r}, principal={principal!r}) as led:\n"
            + "".join(f"    {line}\n" for line in body.strip().splitlines()))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"ledger code failed:\n{code}\n{out.stdout}\n{out.stderr}")
    return out.stdout


# -- the served app -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DashboardServer:
    """``panel serve`` of the dashboard for one home and one principal."""

    home: Path
    principal: str
    log_path: Path
    app: Path = APP
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: IO[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.app.stem}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command ``keyledger dashboard`` runs (``serve_command``), on our free port."""
        from keyledger.dashboard.serve import serve_command

        cmd = serve_command(self.home, address="127.0.0.1", port=self.port,
                            principal=self.principal)
        argv = list(cmd.argv)
        if self.app != APP:  # a stand-in app (checks of the harness itself)
            argv[argv.index(str(APP))] = str(self.app)
        return argv, {**cmd.env, "PYTHONUNBUFFERED": "1", "BOKEH_LOG_LEVEL": "warn"}

    def start(self, timeout: float = 90) -> DashboardServer:
        return self.launch().wait_ready(timeout)

    def launch(self) -> DashboardServer:
        """Start the process without waiting (start two, then ``wait_ready`` on both)."""
        self.log = self.log_path.open("w")
        argv, env = self.command()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 90, *, session: bool = True) -> DashboardServer:
        """Until the app page answers 200 (which builds one session of the app), or with
        ``session=False`` until the server accepts connections (the first page then builds
        the first session: one session fewer when a browser opens the app anyway)."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"panel serve exited with {self.proc.returncode}:\n"
                                   + self.read_log())
            if not session:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return self
            else:
                try:
                    with urllib.request.urlopen(self.url, timeout=30) as r:
                        if r.status == 200:
                            return self
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"panel serve did not answer in {timeout} s:\n"
                                   + self.read_log())
            time.sleep(0.25)

    def read_log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what we started
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the browser ----------------------------------------------------------------------------------
def chromium_available() -> bool:
    return Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)


def launch_chromium(playwright, *, profile: Path | None = None, viewport=(1400, 900)):
    """A persistent context on a fresh profile dir (Playwright's bundled browsers are never used)."""
    profile = profile or Path(tempfile.mkdtemp(prefix="kl-chromium-"))
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": viewport[0], "height": viewport[1]}, ignore_https_errors=False,
    )


class PageErrors:
    """Console messages of type ``error`` and uncaught exceptions of one page."""

    def __init__(self, page) -> None:
        self.items: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.items.append(f"pageerror: {exc}"))

    def _console(self, msg) -> None:
        if msg.type == "error":
            loc = msg.location or {}
            self.items.append(f"console.error: {msg.text} ({loc.get('url', '')})")

    def clear(self) -> None:
        self.items.clear()


def remove_profile(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "seed":
        print(json.dumps(seed_home(sys.argv[2])))
    else:
        sys.exit("usage: browser_support.py seed <home>")
