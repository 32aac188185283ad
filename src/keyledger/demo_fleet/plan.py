"""The plan of a demo estate: teams, principals, and which key plays which part of the story.

Pure: a function of the seed, the number of keys and the number of days (no ledger is touched).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidInput
from ..model import SPECS

MIN_KEYS, MAX_KEYS = 20, 2000
MIN_MONTHS, MAX_MONTHS = 2, 60
DAYS_PER_MONTH = 30.44

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


class DemoKey:
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


class Plan:
    def __init__(self, n_keys: int, days: int, rng: random.Random) -> None:
        self.rng, self.days = rng, days
        specs = [s for s, c in _spec_counts(n_keys).items() for _ in range(c)]
        rng.shuffle(specs)
        n_wrap = sum(s == "AES_256" for s in specs) // 7 if n_keys >= 40 else 0
        used: set[str] = set()
        self.keys: list[DemoKey] = []
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
            self.keys.append(DemoKey(name, spec, purpose, team, env))
        self._assign_roles()
        self._fill_in()

    # roles: each key plays at most one part of the story
    def _pick(self, role: str, *preds: Callable[[DemoKey], bool]) -> DemoKey:
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
