"""The processes that make the usage calls, and the seeding process's side of them.

Each worker (``RemoteWorker``: a fresh interpreter; ``LocalWorker``: this process) runs a
``Traffic`` on the keys ``WorkerPool`` gave it: batches of calls go out, what the calls changed
on the keys (ciphertext pools, counters, samples) comes back.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from .. import ciphertext as ct
from ..errors import KeyLedgerError
from ..service import KeyLedger
from ..service import open as open_ledger
from .metrics import Metrics
from .plan import DemoKey
from .result import Sample
from .traffic import MAIN_FIELDS, WORKER_FIELDS, Clock, Stream, quantiles

# What a call costs relative to an AES-GCM call (to balance the workers).
SPEC_COST = {"EC_P256": 2.0, "ED25519": 6.0, "EC_P384": 10.0, "RSA_2048": 3.0, "RSA_3072": 8.0,
             "RSA_4096": 20.0}


class Traffic:
    """Runs the usage calls on the keys given to it, with its own ledgers and simulated clock.

    One per worker process (``_traffic_worker``), or in the seeding process (``workers=0``).
    Lifecycle events never run here: between two batches of calls the main process does them,
    and sends the keys' new states with the next batch.
    """

    def __init__(self, home: Path, worker: bool) -> None:
        self.home = home
        self.worker = worker  # a process of its own (else the seeding process, workers=0)
        self.clock = Clock(datetime.now(UTC))
        self.leds: dict[str, KeyLedger] = {}
        self.keys: dict[str, DemoKey] = {}
        self.streams: dict[int, Stream] = {}
        self.samples: list[Sample] = []
        self.unexpected: list[str] = []
        self.unexpected_count = 0
        self._quant = quantiles()

    def ledger(self, who: str) -> KeyLedger:
        led = self.leds.get(who)
        if led is None:
            led = self.leds[who] = open_ledger(self.home, principal=who, clock=self.clock)
            if self.worker:  # the seeding process, which holds the store, ingests our journal
                led._rt.stop_background_ingest()  # its rounds would only find the store held
        return led

    def keep(self, k: DemoKey, blob: bytes, ctx: dict[str, str], who: str) -> None:
        version = ct.parse(blob)[0].version
        if len(k.pool) < 6:
            k.pool.append((blob, ctx, version, who))
        else:
            k.pool_i = (k.pool_i + 1) % 6
            k.pool[k.pool_i] = (blob, ctx, version, who)
        if version not in k.sampled:  # the first ciphertext of every version is sampled
            k.sampled.add(version)
            self.samples.append(Sample(blob, ctx, "", who, k.name, version))

    def batch(self, new_keys: list[DemoKey], new_streams: list[tuple], updates: list[tuple],
              day_start: datetime, floor: datetime, ops: list[tuple[int, int]]) -> tuple:
        if self.leds:
            # what the main process changed in the catalog since the last batch counts now, not
            # up to catalog_refresh_ms later (these calls come after it in simulated time)
            next(iter(self.leds.values()))._rt.catalog.refresh(force=True)
        for k in new_keys:
            self.keys[k.name] = k
        self.clock.now = floor
        for sid, name, op, who, rate, fixed in new_streams:
            self.streams[sid] = Stream(self, self.keys[name], op, who, rate, fixed, sid)
            self.ledger(who)  # now, while the main process leaves the store to us
        for name, values, pool in updates:
            k = self.keys[name]
            for f, v in zip(MAIN_FIELDS, values, strict=True):
                setattr(k, f, v)
            if pool is not None:
                k.pool, k.pool_i = list(pool[0]), pool[1]
        quant, clock, streams = self._quant, self.clock, self.streams
        for sid, q in ops:
            t = day_start + quant[q]
            clock.now = t if t > floor else floor
            try:
                streams[sid].run()
            except KeyLedgerError as exc:
                self.unexpected_count += 1
                if len(self.unexpected) < 20:
                    self.unexpected.append(f"{type(exc).__name__}: {exc}")
        touched = {streams[sid].k for sid in {sid for sid, _ in ops}}
        changed = [(k.name, tuple(getattr(k, f) for f in WORKER_FIELDS)) for k in touched]
        out = (changed, self.samples, self.unexpected, self.unexpected_count)
        self.samples, self.unexpected, self.unexpected_count = [], [], 0
        return out

    def close(self) -> None:
        for led in reversed(list(self.leds.values())):
            led.close()
        self.leds.clear()


def _traffic_worker(conn: Any, home: str) -> None:
    """A worker process: run batches of usage calls until told to stop (``None``)."""
    traffic = None
    try:
        traffic = Traffic(Path(home), worker=True)
        while (msg := conn.recv()) is not None:
            conn.send(("ok", traffic.batch(*msg)))
        traffic.close()
        traffic = None
        conn.send(("closed", None))
    except BaseException as exc:  # report it; the main process raises
        import traceback
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except (OSError, ValueError):
            pass
    finally:
        if traffic is not None:
            traffic.close()


def traffic_main(fd: int, home: str) -> None:
    """Entry point of a worker process (``python -c``; see ``RemoteWorker``)."""
    from multiprocessing.connection import Connection

    _traffic_worker(Connection(fd), home)


class RemoteWorker:
    """A worker process for usage calls: a fresh interpreter (its own HSM login), started with
    ``python -c`` rather than multiprocessing's spawn, so the caller's main module is never
    imported again there (a script calling seed_demo needs no ``__main__`` guard)."""

    def __init__(self, home: Path) -> None:
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        with theirs:
            code = ("import sys; from keyledger.demo_fleet.workers import traffic_main; "
                    "traffic_main(int(sys.argv[1]), sys.argv[2])")
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno()),
                                          str(home)], pass_fds=(theirs.fileno(),),
                                         stdin=subprocess.DEVNULL)
        self.conn = Connection(mine.detach())

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            self._died()

    def recv(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            self._died()
        if status == "error":
            raise KeyLedgerError(f"a demo traffic worker failed: {payload}")
        return payload

    def _died(self) -> NoReturn:
        try:
            code = self.proc.wait(5)
        except Exception:  # still running but not answering
            code = None
        raise KeyLedgerError(f"a demo traffic worker (pid {self.proc.pid}) stopped "
                             f"unexpectedly (exit code {code})")

    def close(self) -> None:
        import subprocess

        try:
            if self.proc.poll() is None:
                self.conn.send(None)
                if self.conn.poll(60):
                    self.conn.recv()
        except (OSError, EOFError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.conn.close()


class LocalWorker:
    """Usage calls in the seeding process itself (``workers=0``)."""

    def __init__(self, home: Path) -> None:
        self.traffic = Traffic(home, worker=False)
        self._out: Any = None

    def send(self, msg: tuple) -> None:
        self._out = self.traffic.batch(*msg)

    def recv(self) -> Any:
        return self._out

    def close(self) -> None:
        self.traffic.close()


class WorkerPool:
    """The traffic workers of a seeding: which keys each runs, what each was last sent, and the
    store held by the seeding process between their batches."""

    def __init__(self, home: Path, workers: int, by_name: dict[str, DemoKey], metrics: Metrics,
                 keep_store_open: Callable[[], AbstractContextManager[Any]]) -> None:
        self.home, self.by_name, self.metrics = home, by_name, metrics
        self._keep_store_open = keep_store_open  # the seeding process's lead ledger's
        # usage calls run in worker processes (0: in this process), each on its own keys
        self.workers = workers
        self.runners: list[RemoteWorker | LocalWorker] = []
        n = max(1, workers)
        self._loads = [0.0] * n
        self._new_keys: list[list[DemoKey]] = [[] for _ in range(n)]
        self._new_streams: list[list[tuple]] = [[] for _ in range(n)]
        self._worker_keys: list[list[DemoKey]] = [[] for _ in range(n)]
        self._sent: dict[str, tuple] = {}
        self._opened: list[set[str]] = [set() for _ in range(n)]  # principals each worker opened
        self._hold: contextlib.ExitStack | None = None  # keep_store_open(), while it lasts

    def assign(self, k: DemoKey, rate: float, streams: list[Stream]) -> None:
        """The worker with the least traffic (weighted by what a call costs) takes the key."""
        w = min(range(len(self._loads)), key=self._loads.__getitem__)
        k.worker = w
        self._loads[w] += rate * SPEC_COST.get(k.spec, 1.0)
        self._new_keys[w].append(k)
        self._new_streams[w] += [st.spec() for st in streams]

    def hold_store(self) -> None:
        """Keep the store open in this process (~20x cheaper lifecycle transactions). The
        workers' usage calls only journal; a worker needs the store only to open a ledger for a
        principal new to it, and ``dispatch`` releases the store for those batches."""
        if self._hold is None:
            self._hold = contextlib.ExitStack()
            self._hold.enter_context(self._keep_store_open())

    def release_store(self) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.close()

    def start(self) -> None:
        self.runners = [RemoteWorker(self.home) if self.workers else LocalWorker(self.home)
                        for _ in range(max(1, self.workers))]

    def stop(self) -> None:
        runners, self.runners = self.runners, []
        for r in runners:
            r.close()

    def dispatch(self, ops: list[Stream], qs: list[int], j: int, j2: int, day_start: datetime,
                floor: datetime) -> None:
        """Run ops[j:j2] (at day_start + quantile offsets, never before ``floor``) in the
        workers, each the calls on its keys, and take back what the calls changed."""
        per: list[list[tuple[int, int]]] = [[] for _ in self.runners]
        for i in range(j, j2):
            s = ops[i]
            per[s.k.worker].append((s.sid, qs[i]))
        opening = [{spec[3] for spec in self._new_streams[w]} - self._opened[w] if per[w]
                   else set() for w in range(len(self.runners))]
        held = self._hold is not None
        if held and any(opening):  # workers open ledgers for principals new to them
            self.release_store()
        busy = []
        for w, runner in enumerate(self.runners):
            if not per[w]:
                continue
            updates = []
            for k in self._worker_keys[w]:
                sent = self._sent.get(k.name)
                now = (tuple(getattr(k, f) for f in MAIN_FIELDS), k.pool_rev)
                if sent != now:
                    pool = (list(k.pool), k.pool_i) if sent is None or sent[1] != k.pool_rev \
                        else None
                    updates.append((k.name, now[0], pool))
                    self._sent[k.name] = now
            runner.send((self._new_keys[w], self._new_streams[w], updates, day_start, floor,
                         per[w]))
            self._worker_keys[w] += self._new_keys[w]
            self._new_keys[w], self._new_streams[w] = [], []
            busy.append(w)
        for w in busy:
            changed, samples, unexpected, n_unexpected = self.runners[w].recv()
            for name, values in changed:
                k = self.by_name[name]
                for f, v in zip(WORKER_FIELDS, values, strict=True):
                    setattr(k, f, v)
            self.metrics.samples += samples
            self.metrics.unexpected_count += n_unexpected
            self.metrics.unexpected += unexpected[:max(0, 20 - len(self.metrics.unexpected))]
            self._opened[w] |= opening[w]
        if held:
            self.hold_store()
        self.metrics.calls += j2 - j
