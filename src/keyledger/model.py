"""Keys, versions, specs, states and the one table of legal transitions (pure, no I/O)."""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import ClassVar, TypeGuard, overload

from .errors import InvalidInput, KeyStateError


class Purpose(str, Enum):
    ENCRYPT = "encrypt"
    SIGN = "sign"
    MAC = "mac"
    WRAP = "wrap"


class Family(str, Enum):
    AES = "aes"
    HMAC = "hmac"
    RSA = "rsa"
    EC = "ec"
    EDDSA = "eddsa"


@dataclass(frozen=True)
class KeySpec:
    """An algorithm and size; which purposes it can serve; which is the default."""

    name: str
    family: Family
    bits: int
    purposes: tuple[Purpose, ...]
    curve: str | None = None

    @property
    def default_purpose(self) -> Purpose:
        return self.purposes[0]

    @property
    def symmetric(self) -> bool:
        return self.family in (Family.AES, Family.HMAC)

    def __str__(self) -> str:
        return self.name


# compliance finding severities, most severe first (rules, findings, reports, views)
SEVERITIES = ("critical", "high", "medium", "low", "info")

SPECS: dict[str, KeySpec] = {
    s.name: s
    for s in (
        KeySpec("AES_256", Family.AES, 256, (Purpose.ENCRYPT, Purpose.WRAP)),
        KeySpec("AES_128", Family.AES, 128, (Purpose.ENCRYPT, Purpose.WRAP)),
        KeySpec("HMAC_SHA256", Family.HMAC, 256, (Purpose.MAC,)),
        KeySpec("RSA_2048", Family.RSA, 2048, (Purpose.SIGN,)),
        KeySpec("RSA_3072", Family.RSA, 3072, (Purpose.SIGN,)),
        KeySpec("RSA_4096", Family.RSA, 4096, (Purpose.SIGN,)),
        KeySpec("EC_P256", Family.EC, 256, (Purpose.SIGN,), curve="secp256r1"),
        KeySpec("EC_P384", Family.EC, 384, (Purpose.SIGN,), curve="secp384r1"),
        KeySpec("ED25519", Family.EDDSA, 256, (Purpose.SIGN,), curve="ed25519"),
    )
}


def parse_spec(spec: object) -> KeySpec:
    if isinstance(spec, KeySpec):
        return spec
    if not isinstance(spec, str):
        raise InvalidInput(f"spec must be a string such as 'AES_256', not {type(spec).__name__}")
    found = SPECS.get(spec.strip().upper().replace("-", "_"))
    if found is None:
        raise InvalidInput(f"unknown key spec {spec!r}; choose one of: {', '.join(SPECS)}")
    return found


def parse_purpose(purpose: object, spec: KeySpec) -> Purpose:
    if purpose is None:
        return spec.default_purpose
    try:
        value = Purpose(purpose)
    except ValueError:
        raise InvalidInput(
            f"unknown purpose {purpose!r}; choose one of: {', '.join(p.value for p in Purpose)}"
        ) from None
    if value not in spec.purposes:
        allowed = ", ".join(p.value for p in spec.purposes)
        raise InvalidInput(f"a {spec.name} key cannot serve purpose {value.value!r} ({allowed})")
    return value


class KeyState(str, Enum):
    """NIST SP 800-57 states, plus pending-deletion (a waiting period before destroy)."""

    PRE_ACTIVATION = "pre-activation"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DEACTIVATED = "deactivated"
    COMPROMISED = "compromised"
    PENDING_DELETION = "pending-deletion"
    DESTROYED = "destroyed"


class Use(str, Enum):
    """Protect = apply protection (encrypt, sign, mac, wrap); process = decrypt, verify."""

    PROTECT = "protect"
    PROCESS = "process"


S = KeyState

# (action, from-state) -> to-state. The single source of truth for the state machine.
# ``None`` as a target means "the state held before deletion was scheduled".
TRANSITIONS: dict[tuple[str, KeyState], KeyState | None] = {
    ("enable", S.PRE_ACTIVATION): S.ACTIVE,
    ("enable", S.SUSPENDED): S.ACTIVE,
    ("enable", S.ACTIVE): S.ACTIVE,
    ("disable", S.ACTIVE): S.SUSPENDED,
    ("disable", S.SUSPENDED): S.SUSPENDED,
    ("deactivate", S.ACTIVE): S.DEACTIVATED,
    ("deactivate", S.SUSPENDED): S.DEACTIVATED,
    ("rotate", S.ACTIVE): S.ACTIVE,
    ("rotate", S.COMPROMISED): S.ACTIVE,
    ("rotate", S.DEACTIVATED): S.ACTIVE,
    **{
        ("mark_compromised", s): S.COMPROMISED
        for s in (S.PRE_ACTIVATION, S.ACTIVE, S.SUSPENDED, S.DEACTIVATED, S.COMPROMISED)
    },
    **{
        ("schedule_deletion", s): S.PENDING_DELETION
        for s in (S.PRE_ACTIVATION, S.ACTIVE, S.SUSPENDED, S.DEACTIVATED, S.COMPROMISED)
    },
    ("cancel_deletion", S.PENDING_DELETION): None,
    ("destroy", S.PENDING_DELETION): S.DESTROYED,
}

# Which uses each key state allows (SP 800-57: deactivated/compromised may still process).
ALLOWED_USES: dict[KeyState, frozenset[Use]] = {
    S.PRE_ACTIVATION: frozenset(),
    S.ACTIVE: frozenset({Use.PROTECT, Use.PROCESS}),
    S.SUSPENDED: frozenset(),
    S.DEACTIVATED: frozenset({Use.PROCESS}),
    S.COMPROMISED: frozenset({Use.PROCESS}),
    S.PENDING_DELETION: frozenset(),
    S.DESTROYED: frozenset(),
}

_HINTS = {
    S.SUSPENDED: "enable it first",
    S.PENDING_DELETION: "cancel the scheduled deletion first",
    S.DESTROYED: "a destroyed key cannot be used or changed",
    S.PRE_ACTIVATION: "enable it first",
    S.COMPROMISED: "rotate it to get a fresh active version",
    S.DEACTIVATED: "rotate it to get a fresh active version",
}


def next_state(action: str, current: KeyState, name: str, prior: KeyState | None = None) -> KeyState:
    """Return the state after ``action`` or raise ``KeyStateError`` naming what is allowed."""
    key = (action, current)
    if key not in TRANSITIONS:
        allowed = sorted(a.replace("_", " ") for (a, s) in TRANSITIONS if s == current)
        hint = _HINTS.get(current, "")
        raise KeyStateError(
            f"cannot {action.replace('_', ' ')} key {name!r}: it is {current.value}"
            + (f" ({hint})" if hint else "")
            + (f"; allowed now: {', '.join(allowed)}" if allowed else "")
        )
    target = TRANSITIONS[key]
    if target is None:
        return prior or S.ACTIVE
    return target


def check_use(state: KeyState, use: Use, name: str) -> None:
    if use not in ALLOWED_USES[state]:
        verb = "apply protection with" if use is Use.PROTECT else "use"
        hint = _HINTS.get(state, "")
        raise KeyStateError(
            f"cannot {verb} key {name!r}: it is {state.value}" + (f" ({hint})" if hint else "")
        )


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")


def validate_name(name: object, what: str = "key name") -> str:
    """The name itself, or ``InvalidInput``. The whole string must match: ``"alice\\n"`` is not
    ``"alice"`` (a trailing newline would pass a ``$``-anchored pattern)."""
    if not isinstance(name, str):
        raise InvalidInput(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidInput(f"{what} must not be empty")
    if not _NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {what} {name[:130]!r}: use 1-128 letters, digits and . _ : / @ - "
            "starting with a letter or digit"
        )
    return name


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def name_digest(name: str) -> str:
    """How the audit ledger records a refused key name that names no key (it may be a secret
    passed in the wrong argument): ``sha256:`` + the first 12 hex digits of the SHA-256 of its
    UTF-8 bytes. Hash a suspected name the same way to find its records (docs/audit.md)."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest[:12]}"


def validate_bool(value: object, what: str) -> bool:
    """``True`` or ``False`` only: ``"no"`` or ``0`` would silently mean something else."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be True or False, not {value!r}"[:200])
    return value


def validate_version(value: object, what: str = "version") -> int | None:
    """None (the latest) or a key version number >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{what} must be a positive whole number, not {value!r}"[:200])
    return value


def validate_when(value: object, what: str) -> datetime | None:
    """None or a timezone-aware datetime (a naive one would be read in an unknown zone)."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} must be a timezone-aware datetime, e.g. "
                           f"datetime(2026, 1, 1, tzinfo=UTC), not {value!r}"[:200])
    return value


_PERIOD_RE = re.compile(r"\s*([0-9]{1,30})\s*([smhdwy])\s*")
MAX_PERIOD = timedelta(days=100 * 365)  # longer is a typo, and overflows date arithmetic
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


@overload
def parse_period(value: timedelta | str) -> timedelta: ...
@overload
def parse_period(value: object) -> timedelta | None: ...


def parse_period(value: object) -> timedelta | None:
    """``timedelta``, ``"90d"``, ``"12h"``, ``"1y"`` or None -> timedelta or None."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        period = value
    elif isinstance(value, str):
        m = _PERIOD_RE.fullmatch(value.lower())
        if not m:
            raise InvalidInput(
                f"cannot read period {value[:40]!r}: write a number and a unit, e.g. '90d', "
                "'12h', '1y'")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds > MAX_PERIOD.total_seconds():  # before timedelta(), which would overflow
            raise InvalidInput(f"a period may be at most 100 years ('100y'), not {value!r}"[:200])
        period = timedelta(seconds=seconds)
    else:
        raise InvalidInput(f"a period must be a timedelta or a string like '90d', not {value!r}")
    if period <= timedelta(0):
        raise InvalidInput("a rotation period must be positive")
    if period > MAX_PERIOD:
        raise InvalidInput(f"a period may be at most 100 years ('100y'), not {value!r}"[:200])
    return period


def default_rotation_period(spec: KeySpec | None, purpose: Purpose) -> timedelta:
    """COMPLIANCE.md defaults: 90 days for symmetric keys, 1 year for signing keys."""
    return timedelta(days=365) if purpose is Purpose.SIGN else timedelta(days=90)


# AES-GCM with random 96-bit nonces: at most 2**32 encryptions per key version (NIST SP 800-38D).
DEFAULT_USAGE_LIMIT = 2**32


def resolve_rotation_period(explicit_s: int | None, spec: KeySpec, purpose: Purpose,
                            tags: dict[str, str], home_policy: dict) -> tuple[timedelta, str]:
    """Effective rotation period and where it comes from: key > tag > home (by purpose) > default.

    When several tag rules match, the shortest period wins (the strictest policy applies).
    """
    if explicit_s is not None:
        return timedelta(seconds=explicit_s), "key"
    by_tag = home_policy.get("rotation_by_tag", {})
    matches = [(secs, f"tag {t}") for t, secs in by_tag.items()
               if "=" in t and tags.get(t.split("=", 1)[0]) == t.split("=", 1)[1]]
    if matches:
        secs, source = min(matches)
        return timedelta(seconds=secs), source
    by_purpose = home_policy.get("rotation_by_purpose", {})
    if purpose.value in by_purpose:
        return timedelta(seconds=by_purpose[purpose.value]), "home"
    return default_rotation_period(spec, purpose), "default"


# The largest usage limit: DuckDB BIGINT and Arrow int64 hold nothing larger.
MAX_USAGE_LIMIT = 2**63 - 1


def valid_usage_limit(value: object) -> TypeGuard[int]:
    return (isinstance(value, int) and not isinstance(value, bool)
            and 1 <= value <= MAX_USAGE_LIMIT)


def configured_usage_limit(key_policy: dict, home_policy: dict) -> tuple[int | None, str | None]:
    """The usage limit set for a key (its own, else the home's) and where it comes from.

    A stored value that is no valid limit (say 2**64, which older releases accepted) is
    ignored, so the next level applies; ``invalid_usage_limit`` names it for reports."""
    for source, policy in (("key", key_policy), ("home", home_policy)):
        value = policy.get("usage_limit")
        if valid_usage_limit(value):
            return value, source
    return None, None


def invalid_usage_limit(policy: dict) -> object | None:
    """The stored usage_limit of a policy if it is set but invalid, else None."""
    value = policy.get("usage_limit")
    return None if value is None or valid_usage_limit(value) else value


def usage_limit(key_policy: dict, home_policy: dict) -> int:
    """Encryptions one version may make: the key's limit, else the home's, else 2**32."""
    return configured_usage_limit(key_policy, home_policy)[0] or DEFAULT_USAGE_LIMIT


@dataclass(frozen=True)
class KeyVersion:
    version: int
    handle: bytes  # CKA_ID of the HSM object (private key for pairs)
    state: str  # "active" (may protect if latest), "retired", "compromised", "destroyed"
    created_at: datetime
    destroyed_at: datetime | None = None


@dataclass(frozen=True)
class Key:
    """A catalog entry. Material stays in the HSM; this holds only metadata.

    Frozen: a ``Key`` is a snapshot of the catalog; change a key through ``KeyLedger``."""

    key_id: str
    name: str
    spec: KeySpec
    purpose: Purpose
    state: KeyState
    owner: str | None
    created_at: datetime
    rotated_at: datetime
    rotation_period: timedelta | None  # effective period (see resolve_rotation_period)
    exportable: bool
    latest_version: int
    min_decryption_version: int = 1
    min_encryption_version: int = 1
    prior_state: KeyState | None = None
    deletion_due: datetime | None = None
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    policy: dict[str, object] = field(default_factory=dict)
    rotation_source: str = "default"
    versions: dict[int, KeyVersion] = field(default_factory=dict)

    @functools.cached_property
    def key_id_bytes(self) -> bytes:
        return uuid.UUID(self.key_id).bytes

    @property
    def next_rotation_due(self) -> datetime | None:
        if self.rotation_period is None or self.state in (S.DESTROYED, S.PENDING_DELETION):
            return None
        return self.rotated_at + self.rotation_period

    def version_for_decrypt(self, version: int) -> KeyVersion:
        v = self.versions.get(version)
        if v is None or v.state == "destroyed":
            raise KeyStateError(f"version {version} of key {self.name!r} is destroyed or unknown")
        if version < self.min_decryption_version:
            raise KeyStateError(
                f"version {version} of key {self.name!r} is below its minimum decryption "
                f"version {self.min_decryption_version}; lower it or rewrap the data"
            )
        return v

    def version_for_protect(self) -> KeyVersion:
        v = self.versions[self.latest_version]
        if self.latest_version < self.min_encryption_version:
            raise KeyStateError(f"key {self.name!r} has no version allowed to encrypt; rotate it")
        return v

    def __repr__(self) -> str:
        return (
            f"<Key {self.name!r} {self.spec.name} {self.purpose.value} {self.state.value} "
            f"v{self.latest_version}>"
        )

    # How a key draws itself in a notebook: display.py (a layer above, imported with the
    # package) puts its card here, so the model knows no HTML and imports nothing above it.
    html_card: ClassVar[Callable[[Key], str] | None] = None

    def _repr_html_(self) -> str | None:
        """Notebook display: a card with state, owner, tags, policy and versions (no handles);
        None (the plain repr) if no card is installed."""
        card = Key.html_card
        return card(self) if card is not None else None
