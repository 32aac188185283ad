"""A living demo estate: ~150 keys, 8 teams and 18 months of history, seeded through the public API.

    from keyledger.demo_fleet import seed_demo
    result = seed_demo("demo-home")        # ~1 M audit records; `keyledger demo` on the CLI
    print(result)                          # keys by state, records, findings, who to log in as

Nothing is written to the store directly: every key, grant, rotation, compromise, deletion,
approval, backup and the daily traffic of the services is a call to ``keyledger.open(home,
principal=..., clock=sim)``, made at a simulated time (``sim`` is a clock this module moves
forward). The history ends at the real current time, so a dashboard opened right after seeding
shows activity in the last 24 hours.

What the estate contains (see docs/demo.md): keys of every spec across eight teams with owners
and ``team=``/``env=``/``data=`` tags; rotation by ``run_due`` (a weekly job, by period and by
usage limit) and by hand (early rotations); a few keys whose rotation was neglected (overdue at
the end); a key near its usage limit; a key compromised, replaced and re-encrypted, and one
compromised a few days ago and not replaced yet; keys destroyed (one with dual control), pending
deletion, suspended and waiting in pre-activation; a destroy request with one approval of two;
an admin who is also a user of one key; a stale key; a backup and a restore test; weekly
compliance evaluations; denied calls and failed decrypts.

Deterministic: the same ``seed``, ``keys``, ``months`` and ``end`` give the same key names,
specs, states and counts (``end`` defaults to now; the weekly rhythm follows the calendar).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from .errors import (
    AccessDenied,
    ConfigError,
    InvalidCiphertext,
    InvalidInput,
    KeyLedgerError,
)
from .model import SPECS
from .service import KeyLedger
from .service import open as open_ledger

DEMO_FILE = "demo.json"
DEMO_PASSPHRASE = "keyledger-demo-backups"  # demo only: printed in docs/demo.md
MIN_KEYS, MAX_KEYS = 20, 2000
MIN_MONTHS, MAX_MONTHS = 2, 60
DAYS_PER_MONTH = 30.44
# Usage calls per key per simulated day on average at the default size (150 keys, 18 months):
# about 1 M audited calls in all.
OPS_PER_KEY_DAY = 12.6
# run_due evaluates compliance every 4th Monday (weekly at the end and in short histories)
COMPLIANCE_EVERY_WEEKS = 4
USAGE_LIMIT_DAYS = 14  # the near-limit key's usage limit: about this many days of encryptions

SECURITY_LEAD, PLATFORM_ADMIN, AUDITOR = "security-lead", "ops-omar", "audit-anna"
DEVELOPERS = ("dev-sam", "dev-lee")


@dataclass(frozen=True)
class Team:
    name: str
    short: str
    admin: str
    services: tuple[str, ...]
    data: str | None  # pci / pii / phi: what the team's encryption keys protect


TEAMS = (
    Team("payments", "pay", "paula-payments", ("svc-payments", "svc-checkout"), "pci"),
    Team("identity", "idp", "ivan-identity", ("svc-auth", "svc-sso"), "pii"),
    Team("health", "health", "hana-health", ("svc-ehr", "svc-claims"), "phi"),
    Team("data-platform", "data", "dana-data", ("svc-etl", "svc-lake"), "pii"),
    Team("mobile", "mobile", "milo-mobile", ("svc-mobile-api",), None),
    Team("platform", "platform", "pete-platform", ("svc-gateway", "svc-secrets"), None),
    Team("analytics", "analytics", "ada-analytics", ("svc-reports",), None),
    Team("release-eng", "release", "rex-release", ("svc-ci",), None),
)

# Share of the fleet per spec (every spec at least once; AES_256 takes the rest).
# RSA keys are few: generating one takes 0.2 s (2048) to 1-3 s (4096) in SoftHSM2.
SPEC_SHARE = {"AES_256": 0.42, "AES_128": 0.08, "HMAC_SHA256": 0.16, "EC_P256": 0.14,
              "EC_P384": 0.05, "ED25519": 0.08, "RSA_2048": 0.04, "RSA_3072": 0.013,
              "RSA_4096": 0.006}
TEAM_NOUNS = {  # what each team encrypts
    "payments": ("card-vault", "pan-store", "settlement", "tokens", "refunds", "payouts"),
    "identity": ("sessions", "profiles", "mfa-seeds", "recovery-codes", "consents"),
    "health": ("ehr-records", "claims", "lab-results", "imaging", "prescriptions"),
    "data-platform": ("lake-tde", "exports", "warehouse", "etl-staging", "pii-fields"),
    "mobile": ("push-tokens", "offline-cache", "messages", "device-keys"),
    "platform": ("secrets", "db-tde", "backups", "queue", "logs", "config"),
    "analytics": ("reports", "exports", "cohort-cache", "dashboards"),
    "release-eng": ("artifacts", "build-cache", "signing-secrets"),
}
NOUNS = {
    "wrap": ("kek", "dek-wrap", "key-wrap", "master-kek"),
    "mac": ("webhook-hmac", "api-hmac", "cookie-hmac", "idempotency-hmac", "link-hmac",
            "event-hmac"),
    "sign": ("jwt-signing", "receipt-signing", "doc-signing", "token-signing", "sbom-signing",
             "ca-intermediate", "code-signing", "release-signing", "oidc-signing",
             "attestation"),
}
# Traffic per key relative to a symmetric key: signatures and their checks cost 2-25 times an
# AES-GCM call in SoftHSM2 (EC P-384 ~1 ms a signature), so signing keys see less traffic.
SPEC_TRAFFIC = {"EC_P256": 0.2, "ED25519": 0.04, "EC_P384": 0.015, "RSA_2048": 0.08,
                "RSA_3072": 0.05, "RSA_4096": 0.03}
# Weekday traffic, UTC hour profile (business hours busiest).
WEEKDAY_FACTOR = (1.0, 1.05, 1.0, 0.95, 0.9, 0.4, 0.3)
HOUR_WEIGHTS = (1, 1, 1, 1, 1, 2, 4, 7, 9, 10, 10, 9, 8, 9, 10, 10, 9, 7, 5, 4, 3, 2, 2, 1)
# Signatures with big RSA keys are slow (RSA-4096 ~250/s): a fixed, small daily count.
RSA_SIGNS_PER_DAY = {"RSA_2048": 2.0, "RSA_3072": 0.6, "RSA_4096": 0.15}
EXPECTED = ("decrypts", "key destroyed", "key pending deletion", "key suspended",
            "below min_decryption_version", "tampered")


class Sample(NamedTuple):
    """A ciphertext made during seeding and what decrypting it now must do.

    ``expected`` is ``"decrypts"`` or why it is refused by design: ``key destroyed``, ``key
    pending deletion``, ``key suspended`` or ``below min_decryption_version`` (all
    ``KeyStateError``) or ``tampered`` (``InvalidCiphertext``). ``principal`` may decrypt it.
    """

    ciphertext: bytes
    context: dict[str, str]
    expected: str
    principal: str
    key: str
    version: int


@dataclass
class DemoResult:
    """What ``seed_demo`` built (or found, when the home was already seeded)."""

    home: Path
    keys: int
    records: int
    seconds: float
    principals: dict[str, str]  # name -> roles, as in demo.json
    sample: list[Sample] = field(default_factory=list)
    seed: int = 7
    months: int = 18
    start: datetime | None = None
    generated_at: datetime | None = None  # simulated end of the history
    states: dict[str, int] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)  # open findings by severity
    overdue: list[str] = field(default_factory=list)
    highlights: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds by kind of work
    unexpected: list[str] = field(default_factory=list)  # usage calls that failed (should be none)
    already_seeded: bool = False

    def __str__(self) -> str:
        return "\n".join(summary_lines(self))


def summary_lines(r: DemoResult) -> list[str]:
    span = (f"{r.start:%Y-%m-%d} -> {r.generated_at:%Y-%m-%d %H:%M} UTC"
            if r.start and r.generated_at else "-")
    head = ("demo home already seeded" if r.already_seeded else "seeded the demo estate")
    lines = [f"{head}: {r.home}",
             f"  {r.keys} keys, {r.months} months ({span}), seed {r.seed}"]
    if r.states:
        lines.append("  keys by state: " + ", ".join(f"{s} {n}" for s, n in
                                                       sorted(r.states.items(),
                                                              key=lambda x: -x[1])))
    lines.append(f"  audit records: {r.records:,}")
    if r.overdue:
        lines.append(f"  overdue for rotation: {len(r.overdue)} ({', '.join(r.overdue)})")
    if r.findings:
        order = ("critical", "high", "medium", "low", "info")
        lines.append("  open findings: " + ", ".join(f"{s} {r.findings[s]}" for s in order
                                                     if r.findings.get(s)))
    if r.unexpected:
        lines.append(f"  WARNING: {len(r.unexpected)} usage calls failed unexpectedly, e.g. "
                     f"{r.unexpected[0]}")
    lines.append("  log in as (principal):")
    width = max((len(p) for p in r.principals), default=0)
    lines += [f"    {name:<{width}}  {roles}" for name, roles in r.principals.items()]
    if not r.already_seeded:
        parts = sorted(r.timings.items(), key=lambda kv: -kv[1])
        lines.append(f"  seeded in {r.seconds:.1f} s" + (": " if parts else "") +
                     ", ".join(f"{what} {secs:.1f} s" for what, secs in parts if secs >= 0.05))
    return lines


# -- the plan (pure: a function of seed, keys, months) ---------------------------------------------
class _Key:
    """The demo's own model of one key: what it is, its role in the story, its live state."""

    def __init__(self, name: str, spec: str, purpose: str, team: Team, env: str) -> None:
        self.name, self.spec, self.purpose, self.team, self.env = name, spec, purpose, team, env
        self.role: str | None = None
        self.created_day = 0
        self.owner: str | None = team.name
        self.tags: dict[str, str] = {}
        self.users: list[str] = []
        self.weight = 1.0
        self.rotation_period: str | None = None
        # live state
        self.state = "new"
        self.version = 1
        self.min_dec = 1
        self.pool: list[tuple[bytes, dict[str, str], int, str]] = []
        self.pool_i = 0
        self.pool_rev = 0  # bumped when the main process changes the pool (rewrap, min version)
        self.worker = 0  # which traffic worker runs this key's usage calls
        self.sampled: set[int] = set()
        self.tag = self.tag_msg = b""
        self.sig = self.sig_msg = b""
        self.count = 0  # encryptions on the current version (the usage-limited key)
        self.limit = 0
        self.cap = 0

    @property
    def protect_ok(self) -> bool:
        return self.state == "active"

    @property
    def process_ok(self) -> bool:
        return self.state in ("active", "compromised", "deactivated")


def _spec_counts(n: int) -> dict[str, int]:
    counts = {s: max(1, int(share * n)) for s, share in SPEC_SHARE.items()}
    counts["AES_256"] += n - sum(counts.values())
    return counts


class _Plan:
    def __init__(self, n_keys: int, days: int, rng: random.Random) -> None:
        self.rng, self.days = rng, days
        specs = [s for s, c in _spec_counts(n_keys).items() for _ in range(c)]
        rng.shuffle(specs)
        n_wrap = sum(s == "AES_256" for s in specs) // 7 if n_keys >= 40 else 0
        used: set[str] = set()
        self.keys: list[_Key] = []
        wraps = 0
        for i, spec in enumerate(specs):
            team = TEAMS[i % len(TEAMS)] if i < len(TEAMS) else rng.choice(TEAMS)
            family = SPECS[spec].family.value
            if family == "aes":
                purpose = "wrap" if spec == "AES_256" and wraps < n_wrap and rng.random() < 0.3 \
                    else "encrypt"
                wraps += purpose == "wrap"
            else:
                purpose = "mac" if family == "hmac" else "sign"
            env = rng.choices(("prod", "staging", "dev"), (0.65, 0.2, 0.15))[0]
            if spec.startswith("RSA") and env == "dev":
                env = "prod"
            noun = rng.choice(TEAM_NOUNS[team.name] if purpose == "encrypt" else NOUNS[purpose])
            name = f"{team.short}-{noun}"
            if env != "prod":
                name += f"-{env}"
            for n in itertools.count(2):
                if name not in used:
                    break
                name = f"{team.short}-{noun}" + (f"-{env}" if env != "prod" else "") + f"-{n}"
            used.add(name)
            self.keys.append(_Key(name, spec, purpose, team, env))
        self._assign_roles()
        self._fill_in()

    # roles: each key plays at most one part of the story
    def _pick(self, role: str, *preds: Callable[[_Key], bool]) -> _Key:
        for pred in (*preds, lambda k: True):
            cands = [k for k in self.keys if k.role is None and pred(k)]
            if cands:
                key = self.rng.choice(cands)
                key.role = role
                return key
        raise InvalidInput(f"too few keys for the demo story (no key left for {role!r})")

    def _assign_roles(self) -> None:
        aes = lambda k: k.purpose == "encrypt"  # noqa: E731
        prod_aes = lambda k: aes(k) and k.env == "prod"  # noqa: E731
        self.usage_limited = self._pick("usage-limited", lambda k: prod_aes(k) and
                                        k.team.name == "payments", prod_aes, aes)
        self.compromised_rotated = self._pick("compromised-rotated", lambda k: prod_aes(k) and
                                              k.team.name in ("payments", "identity"), aes)
        self.compromised_open = self._pick(
            "compromised-open", lambda k: k.spec in ("EC_P256", "ED25519", "EC_P384"),
            lambda k: k.purpose == "sign" and k.spec != "RSA_4096")
        self.neglected = [self._pick("neglected", aes) for _ in range(max(1, len(self.keys) // 50))]
        self.neglected += [self._pick("neglected", lambda k: k.purpose == "mac")
                           for _ in range(len(self.keys) // 100)]
        self.stale = self._pick("stale", lambda k: k.purpose == "mac" and
                                k.team.name == "analytics", lambda k: k.purpose == "mac")
        self.destroyed_due = self._pick("destroyed", aes)
        self.destroyed_dual = self._pick("destroyed-dual-control", lambda k: k.purpose == "mac",
                                         aes)
        self.pending = [self._pick("pending-deletion", aes) for _ in range(max(1, len(self.keys) // 60))]
        self.pending_request = self._pick("pending-destroy-request", aes)
        self.disabled = self._pick("suspended", lambda k: aes(k) and k.team.name == "health", aes)
        self.exportable = self._pick("exportable", lambda k: aes(k) and k.team.name == "platform",
                                     lambda k: k.purpose == "mac", aes)
        self.preactivation = self._pick("pre-activation", lambda k: k.spec == "EC_P256",
                                        lambda k: k.purpose == "sign" and
                                        not k.spec.startswith("RSA"))
        # not exclusive: an ordinary key (payments if possible) whose team admin is made a user
        sod = [k for k in self.keys if k.role is None and k.spec != "RSA_4096"]
        self.sod = self.rng.choice([k for k in sod if aes(k) and k.team.name == "payments"] or
                                   [k for k in sod if aes(k)] or sod)

    def _fill_in(self) -> None:
        rng, days = self.rng, self.days
        late_end = max(8, days - 10)
        for k in self.keys:
            t = k.team
            if k.role is None:
                k.created_day = rng.randint(0, 6) if rng.random() < 0.35 else \
                    rng.randint(7, late_end)
            elif k.role == "pre-activation":
                k.created_day = days - 40
            elif k.role in ("stale", "usage-limited"):
                k.created_day = 0
            else:
                k.created_day = rng.randint(0, 4)
            if t.data and k.purpose in ("encrypt", "wrap"):
                k.tags["data"] = t.data
                if t.data in ("pii", "phi"):
                    k.tags["personal-data"] = "yes"
            if k.role == "suspended":
                k.tags.update({"data": "phi", "personal-data": "yes", "asset": "fax-gateway"})
            if t.name == "health" and k.purpose == "encrypt" and "asset" not in k.tags:
                k.tags["asset"] = "ehr"
            k.tags.update({"team": t.name, "env": k.env})
            if k.role == "stale":
                k.owner = None
                k.tags.pop("team")
            if k.role == "neglected":  # explicit, so the overdue date does not depend on tags
                k.rotation_period = "30d" if days < 180 else "90d"
            # who uses it
            users = [rng.choice(t.services)]
            if rng.random() < 0.35:
                others = [s for tm in TEAMS for s in tm.services if s != users[0]]
                users.append(rng.choice([s for s in t.services if s != users[0]] or others)
                             if rng.random() < 0.6 else rng.choice(others))
            k.users = users
            k.weight = rng.lognormvariate(0, 0.9) * SPEC_TRAFFIC.get(k.spec, 1.0)
        for dev in DEVELOPERS:
            for k in rng.sample([k for k in self.keys if k.role is None], 3):
                if dev not in k.users:
                    k.users.append(dev)
        self.usage_limited.weight = 3.0


# -- the simulation ----------------------------------------------------------------------------------
class _Clock:
    """The simulated clock handed to ``keyledger.open``: returns ``now``, moved by the demo."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _quantiles(n: int = 4096) -> list[timedelta]:
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


class _Stream:
    """One kind of call one principal makes on one key; ``rate`` calls per weekday."""

    __slots__ = ("sim", "k", "op", "who", "led", "rate", "ctxs", "i", "fixed", "run", "sid")

    def __init__(self, sim: _Traffic | _Sim, k: _Key, op: str, who: str, rate: float,
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
# What a call costs relative to an AES-GCM call (to balance the workers).
SPEC_COST = {"EC_P256": 2.0, "ED25519": 6.0, "EC_P384": 10.0, "RSA_2048": 3.0, "RSA_3072": 8.0,
             "RSA_4096": 20.0}


class _Traffic:
    """Runs the usage calls on the keys given to it, with its own ledgers and simulated clock.

    One per worker process (``_traffic_worker``), or in the seeding process (``workers=0``).
    Lifecycle events never run here: between two batches of calls the main process does them,
    and sends the keys' new states with the next batch.
    """

    def __init__(self, home: Path, worker: bool) -> None:
        self.home = home
        self.worker = worker  # a process of its own (else the seeding process, workers=0)
        self.clock = _Clock(datetime.now(UTC))
        self.leds: dict[str, KeyLedger] = {}
        self.keys: dict[str, _Key] = {}
        self.streams: dict[int, _Stream] = {}
        self.samples: list[Sample] = []
        self.unexpected: list[str] = []
        self.unexpected_count = 0
        self._quant = _quantiles()

    def ledger(self, who: str) -> KeyLedger:
        led = self.leds.get(who)
        if led is None:
            led = self.leds[who] = open_ledger(self.home, principal=who, clock=self.clock)
            if self.worker:  # the seeding process, which holds the store, ingests our journal
                led._rt.stop_background_ingest()  # its rounds would only find the store held
        return led

    def keep(self, k: _Key, blob: bytes, ctx: dict[str, str], who: str) -> None:
        version = int.from_bytes(blob[20:24], "big")
        if len(k.pool) < 6:
            k.pool.append((blob, ctx, version, who))
        else:
            k.pool_i = (k.pool_i + 1) % 6
            k.pool[k.pool_i] = (blob, ctx, version, who)
        if version not in k.sampled:  # the first ciphertext of every version is sampled
            k.sampled.add(version)
            self.samples.append(Sample(blob, ctx, "", who, k.name, version))

    def batch(self, new_keys: list[_Key], new_streams: list[tuple], updates: list[tuple],
              day_start: datetime, floor: datetime, ops: list[tuple[int, int]]) -> tuple:
        if self.leds:
            # what the main process changed in the catalog since the last batch counts now, not
            # up to catalog_refresh_ms later (these calls come after it in simulated time)
            next(iter(self.leds.values()))._rt.catalog.refresh(force=True)
        for k in new_keys:
            self.keys[k.name] = k
        self.clock.now = floor
        for sid, name, op, who, rate, fixed in new_streams:
            self.streams[sid] = _Stream(self, self.keys[name], op, who, rate, fixed, sid)
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
        traffic = _Traffic(Path(home), worker=True)
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


def _traffic_main(fd: int, home: str) -> None:
    """Entry point of a worker process (``python -c``; see ``_Remote``)."""
    from multiprocessing.connection import Connection

    _traffic_worker(Connection(fd), home)


class _Remote:
    """A worker process for usage calls: a fresh interpreter (its own HSM login), started with
    ``python -c`` rather than multiprocessing's spawn, so the caller's main module is never
    imported again there (a script calling seed_demo needs no ``__main__`` guard)."""

    def __init__(self, home: Path) -> None:
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        with theirs:
            code = ("import sys; from keyledger.demo_fleet import _traffic_main; "
                    "_traffic_main(int(sys.argv[1]), sys.argv[2])")
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


class _Local:
    """Usage calls in the seeding process itself (``workers=0``)."""

    def __init__(self, home: Path) -> None:
        self.traffic = _Traffic(home, worker=False)
        self._out: Any = None

    def send(self, msg: tuple) -> None:
        self._out = self.traffic.batch(*msg)

    def recv(self) -> Any:
        return self._out

    def close(self) -> None:
        self.traffic.close()


class _Sim:
    def __init__(self, home: Path, n_keys: int, months: int, seed: int, end: datetime,
                 progress: bool, workers: int = 2) -> None:
        self.home, self.n_keys, self.months, self.seed = home, n_keys, months, seed
        self.rng = random.Random(seed)
        self.days = max(1, round(months * DAYS_PER_MONTH))
        self.end = end
        self.day0 = datetime(end.year, end.month, end.day, tzinfo=UTC) - timedelta(days=self.days)
        self.start = self.day0 + timedelta(hours=8)
        self.clock = _Clock(self.start)
        self.progress = progress
        self.plan = _Plan(n_keys, self.days, self.rng)
        self.by_name = {k.name: k for k in self.plan.keys}
        self.leds: dict[str, KeyLedger] = {}
        self.samples: list[Sample] = []
        self.grants: dict[str, list[str]] = {}
        self.unexpected: list[str] = []
        self.unexpected_count = 0
        self.events: list[tuple[datetime, int, Callable[[], None]]] = []
        self.highlights: dict[str, Any] = {}
        self.backups_dir = home.parent / f"{home.name}-backups"
        self.calls = 0
        self.timings: Counter[str] = Counter()
        self._seq = itertools.count()
        self._quant = _quantiles()
        # usage calls run in worker processes (0: in this process), each on its own keys
        self.workers = workers
        self.runners: list[_Remote | _Local] = []
        n = max(1, workers)
        self._loads = [0.0] * n
        self._new_keys: list[list[_Key]] = [[] for _ in range(n)]
        self._new_streams: list[list[tuple]] = [[] for _ in range(n)]
        self._worker_keys: list[list[_Key]] = [[] for _ in range(n)]
        self._sent: dict[str, tuple] = {}
        self._opened: list[set[str]] = [set() for _ in range(n)]  # principals each worker opened
        self._hold: contextlib.ExitStack | None = None  # keep_store_open(), while it lasts

    # -- plumbing ----------------------------------------------------------------------------
    def ledger(self, who: str) -> KeyLedger:
        led = self.leds.get(who)
        if led is None:
            first = not self.leds
            led = self.leds[who] = open_ledger(self.home, principal=who, clock=self.clock)
            if first:  # the home exists now: mark it as a demo being seeded
                _write_demo_file(self.home, {"status": "seeding", "seed": self.seed,
                                             "keys": self.n_keys, "months": self.months})
        return led

    def at(self, when: datetime, fn: Callable[[], None], what: str | None = None) -> None:
        """Run ``fn`` at simulated time ``when``; its wall time is counted under ``what``."""
        name = getattr(fn, "__name__", "<lambda>")
        what = what or ("other lifecycle events" if name == "<lambda>" else name.replace("_", " "))
        self.events.append((when, next(self._seq), fn, what))

    def day_at(self, day: int, hour: float) -> datetime:
        return self.day0 + timedelta(days=day, hours=hour)

    def grant(self, name: str, who: str, role: str, by: str = SECURITY_LEAD) -> None:
        self.ledger(by).grant(name, who, role)
        self.grants.setdefault(who, []).append(f"{role} on {name}")

    # -- building the story ------------------------------------------------------------------
    def schedule(self) -> None:
        p, rng, days = self.plan, self.rng, self.days
        self.at(self.start, self.setup_home)
        for i, k in enumerate(p.keys):
            when = (self.day_at(k.created_day, 9 + rng.random() * 6) if k.created_day
                    else self.start + timedelta(minutes=5 + 2 * i))
            self.at(when, lambda k=k: self.create(k), "create keys, grants, policies")
        # weekly due work (Monday 02:00), audit verification, backups
        # (quarterly at first, weekly in the last weeks: the SOC 2 finding gets resolved)
        # run_due evaluates compliance every fourth week and every week of the last four (a
        # trend point each time; an evaluation costs ~0.4 s, the rotations alone much less)
        verify_weekly_from, last_verify = days - min(28, days // 3), 0
        mondays, every = 0, max(1, min(COMPLIANCE_EVERY_WEEKS, days // 7 // 12))
        for d in range(1, days + 1):
            if (self.day0 + timedelta(days=d)).weekday() == 0:
                if d >= verify_weekly_from or d - last_verify >= 91:
                    self.at(self.day_at(d, 1.5), self.verify)
                    last_verify = d
                evaluate = mondays % every == 0 or d >= days - 28
                self.at(self.day_at(d, 2), lambda c=evaluate: self.run_due(compliance=c),
                        "run due")
                mondays += 1
        self.at(self.day_at(days - 14, 3), self.backup)
        self.at(self.day_at(days - 13, 4), self.restore_test)
        # custodian acknowledgements (three team admins never give theirs: a PCI finding)
        # (renewed yearly, as PCI DSS 3.7.8 asks)
        firsts = [(SECURITY_LEAD, 1), (PLATFORM_ADMIN, 2)] + [
            (t.admin, 3 + i + min(k.created_day for k in p.keys if k.team is t and k.owner))
            for i, t in enumerate(TEAMS[:5])]
        for admin, first in firsts:
            for d in range(first, days, 360):
                self.at(self.day_at(d, 9.5), lambda a=admin: self.ledger(a).acknowledge_custody(),
                        "other lifecycle events")
        self._schedule_rotations()
        self._schedule_incidents()
        self._schedule_noise()

    def _schedule_rotations(self) -> None:
        p, rng, days = self.plan, self.rng, self.days
        ordinary = [k for k in p.keys if k.role is None and not k.spec.startswith("RSA")]
        for _ in range(max(2, len(p.keys) * days // 3300)):
            k = rng.choice(ordinary)
            d = rng.randint(k.created_day + 3, max(k.created_day + 3, days - 2))
            if d < days:
                reason = rng.choice(("rotated early: engineer left the team",
                                     "rotated early: key id seen in a support ticket",
                                     "rotated early: service migration",
                                     "rotated early: quarterly hygiene"))
                self.at(self.day_at(d, 10 + rng.random() * 7),
                        lambda k=k, r=reason: self.rotate(k, k.team.admin, r), "manual rotations")
        for i, k in enumerate(p.neglected):  # rotated by hand a few times, then forgotten
            period = 30 if days < 180 else 90
            overdue = 12 + 25 * i
            d = period - 5
            while d + period < days - overdue:
                self.at(self.day_at(d, 11), lambda k=k: self.rotate(k, k.team.admin,
                                                                     "manual rotation"),
                        "manual rotations")
                d += period - 5

    def _schedule_incidents(self) -> None:
        p, days = self.plan, self.days
        # a key compromised, replaced, its data re-encrypted and the old version retired
        c = p.compromised_rotated
        d = max(c.created_day + 8, round(days * 0.55))
        self.at(self.day_at(d, 14.5), lambda: self.compromise(c, "API token and key id leaked "
                                                                 "in a public CI log"))
        self.at(self.day_at(d + 1, 9.5), lambda: self.rotate(c, c.team.admin,
                                                             "replace the compromised version"))
        self.at(self.day_at(d + 2, 10), lambda: self.rewrap(c))
        self.at(self.day_at(d + 7, 10), lambda: self.raise_min_decryption(c))
        # compromised a few days ago, not replaced yet (a compliance finding)
        o = p.compromised_open
        self.at(self.day_at(days - 4, 16), lambda: self.compromise(
            o, "signing key found on a decommissioned build agent"))
        # destroyed by run_due once its waiting period passed (no dual control: a finding)
        self.at(self.day_at(round(days * 0.4), 11), lambda: self.schedule_deletion(
            p.destroyed_due, 7, "service retired"))
        # destroyed with dual control: quorum 2, a request and a second admin's approval
        q = p.destroyed_dual
        d = round(days * 0.3)
        self.at(self.day_at(d, 11), lambda: self.schedule_deletion(q, 7, "vendor contract ended"))
        self.at(self.day_at(d + 8, 10), lambda: self.request_destroy(q))
        self.at(self.day_at(d + 8, 15), lambda: self.approve_pending(q))
        # pending deletions, and a destroy request with one approval of two
        for i, k in enumerate(p.pending):
            self.at(self.day_at(days - 10 - 5 * i, 11),
                    lambda k=k: self.schedule_deletion(k, 30, "replaced by a new key"))
        r = p.pending_request
        self.at(self.day_at(days - 14, 11), lambda: self.schedule_deletion(
            r, 7, "data migrated to the new store"))
        self.at(self.day_at(days - 1, 15), lambda: self.request_destroy(r))
        # suspended, an unjustified HIPAA exception for it, a KEK exception with a reason
        s = p.disabled
        d = round(days * 0.8)
        self.at(self.day_at(d, 12), lambda: self.disable(s))
        self.at(self.day_at(d + 2, 12), lambda: self.accept(
            "hipaa.phi-without-encryption", s.name, "vendor does it", "180d"))
        kek = next((k for k in p.keys if k.purpose == "wrap" and k.role is None), None)
        if kek is not None:
            self.at(self.day_at(max(kek.created_day + 1, days - 60), 12), lambda: self.accept(
                "cis.symmetric-rotation", kek.name, "KEKs rotate yearly by design; the data "
                "keys they wrap rotate every 90 days (risk review RR-114)", "365d"))
        # an admin who also uses one of the team's keys
        self.at(self.day_at(max(p.sod.created_day + 2, days // 5), 16), lambda: self.grant(
            p.sod.name, p.sod.team.admin, "user"))
        self.highlights["separation_of_duties"] = {"principal": p.sod.team.admin,
                                                   "key": p.sod.name}

    def _schedule_noise(self) -> None:
        """Denied calls (no grant) and failed decrypts (tampered data, wrong context)."""
        rng, days, keys = self.rng, self.days, self.plan.keys
        everyone = [s for t in TEAMS for s in t.services] + list(DEVELOPERS)
        for d in range(1, days):
            for _ in range(rng.choice((0, 0, 1, 1, 2))):
                k = rng.choice(keys)
                who = rng.choice([p for p in everyone if p not in k.users])
                self.at(self.day_at(d, 8 + rng.random() * 10),
                        lambda k=k, w=who: self.denied(k, w), "denied and failed calls")
            if rng.random() < 0.3:
                k = rng.choice(keys)
                self.at(self.day_at(d, 8 + rng.random() * 10),
                        lambda k=k, w=rng.random() < 0.5: self.tampered(k, w),
                        "denied and failed calls")
        # one afternoon a misconfigured deployment hammers a key it has no grant on
        d = round(days * 0.62)
        k = next(k for k in keys if k.purpose == "encrypt" and k.created_day < d and
                 "svc-mobile-api" not in k.users)
        for i in range(30):
            self.at(self.day_at(d, 13 + i / 20), lambda k=k: [
                self.denied(k, "svc-mobile-api", encrypt=True) for _ in range(8)],
                "denied and failed calls")

    # -- lifecycle events --------------------------------------------------------------------------
    def setup_home(self) -> None:
        lead = self.ledger(SECURITY_LEAD)  # the first principal becomes the home's admin
        lead.set_policy("*", creator_is_user=False, rotation_by_tag={"env=dev": "180d"},
                        rotation_by_purpose={"encrypt": "90d", "mac": "90d", "wrap": "365d",
                                             "sign": "365d"})
        self.grants[SECURITY_LEAD] = ["admin on *"]
        self.grant("*", PLATFORM_ADMIN, "admin")
        self.grant("*", AUDITOR, "auditor")

    def create(self, k: _Key) -> None:
        lead = self.ledger(SECURITY_LEAD)
        lead.create_key(k.name, spec=k.spec, purpose=k.purpose, owner=k.owner, tags=k.tags,
                        rotation_period=k.rotation_period, exportable=k.role == "exportable",
                        activate=k.role != "pre-activation")
        k.state = "pre-activation" if k.role == "pre-activation" else "active"
        if k.owner:
            self.grant(k.name, k.team.admin, "admin")
        if k.role in ("pre-activation", "stale"):
            return
        for who in k.users:
            self.grant(k.name, who, "user")
        if k.role == "neglected":
            lead.set_policy(k.name, auto_rotate=False)
        elif k.role in ("destroyed-dual-control", "pending-destroy-request"):
            lead.set_policy(k.name, quorum=2)
        elif k.role == "usage-limited":
            k.limit = int(max(200, round(self.stream_rate(k) * 0.45 * USAGE_LIMIT_DAYS, -2)))
            k.cap = k.limit
            lead.set_policy(k.name, usage_limit=k.limit)
        self.add_streams(k)

    def rotate(self, k: _Key, who: str, reason: str) -> None:
        if k.state not in ("active", "compromised"):
            return
        self.ledger(who).rotate(k.name, reason=reason)
        k.version += 1
        k.state = "active"
        k.count = 0

    def compromise(self, k: _Key, reason: str) -> None:
        self.ledger(SECURITY_LEAD).mark_compromised(k.name, reason)
        k.state = "compromised"

    def rewrap(self, k: _Key) -> None:
        """The service re-encrypts the data it keeps under the current version."""
        for i, (blob, ctx, version, who) in enumerate(list(k.pool)):
            if version < k.version:
                new = self.ledger(who).rewrap(blob, context=ctx)
                k.pool[i] = (new, ctx, k.version, who)
        k.pool_rev += 1

    def raise_min_decryption(self, k: _Key) -> None:
        self.ledger(k.team.admin).set_policy(k.name, min_decryption_version=k.version)
        k.min_dec = k.version
        k.pool = [e for e in k.pool if e[2] >= k.min_dec]
        k.pool_i = 0
        k.pool_rev += 1

    def schedule_deletion(self, k: _Key, days: int, reason: str) -> None:
        if k.state in ("active", "suspended", "compromised", "deactivated"):
            self.ledger(k.team.admin).schedule_deletion(k.name, days, reason=reason)
            k.state = "pending-deletion"

    def request_destroy(self, k: _Key) -> None:
        rid = self.ledger(k.team.admin).request("destroy", k.name, "waiting period over; "
                                                "nothing decrypts with it any more")
        self.highlights.setdefault("requests", {})[k.name] = rid

    def approve_pending(self, k: _Key) -> None:
        rid = self.highlights["requests"][k.name]
        if self.ledger(SECURITY_LEAD).approve(rid)["executed"]:
            k.state = "destroyed"

    def disable(self, k: _Key) -> None:
        if k.state == "active":
            self.ledger(k.team.admin).disable(k.name, reason="fax gateway integration paused")
            k.state = "suspended"

    def accept(self, rule: str, name: str, reason: str, until: str) -> None:
        self.ledger(SECURITY_LEAD).accept_finding(rule, name, reason, until)

    def run_due(self, compliance: bool = True) -> None:
        report = self.ledger(PLATFORM_ADMIN).run_due(compliance=compliance)
        for item in report.done:
            k = self.by_name.get(item["key"])
            if k is None:
                continue
            if item["action"] == "rotate":
                k.version += 1
                k.count = 0
            elif item["action"] == "destroy":
                k.state = "destroyed"
            elif item["action"] == "deactivate":
                k.state = "deactivated"

    def verify(self) -> None:
        report = self.ledger(AUDITOR).verify_audit()
        if not report.ok:
            raise KeyLedgerError(f"the demo's audit ledger does not verify: {report}")

    def backup(self) -> None:
        self.backups_dir.mkdir(parents=True, exist_ok=True)
        path = self.backups_dir / f"keyledger-{self.clock.now:%Y%m%d-%H%M}.klbk"
        info = self.ledger(SECURITY_LEAD).backup(path, passphrase=DEMO_PASSPHRASE)
        self.highlights.setdefault("backups", []).append(str(info.path))

    def restore_test(self) -> None:
        path = self.highlights["backups"][-1]
        report = self.ledger(SECURITY_LEAD).restore_test(path, passphrase=DEMO_PASSPHRASE)
        self.highlights["restore_test_ok"] = report.ok

    def denied(self, k: _Key, who: str, encrypt: bool = False) -> None:
        if k.state == "new":  # not created yet
            return
        led = self.ledger(who)
        try:
            if k.pool and not encrypt:
                blob, ctx, _, _ = k.pool[0]
                led.decrypt(blob, context=ctx)
            elif k.purpose in ("encrypt", "wrap"):
                led.encrypt(k.name, b"not allowed", context={"app": who})
            elif k.purpose == "mac":
                led.mac(k.name, b"not allowed")
            else:
                led.sign(k.name, b"not allowed")
        except AccessDenied:
            return
        self.unexpected.append(f"{who} was not denied on {k.name}")

    def tampered(self, k: _Key, wrong_context: bool) -> None:
        if not k.pool or not k.process_ok:
            return
        blob, ctx, _, who = k.pool[-1]
        try:
            if wrong_context:
                self.ledger(who).decrypt(blob, context={**ctx, "tenant": "someone-else"})
            else:
                self.ledger(who).decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), context=ctx)
        except InvalidCiphertext:
            return
        self.unexpected.append(f"a tampered ciphertext of {k.name} decrypted")

    # -- traffic -----------------------------------------------------------------------------------
    def stream_rate(self, k: _Key) -> float:
        return self.scale * k.weight

    def add_streams(self, k: _Key) -> None:
        rate = self.stream_rate(k)
        mix = {"encrypt": (("encrypt", 0.45), ("decrypt", 0.5), ("data_key", 0.05)),
               "wrap": (("data_key", 0.6), ("decrypt", 0.4)),
               "mac": (("mac", 0.6), ("verify_mac", 0.4)),
               "sign": (("sign", 0.3), ("verify", 0.7))}[k.purpose]
        if k.role == "usage-limited":
            mix = (("encrypt", 0.45), ("decrypt", 0.55))
        streams = []
        for op, share in mix:
            if op == "sign" and k.spec in RSA_SIGNS_PER_DAY:
                streams.append(_Stream(self, k, op, k.users[0], RSA_SIGNS_PER_DAY[k.spec], True,
                                       len(self.streams) + len(streams)))
                continue
            users = k.users if op in ("decrypt", "verify", "verify_mac") else k.users[:1]
            weights = [0.8] + [0.2 / (len(users) - 1)] * (len(users) - 1) if len(users) > 1 \
                else [1.0]
            streams += [_Stream(self, k, op, who, rate * share * w, False,
                                len(self.streams) + len(streams) + i)
                        for i, (who, w) in enumerate(zip(users, weights, strict=True))]
        self.streams += streams
        # the worker with the least traffic (weighted by what a call costs) takes the key
        w = min(range(len(self._loads)), key=self._loads.__getitem__)
        k.worker = w
        self._loads[w] += rate * SPEC_COST.get(k.spec, 1.0)
        self._new_keys[w].append(k)
        self._new_streams[w] += [st.spec() for st in streams]

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

    def day_ops(self, d: int) -> list[_Stream]:
        rng, factor = self.rng, self.day_factor(d)
        ops: list[_Stream] = []
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

    # -- run ---------------------------------------------------------------------------------------
    def run(self) -> None:
        from tqdm.auto import tqdm

        self.streams: list[_Stream] = []
        self.calibrate()
        self.schedule()
        final = self.end - timedelta(minutes=30)
        self.events = sorted((e for e in self.events if e[0] < final), key=lambda e: (e[0], e[1]))
        show = self.progress and sys.stderr.isatty()
        bar = tqdm(total=self.days + 1, desc="seeding demo", unit="day", file=sys.stderr,
                   disable=not show, leave=False)
        ev = 0
        quant, nq = self._quant, len(self._quant)
        clock = self.clock
        try:
            self.start_workers()
            self.hold_store()
            for d in range(self.days + 1):
                u0 = time.perf_counter()
                day_start = self.day0 + timedelta(days=d)
                day_end = min(day_start + timedelta(days=1), final)
                ops = self.day_ops(d) if d else []
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
                        self.traffic(ops, qs, j, j2, day_start, floor)
                        clock.now = max(clock.now, times[j2 - 1], floor)
                        j = j2
                    if nxt is None or nxt >= day_end:
                        self.timings["usage calls"] += time.perf_counter() - u0
                        break
                    clock.now = max(nxt, clock.now)
                    t0 = time.perf_counter()
                    self.timings["usage calls"] += t0 - u0
                    self.events[ev][2]()
                    u0 = time.perf_counter()
                    self.timings[self.events[ev][3]] += u0 - t0
                    floor = clock.now
                    ev += 1
                bar.update(1)
                if d % 7 == 0:
                    bar.set_postfix_str(f"{self.calls:,} calls")
        finally:
            self.release_store()
            bar.close()
        self.stop_workers()  # their journals are on disk; any ledger's ingest takes them
        # remaining events (none normally) and the closing sequence, in the last 30 minutes
        t0 = time.perf_counter()
        with self.ledger(SECURITY_LEAD).keep_store_open():
            for when, _, fn, _ in self.events[ev:]:
                clock.now = max(when, clock.now)
                fn()
            clock.now = self.end - timedelta(minutes=20)
            self.run_due()
        self.timings["run due"] += time.perf_counter() - t0

    # -- traffic workers ---------------------------------------------------------------------
    def hold_store(self) -> None:
        """Keep the store open in this process (~20x cheaper lifecycle transactions). The
        workers' usage calls only journal; a worker needs the store only to open a ledger for a
        principal new to it, and ``traffic`` releases the store for those batches."""
        if self._hold is None:
            self._hold = contextlib.ExitStack()
            self._hold.enter_context(self.ledger(SECURITY_LEAD).keep_store_open())

    def release_store(self) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.close()

    def start_workers(self) -> None:
        self.runners = [_Remote(self.home) if self.workers else _Local(self.home)
                        for _ in range(max(1, self.workers))]

    def stop_workers(self) -> None:
        runners, self.runners = self.runners, []
        for r in runners:
            r.close()

    def traffic(self, ops: list[_Stream], qs: list[int], j: int, j2: int, day_start: datetime,
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
            self.samples += samples
            self.unexpected_count += n_unexpected
            self.unexpected += unexpected[:max(0, 20 - len(self.unexpected))]
            self._opened[w] |= opening[w]
        if held:
            self.hold_store()
        self.calls += j2 - j

    def close(self) -> None:
        self.stop_workers()
        for led in reversed(list(self.leds.values())):
            led.close()
        self.leds.clear()


# -- the entry point -----------------------------------------------------------------------------------
def _read_demo_file(home: Path) -> dict | None:
    path = home / DEMO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _write_demo_file(home: Path, doc: dict) -> None:
    tmp = home / (DEMO_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, home / DEMO_FILE)


def _check_args(keys: object, months: object, seed: object) -> None:
    for value, name, lo, hi in ((keys, "keys", MIN_KEYS, MAX_KEYS),
                                (months, "months", MIN_MONTHS, MAX_MONTHS)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidInput(f"{name} must be a whole number from {lo} to {hi}, not {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"seed must be a whole number, not {seed!r}")


def _from_file(home: Path, doc: dict) -> DemoResult:
    principals = {p["name"]: ", ".join(p["roles"]) for p in doc.get("principals", [])}
    return DemoResult(
        home=home, keys=doc.get("keys", 0), records=doc.get("records", 0),
        seconds=doc.get("seconds", 0.0), principals=principals, seed=doc.get("seed", 0),
        months=doc.get("months", 0),
        start=datetime.fromisoformat(doc["start"]) if doc.get("start") else None,
        generated_at=(datetime.fromisoformat(doc["generated_at"])
                      if doc.get("generated_at") else None),
        states=doc.get("states", {}), findings=doc.get("findings", {}),
        overdue=doc.get("overdue", []), highlights=doc.get("highlights", {}),
        already_seeded=True)


def seed_demo(home: str | os.PathLike, *, keys: int = 150, months: int = 18, seed: int = 7,
              progress: bool = True, force: bool = False, end: datetime | None = None,
              echo: Callable[[str], object] | None = print, workers: int = 2) -> DemoResult:
    """Seed a demo estate into ``home`` (a new or empty folder) and return what was built.

    ``keys`` (20..2000) across eight teams, ``months`` (2..60) of history ending at ``end``
    (default: now, UTC), ``seed`` for ``random.Random``. A progress bar goes to stderr when it
    is a terminal and ``progress`` is true; ``echo`` prints the summary (``None``: silent).
    ``workers`` processes make the usage calls (0: this process); lifecycle events always run
    here, between their batches of calls.

    A home seeded before (its ``demo.json`` says so) is not seeded again: the result describes
    it, with ``already_seeded=True``. ``force=True`` deletes a demo home (one with
    ``demo.json``; never another folder) and its ``<home>-backups`` folder and seeds anew.
    """
    _check_args(keys, months, seed)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 8:
        raise InvalidInput(f"workers must be a whole number from 0 to 8, not {workers!r}")
    path = Path(home).expanduser().absolute()
    doc = _read_demo_file(path) if path.is_dir() else None
    if doc is not None and not force:
        if doc.get("status") == "complete":
            result = _from_file(path, doc)
            if echo is not None:
                echo("\n".join(summary_lines(result)))
                echo("  (use --force to delete it and seed again)")
            return result
        raise ConfigError(f"{path} holds a demo whose seeding did not finish; run again with "
                          "--force (force=True) to delete it and start over")
    if path.exists() and doc is None and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} exists and is not a demo home (no {DEMO_FILE}); the demo "
                          "seeds a new or empty folder only - choose another --home")
    if end is None:
        end = datetime.now(UTC).replace(microsecond=0)
    elif not isinstance(end, datetime) or end.tzinfo is None:
        raise InvalidInput("end must be a timezone-aware datetime")
    end = end.astimezone(UTC)
    if doc is not None:  # force: a demo home, ours to delete
        shutil.rmtree(path)
        backups = path.parent / f"{path.name}-backups"
        if backups.is_dir():
            shutil.rmtree(backups)
    started = time.perf_counter()
    sim = _Sim(path, keys, months, seed, end, progress, workers)
    path.mkdir(parents=True, exist_ok=True)
    try:
        sim.run()
        result = _finish(sim)
    finally:
        sim.close()
    if sim.backups_dir.is_dir() and not any(sim.backups_dir.iterdir()):
        sim.backups_dir.rmdir()
    result.seconds = time.perf_counter() - started
    _write_demo_file(path, _demo_doc(result))
    if echo is not None:
        echo("\n".join(summary_lines(result)))
    return result


def _finish(sim: _Sim) -> DemoResult:
    """Read back what the estate looks like (as the auditor), verify the ledger, label samples."""
    t0 = time.perf_counter()
    sim.clock.now = sim.end - timedelta(minutes=5)
    anna = sim.ledger(AUDITOR)
    df = anna.list_keys()
    states = Counter(df["state"])
    end = sim.end
    overdue = sorted(df[(df["state"] == "active") & (df["next_rotation_due"].notna()) &
                        (df["next_rotation_due"] <= end)]["name"])
    findings: dict[str, int] = {}
    trend = anna.compliance_trend()
    if len(trend):
        last = trend[trend["run_id"] == trend.loc[trend["time"].idxmax(), "run_id"]]
        for sev, n in last.groupby("severity")["open"].sum().items():
            findings[str(sev)] = int(n)
    sim.clock.now = sim.end - timedelta(minutes=1)
    anna.flush_audit()
    report = anna.verify_audit()
    if not report.ok:
        raise KeyLedgerError(f"the demo's audit ledger does not verify: {report}")
    sim.clock.now = sim.end
    by_name = {r.name: r for r in df.itertuples()}
    samples: list[Sample] = []
    # in (key, version) order: the same whichever worker made which ciphertext when
    for i, s in enumerate(sorted(sim.samples, key=lambda s: (s.key, s.version))):
        row = by_name[s.key]
        if row.state == "destroyed":
            why = "key destroyed"
        elif row.state == "pending-deletion":
            why = "key pending deletion"
        elif row.state == "suspended":
            why = "key suspended"
        elif s.version < row.min_decryption_version:
            why = "below min_decryption_version"
        else:
            why = "decrypts"
        samples.append(s._replace(expected=why))
        if why == "decrypts" and i % 8 == 3:
            blob = s.ciphertext
            samples.append(s._replace(ciphertext=blob[:-1] + bytes([blob[-1] ^ 0x5A]),
                                      expected="tampered"))
    p = sim.plan
    sim.highlights.update({
        "compromised": p.compromised_open.name,
        "compromised_and_replaced": p.compromised_rotated.name,
        "near_usage_limit": p.usage_limited.name, "stale": p.stale.name,
        "neglected": [k.name for k in p.neglected], "overdue": overdue,
        "pending_deletion": [k.name for k in p.pending] + [p.pending_request.name],
        "destroyed": [p.destroyed_due.name, p.destroyed_dual.name],
        "suspended": p.disabled.name, "pre_activation": p.preactivation.name,
        "exportable": p.exportable.name,
        "pending_request": sim.highlights.get("requests", {}).get(p.pending_request.name),
    })
    sim.timings["read back and verify"] += time.perf_counter() - t0
    return DemoResult(home=sim.home, keys=len(df), records=report.records, timings=dict(sim.timings),
                      seconds=0.0, principals=_principals(sim),  # seed_demo sets it last
                      sample=samples, seed=sim.seed, months=sim.months, start=sim.start,
                      generated_at=sim.end, states=dict(states), findings=findings,
                      overdue=overdue, highlights=sim.highlights,
                      unexpected=sim.unexpected + ([f"... {sim.unexpected_count} in all"]
                                                   if sim.unexpected_count > 20 else []))


def _principals(sim: _Sim) -> dict[str, str]:
    """name -> a short description of the roles, admins first."""
    out: dict[str, str] = {}
    for who, grants in sim.grants.items():
        star = [g for g in grants if g.endswith(" on *")]
        per = Counter(g.split(" on ")[0] for g in grants if not g.endswith(" on *"))
        parts = star + [f"{role} on {n} key{'s' if n > 1 else ''}" for role, n in per.items()]
        out[who] = ", ".join(parts)
    order = {SECURITY_LEAD: 0, PLATFORM_ADMIN: 1, AUDITOR: 2}
    admins = {t.admin for t in TEAMS}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 3 if kv[0] in admins else
                                                            4 if kv[0].startswith("svc-") else 5),
                                                    kv[0])))


def _demo_doc(r: DemoResult) -> dict:
    return {
        "status": "complete", "seed": r.seed, "keys": r.keys, "months": r.months,
        "start": r.start.isoformat() if r.start else None,
        "generated_at": r.generated_at.isoformat() if r.generated_at else None,
        "records": r.records, "seconds": round(r.seconds, 1),
        "principals": [{"name": n, "roles": roles.split(", ")} for n, roles in
                       r.principals.items()],
        "states": r.states, "findings": r.findings, "overdue": r.overdue,
        "highlights": r.highlights,
        "timings": {k: round(v, 1) for k, v in r.timings.items()},
        "unexpected": r.unexpected,
    }


__all__ = ["DEMO_FILE", "DemoResult", "Sample", "seed_demo"]
