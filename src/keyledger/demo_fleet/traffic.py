"""The daily usage traffic of the estate: who calls what on which key, how often, and when.

``TrafficModel`` (in the seeding process) sets each key's call rates and draws each day's calls;
``Stream`` is one kind of call, run by a ``workers.Traffic``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..service import KeyLedger
from .plan import DemoKey, Plan

if TYPE_CHECKING:
    from .workers import WorkerPool

# Usage calls per key per simulated day on average at the default size (150 keys, 18 months):
# about 1 M audited calls in all.
OPS_PER_KEY_DAY = 12.6
# Weekday traffic, UTC hour profile (business hours busiest).
WEEKDAY_FACTOR = (1.0, 1.05, 1.0, 0.95, 0.9, 0.4, 0.3)
HOUR_WEIGHTS = (1, 1, 1, 1, 1, 2, 4, 7, 9, 10, 10, 9, 8, 9, 10, 10, 9, 7, 5, 4, 3, 2, 2, 1)
# Signatures with big RSA keys are slow (RSA-4096 ~250/s): a fixed, small daily count.
RSA_SIGNS_PER_DAY = {"RSA_2048": 2.0, "RSA_3072": 0.6, "RSA_4096": 0.15}


class Clock:
    """The simulated clock handed to ``keyledger.open``: returns ``now``, moved by the demo."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def quantiles(n: int = 4096) -> list[timedelta]:
    """Offsets into a day, spread like HOUR_WEIGHTS (inverse CDF at n points)."""
    total = sum(HOUR_WEIGHTS)
    cum = [0.0]
    for w in HOUR_WEIGHTS:
        cum.append(cum[-1] + w / total)
    out = []
    for m in range(n):
        u = (m + 0.5) / n
        h = min(bisect.bisect_right(cum, u) - 1, 23)
        secs = 3600 * (h + (u - cum[h]) / (HOUR_WEIGHTS[h] / total))
        out.append(timedelta(seconds=round(secs, 3)))
    return out


class Stream:
    """One kind of call one principal makes on one key; ``rate`` calls per weekday.

    ``sim`` runs it: a ``workers.Traffic`` (its ``ledger`` and ``keep``). The seeding process's
    streams (``TrafficModel.streams``) only describe the calls and are never run.
    """

    __slots__ = ("sim", "k", "op", "who", "led", "rate", "ctxs", "i", "fixed", "run", "sid")

    def __init__(self, sim: Any, k: DemoKey, op: str, who: str, rate: float,
                 fixed: bool = False, sid: int = 0) -> None:
        self.sim, self.k, self.op, self.who, self.rate, self.fixed = sim, k, op, who, rate, fixed
        self.sid = sid
        self.led: KeyLedger | None = None
        tenants = ("acme", "globex", "initech", "umbrella")
        self.ctxs = [{"app": who, "tenant": t} for t in tenants[: 1 + len(k.name) % 4]]
        self.i = 0
        self.run: Callable[[], None] = getattr(self, f"_{op}")

    def _ledger(self) -> KeyLedger:
        if self.led is None:
            self.led = self.sim.ledger(self.who)
        return self.led

    def spec(self) -> tuple:
        return (self.sid, self.k.name, self.op, self.who, self.rate, self.fixed)

    def _encrypt(self) -> None:
        k = self.k
        if not k.protect_ok or (k.cap and k.count >= k.cap):
            return
        self.i += 1
        ctx = self.ctxs[self.i % len(self.ctxs)]
        blob = (self.led or self._ledger()).encrypt(k.name, b"demo record %08d" % self.i,
                                                     context=ctx)
        k.count += 1
        self.sim.keep(k, blob, ctx, self.who)

    def _decrypt(self) -> None:
        k = self.k
        if k.process_ok and k.pool:
            self.i += 1
            blob, ctx, _, _ = k.pool[self.i % len(k.pool)]
            (self.led or self._ledger()).decrypt(blob, context=ctx)

    def _data_key(self) -> None:
        k = self.k
        if k.protect_ok:
            self.i += 1
            ctx = self.ctxs[self.i % len(self.ctxs)]
            dk = (self.led or self._ledger()).generate_data_key(k.name, context=ctx)
            self.sim.keep(k, dk.wrapped, ctx, self.who)

    def _mac(self) -> None:
        k = self.k
        if k.protect_ok:
            self.i += 1
            k.tag = (self.led or self._ledger()).mac(k.name, b"event %d" % (self.i % 7))
            k.tag_msg = b"event %d" % (self.i % 7)

    def _verify_mac(self) -> None:
        k = self.k
        if k.process_ok and k.tag:
            (self.led or self._ledger()).verify_mac(k.name, k.tag_msg, k.tag)

    def _sign(self) -> None:
        k = self.k
        if k.protect_ok:
            self.i += 1
            k.sig_msg = b"artifact %d" % (self.i % 5)
            k.sig = (self.led or self._ledger()).sign(k.name, k.sig_msg)

    def _verify(self) -> None:
        k = self.k
        if k.process_ok and k.sig:
            (self.led or self._ledger()).verify(k.name, k.sig_msg, k.sig)


# What the main process changes on a key (sent to its worker before each batch of calls) and
# what the worker's calls change (sent back after it).
MAIN_FIELDS = ("state", "version", "min_dec", "cap", "limit", "count")
WORKER_FIELDS = ("pool", "pool_i", "count", "tag", "tag_msg", "sig", "sig_msg")


class TrafficModel:
    """Each key's streams of calls and their rates, scaled so the whole history adds up to
    about ``OPS_PER_KEY_DAY`` calls per key and day; each key goes to a worker of ``pool``."""

    def __init__(self, plan: Plan, rng: random.Random, day0: datetime, days: int,
                 pool: WorkerPool) -> None:
        self.plan, self.rng, self.day0, self.days, self.pool = plan, rng, day0, days, pool
        self.streams: list[Stream] = []
        self.scale = 0.0

    def stream_rate(self, k: DemoKey) -> float:
        return self.scale * k.weight

    def add_streams(self, k: DemoKey) -> None:
        rate = self.stream_rate(k)
        mix = {"encrypt": (("encrypt", 0.45), ("decrypt", 0.5), ("data_key", 0.05)),
               "wrap": (("data_key", 0.6), ("decrypt", 0.4)),
               "mac": (("mac", 0.6), ("verify_mac", 0.4)),
               "sign": (("sign", 0.3), ("verify", 0.7))}[k.purpose]
        if k.role == "usage-limited":
            mix = (("encrypt", 0.45), ("decrypt", 0.55))
        streams: list[Stream] = []
        for op, share in mix:
            if op == "sign" and k.spec in RSA_SIGNS_PER_DAY:
                streams.append(Stream(self, k, op, k.users[0], RSA_SIGNS_PER_DAY[k.spec], True,
                                       len(self.streams) + len(streams)))
                continue
            users = k.users if op in ("decrypt", "verify", "verify_mac") else k.users[:1]
            weights = [0.8] + [0.2 / (len(users) - 1)] * (len(users) - 1) if len(users) > 1 \
                else [1.0]
            streams += [Stream(self, k, op, who, rate * share * w, False,
                                len(self.streams) + len(streams) + i)
                        for i, (who, w) in enumerate(zip(users, weights, strict=True))]
        self.streams += streams
        self.pool.assign(k, rate, streams)

    def day_factor(self, d: int) -> float:
        weekday = (self.day0 + timedelta(days=d)).weekday()
        return WEEKDAY_FACTOR[weekday] * (0.75 + 0.5 * d / self.days)

    def calibrate(self) -> None:
        """Choose ``scale`` so the traffic adds up to about OPS_PER_KEY_DAY per key and day."""
        factors = [self.day_factor(d) for d in range(self.days + 1)]
        suffix = list(itertools.accumulate(reversed(factors)))[::-1] + [0.0]
        target = OPS_PER_KEY_DAY * len(self.plan.keys) * self.days
        weight_days = sum(k.weight * suffix[k.created_day + 1] for k in self.plan.keys
                          if k.role not in ("stale", "pre-activation"))
        self.scale = target / max(weight_days, 1e-9)

    def day_ops(self, d: int) -> list[Stream]:
        rng, factor = self.rng, self.day_factor(d)
        ops: list[Stream] = []
        u = self.plan.usage_limited
        for s in self.streams:
            if s.k.created_day >= d:
                continue
            if not s.k.process_ok:
                continue
            mean = s.rate * (factor if not s.fixed else factor / WEEKDAY_FACTOR[0])
            n = int(mean * (0.75 + 0.5 * rng.random()) + rng.random())
            if s.k is u and s.op == "encrypt" and d >= self.days - 6:
                # arrive at ~93 % of the usage limit by the last day, never at it
                u.cap = int(u.limit * 0.95)
                left = self.days - d
                n = max(0, math.ceil((0.93 * u.limit - u.count) / left)) if left else n
            if n:
                ops += [s] * n
        rng.shuffle(ops)
        return ops
