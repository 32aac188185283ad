"""The simulation: a clock moved through the history, the calendar of lifecycle events, and the
day-by-day loop that plays each event between the batches of usage calls before it."""

from __future__ import annotations

import bisect
import itertools
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..service import KeyLedger
from ..service import open as open_ledger
from .metrics import Metrics
from .plan import DAYS_PER_MONTH, SECURITY_LEAD, Plan
from .result import write_demo_file
from .story import Story
from .traffic import Clock, TrafficModel, quantiles
from .workers import WorkerPool


class Simulation:
    """One seeding: the plan, its story and traffic, the workers, and what was measured."""

    def __init__(self, home: Path, n_keys: int, months: int, seed: int, end: datetime,
                 progress: bool, workers: int = 2) -> None:
        self.home, self.n_keys, self.months, self.seed = home, n_keys, months, seed
        self.rng = random.Random(seed)
        self.days = max(1, round(months * DAYS_PER_MONTH))
        self.end = end
        self.day0 = datetime(end.year, end.month, end.day, tzinfo=UTC) - timedelta(days=self.days)
        self.start = self.day0 + timedelta(hours=8)
        self.clock = Clock(self.start)
        self.progress = progress
        self.plan = Plan(n_keys, self.days, self.rng)
        self.by_name = {k.name: k for k in self.plan.keys}
        self.leds: dict[str, KeyLedger] = {}
        self.events: list[tuple[datetime, int, Callable[[], object], str]] = []
        self.backups_dir = home.parent / f"{home.name}-backups"
        self.metrics = Metrics()
        self._seq = itertools.count()
        self._quant = quantiles()
        self.pool = WorkerPool(home, workers, self.by_name, self.metrics,
                               lambda: self.ledger(SECURITY_LEAD).keep_store_open())
        self.model = TrafficModel(self.plan, self.rng, self.day0, self.days, self.pool)
        self.story = Story(self)

    def ledger(self, who: str) -> KeyLedger:
        led = self.leds.get(who)
        if led is None:
            first = not self.leds
            led = self.leds[who] = open_ledger(self.home, principal=who, clock=self.clock)
            if first:  # the home exists now: mark it as a demo being seeded
                write_demo_file(self.home, {"status": "seeding", "seed": self.seed,
                                             "keys": self.n_keys, "months": self.months})
        return led

    def at(self, when: datetime, fn: Callable[[], object], what: str | None = None) -> None:
        """Run ``fn`` at simulated time ``when``; its wall time is counted under ``what``."""
        name = getattr(fn, "__name__", "<lambda>")
        what = what or ("other lifecycle events" if name == "<lambda>" else name.replace("_", " "))
        self.events.append((when, next(self._seq), fn, what))

    def day_at(self, day: int, hour: float) -> datetime:
        return self.day0 + timedelta(days=day, hours=hour)

    def run(self) -> None:
        from tqdm.auto import tqdm

        self.model.calibrate()
        self.story.schedule()
        final = self.end - timedelta(minutes=30)
        self.events = sorted((e for e in self.events if e[0] < final), key=lambda e: (e[0], e[1]))
        show = self.progress and sys.stderr.isatty()
        bar = tqdm(total=self.days + 1, desc="seeding demo", unit="day", file=sys.stderr,
                   disable=not show, leave=False)
        ev = 0
        quant, nq = self._quant, len(self._quant)
        clock = self.clock
        try:
            self.pool.start()
            self.pool.hold_store()
            for d in range(self.days + 1):
                u0 = time.perf_counter()
                day_start = self.day0 + timedelta(days=d)
                day_end = min(day_start + timedelta(days=1), final)
                ops = self.model.day_ops(d) if d else []
                n = len(ops)
                qs = [int((j + 0.5) * nq / n) for j in range(n)]
                times = [day_start + quant[q] for q in qs]
                j = 0
                floor = day_start
                while True:
                    nxt = self.events[ev][0] if ev < len(self.events) else None
                    limit = nxt if nxt is not None and nxt < day_end else day_end
                    j2 = bisect.bisect_left(times, limit, j)
                    if j2 > j:  # the usage calls up to the next event, in the workers
                        self.pool.dispatch(ops, qs, j, j2, day_start, floor)
                        clock.now = max(clock.now, times[j2 - 1], floor)
                        j = j2
                    if nxt is None or nxt >= day_end:
                        self.metrics.timings["usage calls"] += time.perf_counter() - u0
                        break
                    clock.now = max(nxt, clock.now)
                    t0 = time.perf_counter()
                    self.metrics.timings["usage calls"] += t0 - u0
                    self.events[ev][2]()
                    u0 = time.perf_counter()
                    self.metrics.timings[self.events[ev][3]] += u0 - t0
                    floor = clock.now
                    ev += 1
                bar.update(1)
                if d % 7 == 0:
                    bar.set_postfix_str(f"{self.metrics.calls:,} calls")
        finally:
            self.pool.release_store()
            bar.close()
        self.pool.stop()  # their journals are on disk; any ledger's ingest takes them
        # remaining events (none normally) and the closing sequence, in the last 30 minutes
        t0 = time.perf_counter()
        with self.ledger(SECURITY_LEAD).keep_store_open():
            for when, _, fn, _ in self.events[ev:]:
                clock.now = max(when, clock.now)
                fn()
            clock.now = self.end - timedelta(minutes=20)
            self.story.run_due()
        self.metrics.timings["run due"] += time.perf_counter() - t0

    def close(self) -> None:
        self.pool.stop()
        for led in reversed(list(self.leds.values())):
            led.close()
        self.leds.clear()
