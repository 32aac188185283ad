"""Shared fixtures: a fresh home per test on a real SoftHSM2 token and a real DuckDB file."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import keyledger as kl
from keyledger.config import find_softhsm_module
from keyledger.hsm.softhsm import softhsm_conf_text
from keyledger.runtime import HomeRuntime
from keyledger.store.journal import journal_pid

# A test that hangs (a deadlock holding the GIL cannot be interrupted from Python) ends its
# process after this long, with every thread's stack on stderr, instead of hanging the run.
HANG_LIMIT_S = float(os.environ.get("KEYLEDGER_TEST_HANG_LIMIT_S", "900"))
_HANG_FD: int | None = None
TEMPLATE_INGEST_INTERVAL_MS = 5000


def pytest_configure(config: pytest.Config) -> None:
    global _HANG_FD
    _HANG_FD = os.dup(sys.__stderr__.fileno())  # the terminal's, not a test's captured stderr


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if _HANG_FD is not None:
        faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True, file=_HANG_FD)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class FakeClock:
    """An injectable clock: ``clock()`` returns the current simulated UTC time."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now += timedelta(**kwargs)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@dataclass(frozen=True)
class HomeTemplate:
    """A home provisioned once per test process: token, store, audit and seal keys, mode."""

    path: Path
    mode_note: str | None  # what the first open of a new home says about its mode


@pytest.fixture(scope="session")
def simulation_template(tmp_path_factory: pytest.TempPathFactory) -> HomeTemplate:
    """Provision a simulation home as ``kl.open(new_home, clock=...)`` does, up to (not
    including) its first open: no principal, no audit record. Its process-wide runtime is
    released again, and the journal it opened (empty) is dropped, as a new home has none."""
    path = tmp_path_factory.mktemp("template") / "home"
    rt = HomeRuntime.acquire(path, simulate=True)
    note = rt.mode_note
    rt.release()
    for journal in (path / "journal").iterdir():
        if journal.stat().st_size == 0:
            journal.unlink()
    # Background ingest every 5 s instead of every second: most tests end sooner, and each
    # round costs ~70 ms of CPU (every read, flush_audit and close still ingest first, so
    # nothing a test reads changes). Tests of the background ingest itself set their own.
    settings = path / "keyledger.toml"
    settings.write_text(settings.read_text().replace(
        "[audit]\n", f"[audit]\ningest_interval_ms = {TEMPLATE_INGEST_INTERVAL_MS}\n", 1))
    return HomeTemplate(path, note)


def copy_home(template: HomeTemplate, home: Path) -> None:
    """A copy of the template at ``home``; the SoftHSM2 config names its token dir by absolute
    path, so it is pointed at the copy's own tokens (as a restore does)."""
    shutil.copytree(template.path, home, symlinks=True)
    (home / "softhsm2.conf").write_text(softhsm_conf_text(home / "tokens"))


@pytest.fixture
def ledger(home: Path, clock: FakeClock, simulation_template: HomeTemplate):
    """``kl.open(home, principal="alice", clock=clock)`` of a new home. The home is a copy of
    the process's template (provisioning a token and store per test dominated the suite's
    time), opened with the note a just-created home's first open records, so the ledger, its
    audit trail and its HSM objects are what a newly provisioned home gives. Tests of
    provisioning itself open ``home`` directly."""
    if home.exists():  # a test prepared the folder itself: open it as it is
        led = kl.open(home, principal="alice", clock=clock)
    else:
        copy_home(simulation_template, home)
        with contextlib.ExitStack() as held:  # one start of the store for the whole open
            rt = HomeRuntime.acquire(home, held=held)
            try:
                rt.mode_note = simulation_template.mode_note
                led = kl.open(home, principal="alice", clock=clock)
            finally:
                rt.release()
    try:
        yield led
    finally:
        led.close()


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter (its own PKCS#11 login and journal)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=check)


# -- the token as another process sees it (pkcs11-tool from OpenSC) ---------------------------------
PKCS11_TOOL = shutil.which("pkcs11-tool")
SOFTHSM_MODULE = find_softhsm_module() or "/usr/lib/softhsm/libsofthsm2.so"


def hsm_objects(home: Path) -> list[dict[str, str]]:
    """Every object on the home's token, as `pkcs11-tool --list-objects --login` prints them:
    one dict per object with its type line and lower-cased fields (label, id, access, ...)."""
    pin = (home / "user.pin").read_text().strip()
    out = subprocess.run(
        [PKCS11_TOOL or "pkcs11-tool", "--module", SOFTHSM_MODULE, "--list-objects", "--login",
         "--pin", pin],
        env={**os.environ, "SOFTHSM2_CONF": str(home / "softhsm2.conf")},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    objects: list[dict[str, str]] = []
    for line in out.splitlines():
        if line and not line[0].isspace():
            objects.append({"type": line.strip()})
        elif objects and ":" in line:
            field, _, value = line.strip().partition(":")
            objects[-1][field.strip().lower()] = value.strip().strip("'")
    return objects


def hsm_labels(home: Path, prefix: str = "kl:") -> list[str]:
    """Sorted labels of the token's objects that start with ``prefix`` (keyledger key versions)."""
    return sorted(o["label"] for o in hsm_objects(home) if o.get("label", "").startswith(prefix))


# -- after a SIGKILL ---------------------------------------------------------------------------------
_UNPROVEN = re.compile(r"^journal (\S+): records (\d+)-(\d+) are unproven")


def verify_after_kill(led: kl.KeyLedger, *killed_pids: int) -> kl.VerifyReport:
    """``verify_audit()`` after SIGKILLing ``killed_pids`` (or restoring a backup taken while
    they ran): their records of the last seal interval before the kill (the backup) are
    present but unproven (docs/audit.md, "Seals"). Asserts that
    this is all that is wrong, accepts exactly those ranges (``led`` needs the admin role) and
    returns the verification that follows, which must be OK."""
    report = led.verify_audit()
    if report.ok:
        return report
    for problem in report.problems:
        m = _UNPROVEN.match(problem)
        assert m and journal_pid(m.group(1)) in killed_pids, str(report)
        led.accept_unproven(m.group(1), int(m.group(3)), "its process was SIGKILLed by the test")
    report = led.verify_audit()
    assert report.ok and report.accepted, str(report)
    return report


# -- scheduling: `make test` runs the suite on several workers, one test module per worker at a
# time (pytest-xdist --dist loadfile). Modules are handed out in collection order (the Makefile
# passes --no-loadscope-reorder: pytest-xdist 3.x would otherwise sort them by their number of
# tests, which put test_dashboard_browser, the longest, at the end), so the long
# ones go first (ordered by their measured wall time in a full run, longest first) and the many
# short ones fill the gaps at the end; a long module left to the end would be the run's tail.
SLOW_FIRST = (  # by wall time per module, measured over a whole run (docs/operations.md)
    "test_dashboard_browser.py", "test_demo_fleet.py", "test_compliance.py",
    "test_jupyterlab_browser.py", "test_multiprocess.py", "test_rotation.py",
    "test_notebook7_browser.py", "test_connect.py", "test_cli.py", "test_crash.py",
    "test_serve.py", "test_notebooks.py", "test_access.py", "test_dashboard_state.py",
    "test_hot_path.py", "test_concurrent_rotation.py", "test_notebook_setup.py", "test_backup.py",
    "test_rotation_two_years.py", "test_kms_api.py", "test_byok.py", "test_inputs.py",
    "test_widgets.py", "test_startup.py", "test_lifecycle.py", "test_hostile.py",
    "test_notebook_frames.py", "test_audit.py", "test_usage_limit.py", "test_journal_seals.py",
    "test_cli_dashboard.py", "test_output_paths.py", "test_analytics.py", "test_batch.py",
    "test_catalog_export.py", "test_charts.py", "test_kms_clients.py", "test_trusted_time.py",
    "test_envelope.py", "test_parquet.py", "test_hsm_open.py", "test_crypto.py",
    "test_store_lock.py", "test_ciphertext.py", "test_memory_backend.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable sort
