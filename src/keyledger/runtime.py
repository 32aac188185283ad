"""Per-process, per-home shared machinery: HSM session pool, store, journal, catalog, ingester.

Several ``KeyLedger`` objects (say, one per principal) in one process share one ``HomeRuntime``:
PKCS#11 allows one login per process, and one journal per process keeps the chain simple.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .config import Settings, load_settings
from .errors import AuditError, ConfigError, KeyLedgerError, KeyStateError
from .hsm.backend import HsmBackend
from .hsm.factory import open_backend, release_backend
from .hsm.softhsm import provision_embedded
from .intents import recover
from .model import SPECS
from .store import audit as audit_repo
from .store import checkpoints, meta, seals
from .store import ingest as ingest_repo
from .store import intents as intents_repo
from .store import keys as keys_repo
from .store.catalog import CatalogCache, SnapshotExporter
from .store.db import Database, Tx
from .store.journal import JournalWriter, journal_pid, seal_message
from .store.schema import migrate
from .store.storelock import flock_until, store_lock
from .store.usage import UsageCounters

log = logging.getLogger("keyledger")
AUDIT_SPEC = SPECS["EC_P256"]
SEAL_SPEC = SPECS["HMAC_SHA256"]
# how long a background ingest round waits for a store another process holds: long enough for
# a short transaction (~25 ms), short enough not to hold up this process's own store calls
BACKGROUND_INGEST_WAIT_S = 0.2
# A home is created real (waiting periods judged on the system clock) or as a simulation (an
# injected clock is accepted). The mode is kept in the store's meta AND in a private HSM data
# object, so someone who can write the home's files but lacks the PIN cannot flip it unnoticed.
REAL, SIMULATION = "real", "simulation"
MODE_LABEL_PREFIX = "keyledger-home-mode:"
SIMULATION_LABEL = "SIMULATION \u2014 simulated clock"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def naive(dt: datetime) -> datetime:
    """UTC without tzinfo, as DuckDB TIMESTAMP columns store it."""
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


@dataclass
class ReconcileReport:
    """What the last open found and repaired after an interrupted create/rotate/destroy."""

    repaired: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.repaired and not self.problems

    def __str__(self) -> str:
        if self.clean:
            return "catalog and HSM agree"
        return "; ".join(self.repaired + self.problems)


class IngestBatching:
    """When the background ingest runs a round: every ``ingest_interval_ms`` while calls are
    few, but in bigger batches while they stream in.

    A round with records costs ~35-70 ms of CPU whatever it moves (the store's attach, its
    checks and checkpoint, the detach's checkpoint: bench/ingest_round.py), so while the
    previous round moved at least ``BUSY_RECORDS`` records and the journals keep growing,
    rounds are skipped: for up to ``BUSY_ROUNDS`` intervals, or until ``BUSY_BYTES`` are
    pending. Nothing waits for them: the records are in the journals (written before each
    call returned, fsynced in groups, sealed), and every read (``audit``, ``query``, the
    dashboard's reload, ``verify_audit``, ``flush_audit``) ingests what is pending first. When
    the journals stop growing the next interval ingests at once."""

    BUSY_RECORDS = 1_000
    BUSY_ROUNDS = 5
    BUSY_BYTES = 64 << 20

    def __init__(self) -> None:
        self.busy = False
        self.skipped = 0
        self.seen = 0  # the backlog at the previous interval

    def due(self, backlog: int) -> bool:
        """Whether to ingest now, given the journal bytes pending."""
        if not backlog:
            self.busy, self.skipped, self.seen = False, 0, 0
            return False
        growing, self.seen = backlog > self.seen, backlog
        if (self.busy and growing and self.skipped + 1 < self.BUSY_ROUNDS
                and backlog < self.BUSY_BYTES):
            self.skipped += 1
            return False
        return True

    def ingested(self, records: int) -> None:
        self.busy, self.skipped, self.seen = records >= self.BUSY_RECORDS, 0, 0


class HomeRuntime:
    _registry: dict[Path, HomeRuntime] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def acquire(cls, home: Path, *, simulate: bool = False,
                held: contextlib.ExitStack | None = None) -> HomeRuntime:
        """The process's runtime of ``home``; ``simulate`` only matters when it creates the home
        (a new home becomes a simulation home), never for an existing one. ``held``: keep the
        store open (``Database.hold``) on this stack from the runtime's first transaction until
        the stack closes, so the rest of an open reuses that one start of DuckDB."""
        with cls._registry_lock:
            rt = cls._registry.get(home)
            made = rt is None
            if rt is None:
                rt = cls(home, simulate=simulate, held=held)
                cls._registry[home] = rt
            rt.refs += 1
        if held is not None and not made:
            try:
                held.enter_context(rt.db.hold())
            except BaseException:
                rt.release()
                raise
        return rt

    def release(self) -> None:
        """Drop one reference; the last one shuts the runtime down. An ``acquire`` of the
        home in another thread waits for that: a new runtime made meanwhile would lock the
        old run/<pid>.lock just before the shutdown unlinks it, and other processes would take
        this live process for dead (and roll back its in-flight changes)."""
        with self._registry_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            self._registry.pop(self.home, None)
            self.shutdown()

    def __init__(self, home: Path, *, simulate: bool = False,
                 held: contextlib.ExitStack | None = None) -> None:
        self.home = home
        self.refs = 0
        self.mode_note: str | None = None  # said once, in the next open's audit record
        settings = load_settings(home)
        if settings is None:
            if home.exists() and any(home.iterdir()):
                raise ConfigError(
                    f"{home} exists but is not a keyledger home (no keyledger.toml); "
                    "choose an empty folder or set KEYLEDGER_HOME"
                )
            hsm_cfg = provision_embedded(home)
            settings = Settings(home, hsm_cfg)
        self.settings: Settings = settings
        self.backend: HsmBackend = open_backend(settings, simulate=simulate)
        # each export of this process goes straight into its own cache (no re-read); the
        # store's lock tells it whether another process can have committed since its last
        self.catalog = CatalogCache(home, settings.audit.catalog_refresh_ms)
        self.exporter = SnapshotExporter(home, self.catalog.install,
                                         store_lock(settings.db_path))
        try:
            self.db = Database(settings.db_path, settings.store_busy_timeout_s,
                               on_commit=self.exporter)
            if held is not None:
                held.enter_context(self.db.hold())
            with self.db.write() as tx:
                migrate(tx)
                known = meta.get_many(tx, ("home_id", "audit_key", "seal_key", "home_mode"))
                new_home = "home_id" not in known
                self.home_id = meta.get_or_make(tx, "home_id", lambda: str(uuid.uuid4()), known)
                self.audit_handle = bytes.fromhex(meta.get_or_make(
                    tx, "audit_key", self._new_audit_key, known))
                self.seal_handle = bytes.fromhex(meta.get_or_make(
                    tx, "seal_key", self._new_seal_key, known))
                if self._seal_key_is_new:
                    self._seal_ingested(tx)
                mode = self._home_mode(tx, new_home, simulate, known.get("home_mode"))
                self.simulation = mode == SIMULATION
            self.usage = UsageCounters(home / "usage")
            self.journal = JournalWriter(settings.journal_dir, strict=settings.audit.strict,
                                         fsync_interval_ms=settings.audit.fsync_interval_ms,
                                         seal=self.seal_mac)
        except BaseException:
            release_backend(self.backend)
            raise
        self._known_offsets: dict[str, int] = {}
        self._audit_public_key: ec.EllipticCurvePublicKey | None = None
        # Intents of operations running in this process; other processes prove they are alive
        # by holding a flock on run/<pid>.lock (released by the kernel when they die).
        self.in_flight: set[str] = set()
        self._run_dir = home / "run"
        self._run_dir.mkdir(mode=0o700, exist_ok=True)
        self._alive_path = self._run_dir / f"{os.getpid()}.lock"
        self._alive_fd = os.open(self._alive_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._alive_fd, fcntl.LOCK_EX)
        self._ingest_lock = threading.Lock()
        self._stop = threading.Event()
        self._ingester = threading.Thread(target=self._ingest_loop, name="keyledger-ingest",
                                          daemon=True)
        self._ingester.start()
        self._closed = False
        atexit.register(self.shutdown)

    # -- setup helpers -----------------------------------------------------------------------
    def _home_mode(self, tx: Tx, new_home: bool, simulate: bool, stored: str | None) -> str:
        """Record the mode of a new home (or of a home made before modes existed: real), or
        check the store's copy against the HSM's. The HSM's copy wins: a missing store row is
        written back from it; a store row without the HSM object, or differing, is refused."""
        label = MODE_LABEL_PREFIX + self.home_id
        in_hsm = self._hsm_mode(label, expected=stored is not None)
        if not in_hsm and stored is None:
            mode = SIMULATION if new_home and simulate else REAL
            self.backend.put_data(label, mode.encode())  # first: the store row commits after
            meta.put(tx, "home_mode", mode)
            self.mode_note = (f"created as a simulation home ({SIMULATION_LABEL})"
                              if mode == SIMULATION else
                              "a real home: waiting periods are judged on the system clock")
            return mode
        if len(in_hsm) != 1 or (stored is not None and stored not in in_hsm):
            raise ConfigError(
                f"the home mode recorded in {self.settings.db_path.name} "
                f"({stored or 'none'}) does not match the one kept in the HSM "
                f"({', '.join(sorted(in_hsm)) or 'none'}): the store was changed outside "
                "keyledger; restore the home from a backup")
        mode = in_hsm.pop()
        if stored is None:
            meta.put(tx, "home_mode", mode)
        return mode

    def _hsm_mode(self, label: str, *, expected: bool) -> set[str]:
        """The mode values the HSM keeps under ``label``. When the store says there is one, an
        empty answer is retried (as for the audit head) before the store is called changed."""
        for delay in (0, 0.01, 0.05, 0.1) if expected else (0,):
            time.sleep(delay)
            found = {v.decode(errors="replace") for v in self.backend.get_data(label)}
            if found:
                return found
        return set()

    def trusted_now(self) -> datetime:
        """The system clock (UTC), never earlier than a time this process already handed out, so
        a stepped-back system clock cannot make this process's audit times go backwards.
        (Not floored by times read from the store: someone who can write the store could then
        move trusted time forward.)"""
        return _EPOCH + timedelta(microseconds=self.trusted_us())

    def trusted_us(self) -> int:
        """``trusted_now()`` as microseconds since the epoch (an audit record's time), read
        without building a datetime: every audited call reads it once."""
        return self.journal.trusted_us()  # under the journal's lock (see append_ok)

    def _new_audit_key(self) -> str:
        handle = uuid.uuid4().bytes
        self.backend.generate(AUDIT_SPEC, handle, f"keyledger-audit:{self.home}", exportable=False)
        return handle.hex()

    _seal_key_is_new = False

    def _new_seal_key(self) -> str:
        """The HMAC key that seals journals (non-extractable): made with the home, or on the
        first open of a home made before seals existed."""
        handle = uuid.uuid4().bytes
        self.backend.generate(SEAL_SPEC, handle, f"keyledger-seal:{self.home}", exportable=False)
        self._seal_key_is_new = True
        return handle.hex()

    def _seal_ingested(self, tx: Tx) -> None:
        """On the upgrade of a home made before seals existed: seal what is already in the
        ledger (under its signed checkpoints), so that only later records need journal seals."""
        for journal, jseq, tip in audit_repo.never_sealed(tx):
            mac = self.seal_mac(seal_message(journal, jseq, tip)).hex()
            audit_repo.set_seal(tx, journal, jseq, tip, mac)

    def seal_mac(self, message: bytes) -> bytes:
        return self.backend.mac(self.seal_handle, message)

    def check_seal(self, journal: str, jseq: int, tip: str, mac: bytes) -> bool:
        """Whether a seal's MAC was made by the home's HSM seal key."""
        return self.backend.verify_mac(self.seal_handle, seal_message(journal, jseq, tip), mac)

    def writer_alive(self, journal: str) -> bool:
        """Whether the journal's writer still runs (and so will seal what it wrote)."""
        if journal == self.journal.journal:
            return not self._closed
        pid = journal_pid(journal)
        if pid is None or pid == os.getpid():  # an earlier journal of this process: closed
            return False
        return self.owner_running(pid, "")

    def await_seals(self, *, wait: bool = True) -> dict[str, int] | None:
        """Give the running writers one seal round for the unsealed records ingested so far.

        Returns, per live journal, the jseq through which a seal is now due: what is still
        unsealed there after the wait is a finding; newer records are pending. A writer seals
        every ``fsync_interval_ms``, so the wait is short and only happens while one is busy.
        ``wait=False`` (for a caller holding the store, which must not sleep on it): None
        instead of waiting when a live writer still owes a seal.
        """
        self.ingest()
        interval = self.settings.audit.fsync_interval_ms / 1000
        deadline = time.monotonic() + max(2.0, 20 * interval)
        due: dict[str, int] | None = None
        while True:
            with self.db.read() as tx:
                rows = audit_repo.unsealed(tx)
            if due is None:
                due = {j: tip for j, tip, _ in rows if self.writer_alive(j)}
            if not any(j in due and sealed < due[j] for j, _, sealed in rows) \
                    or time.monotonic() > deadline:
                return due
            if not wait:
                return None
            time.sleep(interval)
            self.ingest()

    def journal_check(self, due: dict[str, int]) -> seals.JournalCheck:
        return seals.JournalCheck(self.settings.journal_dir, self.check_seal, self.writer_alive,
                                  due)

    @property
    def head_label(self) -> str:
        return checkpoints.HEAD_LABEL_PREFIX + self.home_id

    # -- audit ledger --------------------------------------------------------------------------
    def sign_checkpoint(self, digest: bytes) -> bytes:
        return self.backend.sign(AUDIT_SPEC, self.audit_handle, digest)

    def verify_checkpoint(self, digest: bytes, signature: bytes) -> bool:
        """Verify with the public key read from the HSM, never one stored in the ledger."""
        if self._audit_public_key is None:
            key = serialization.load_der_public_key(
                self.backend.public_key_der(AUDIT_SPEC, self.audit_handle))
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise AuditError("the HSM audit key is not an EC key; the home's token was "
                                 "changed outside keyledger")
            self._audit_public_key = key
        pub = self._audit_public_key
        try:
            pub.verify(signature, digest, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            return False

    def ingest(self, force: bool = False, *, for_read: bool = False,
               busy_timeout: float | None = None) -> ingest_repo.IngestResult:
        """Move pending journal lines of every process into DuckDB and checkpoint them.

        ``for_read``: a read only needs what changed the store; when this process's own
        pending lines are all reads (e.g. the previous query's audit record) and no other
        journal grew, skip (the background ingest takes them within a second).
        ``busy_timeout``: how long to wait for a store another process holds (default: the
        store's busy timeout). This process's own records are sealed first, so what it ingests
        of them is proven."""
        self.journal.seal()
        with self._ingest_lock:
            skip = None
            if for_read and self.journal.changed_upto <= self._known_offsets.get(
                    self.journal.journal, 0):
                skip = self.journal.journal
            if not force and not ingest_repo.pending_bytes(self.settings.journal_dir,
                                                           self._known_offsets, skip):
                return ingest_repo.IngestResult()
            with self.db.write(export=False, timeout=busy_timeout) as tx:
                def guard(last: checkpoints.Newest, offsets_tips: str) -> None:
                    head = self.audit_head(tx, last.checkpoint is not None)
                    checkpoints.check_before_extend(tx, self.verify_checkpoint, head, last,
                                                    offsets_tips)

                result = ingest_repo.ingest(tx, self.settings.journal_dir, self.sign_checkpoint,
                                            self.trusted_now(), self._known_offsets,
                                            self.check_seal, guard)
                if result.checkpoint is not None:
                    value = checkpoints.head_value(result.checkpoint, result.checkpoint_hash)
                    tx.after_commit.append(lambda: self.backend.put_data(self.head_label, value))
            return result

    def audit_head(self, tx: Tx | None = None,
                   has_checkpoints: bool | None = None) -> tuple[int, str] | None:
        """The newest checkpoint as kept in the HSM, read while holding the store (so no other
        process moves it meanwhile). SoftHSM2 can briefly hide an object that another process
        is replacing, so an empty answer is retried when checkpoints exist (``has_checkpoints``:
        whether they do, when the caller already knows)."""
        if tx is None:
            with self.db.read() as own:
                return self.audit_head(own)
        if has_checkpoints is None:
            has_checkpoints = audit_repo.has_checkpoints(tx)
        for delay in (0, 0.01, 0.02, 0.05, 0.1) if has_checkpoints else (0,):
            time.sleep(delay)
            head = checkpoints.parse_head(self.backend.get_data(self.head_label))
            if head is not None:
                return head
        return None

    def stop_background_ingest(self) -> None:
        """Leave this process's journal to other processes' ingest (and to reads, flush_audit
        and close here): for a helper process while another one holds the store."""
        self._stop.set()

    def _ingest_loop(self) -> None:
        interval = self.settings.audit.ingest_interval_ms / 1000
        batching = IngestBatching()
        while not self._stop.wait(interval):
            backlog = ingest_repo.backlog_bytes(self.settings.journal_dir, self._known_offsets)
            if not batching.due(backlog):
                continue
            try:  # a short wait: a long one would block this process's own store calls
                batching.ingested(self.ingest(busy_timeout=BACKGROUND_INGEST_WAIT_S).records)
            except KeyLedgerError as exc:  # busy store: the next round or a reader will do it
                log.debug("background ingest skipped: %s", exc)
            except Exception:  # never let a background thread kill the process
                log.exception("background ingest failed")

    # -- access settings -------------------------------------------------------------------------
    def home_quorum(self) -> int:
        """Approvals needed for guarded actions unless a key's policy says otherwise."""
        return self.home_policy().get("quorum", 1)

    @property
    def creator_is_user(self) -> bool:
        return bool(self.home_policy().get("creator_is_user", True))

    def home_policy(self) -> dict:
        return self.catalog.home_policy()

    def pid_alive(self, pid: int) -> bool:
        """Whether process ``pid`` (a writer of this home) still runs."""
        return self.owner_running(pid, "")

    # -- one rotation of a key at a time ----------------------------------------------------------
    @contextlib.contextmanager
    def key_lock(self, key_id: str, name: str, timeout: float) -> Iterator[None]:
        """Hold the key's rotation lock for the block, across processes and threads.

        An exclusive flock on ``run/key-<key_id>.lock``: each caller opens its own descriptor,
        so threads of one process exclude each other too, and the kernel releases the lock of
        a process that dies. Waits up to ``timeout`` seconds for another holder to finish.
        """
        fd = os.open(self._run_dir / f"key-{key_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not flock_until(fd, time.monotonic() + timeout, 0.05):
                raise KeyStateError(f"another rotation of {name!r} has been running for more "
                                    f"than {timeout:g} s; retry once it has finished")
            yield
        finally:
            os.close(fd)  # drops the lock

    # -- crash reconciliation ------------------------------------------------------------------
    def owner_running(self, pid: int, intent_id: str) -> bool:
        """True while the process that wrote the intent may still be working on it."""
        if pid == os.getpid():
            return intent_id in self.in_flight
        try:
            fd = os.open(self._run_dir / f"{pid}.lock", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def reconcile(self, actor: str, full: bool = False, *,
                  now: datetime | None = None) -> ReconcileReport:
        """Finish or roll back what an interrupted HSM change left behind (``intents.RECOVERY``
        says which, per kind: create, rotate, import, destroy, trim).

        Uses the intents written before each HSM step (found by CKA_ID, never by listing the
        token). ``full`` also checks every live version's material still exists in the HSM.
        """
        report = ReconcileReport()
        now = naive(now or self.trusted_now())
        with self.db.write() as tx:
            for intent in intents_repo.pending(tx):
                if self.owner_running(intent.pid, intent.intent_id):
                    continue  # in flight elsewhere: its owner finishes or rolls it back
                repaired, line = recover(tx, intent, self.backend, actor, now)
                (report.repaired if repaired else report.problems).append(line)
            if full:
                for _key_id, name, version, handle in keys_repo.live_versions(tx):
                    if not self.backend.exists(bytes.fromhex(handle)):
                        report.problems.append(
                            f"{name!r} v{version}: catalog row without HSM material; restore the "
                            "token from a backup or mark the version destroyed")
        self.catalog.refresh(force=True)
        return report

    # -- teardown ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._stop.set()
        if self._ingester.is_alive() and self._ingester is not threading.current_thread():
            self._ingester.join(timeout=5)
        self.usage.release()
        self.journal.close()
        try:
            self.ingest()
        except KeyLedgerError as exc:  # the records stay in the journal for the next reader
            log.debug("final ingest skipped: %s", exc)
        except Exception:  # never leave the HSM login behind because of an ingest bug
            log.exception("final ingest failed; records stay in the journal")
        release_backend(self.backend)
        try:
            self._alive_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._alive_fd)
        atexit.unregister(self.shutdown)
