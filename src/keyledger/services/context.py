"""What every service of a ``KeyLedger`` shares: who calls, trusted time, the runtime, and the
audit/authorise helpers. A service gets a ``Context`` (and the repositories it imports), never
the facade."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from ..access import WILDCARD, Grants, Role, check
from ..errors import (
    AccessDenied,
    ConfigError,
    InvalidInput,
    KeyLedgerError,
    KeyNotFound,
    KeyStateError,
    PolicyViolation,
)
from ..model import Key, Purpose, is_valid_name, name_digest, validate_name
from ..runtime import HomeRuntime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_ALLOWED_MAX = 4096  # remembered authorisations per ledger (per grants snapshot)
# names that passed validate_name (a name's validity never changes, so the regex runs once per
# name, not once per call; services/crypto.py's hot path reads it too)
VALID_NAMES: set[str] = set()
_VALID_NAMES_MAX = 4096


def _remember_valid(name: str) -> None:
    if len(VALID_NAMES) < _VALID_NAMES_MAX:
        VALID_NAMES.add(name)


class Audited:
    """Context manager: exactly one audit record per call, whatever happens inside."""

    __slots__ = ("ctx", "action", "name", "key", "version", "context", "detail")

    def __init__(self, ctx: Context, action: str, name: str | None,
                 context: bytes | None = None) -> None:
        self.ctx, self.action, self.name, self.context = ctx, action, name, context
        self.key: Key | None = None
        self.version: int | None = None
        self.detail: str | None = None

    def __enter__(self) -> Audited:
        return self

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        key, ctx = self.key, self.ctx
        if exc is None and key is not None:  # the hot path: a call on a key that worked
            rt = ctx.rt  # time_us inline: trusted time unless a simulation's injected clock
            now = rt.trusted_us() if ctx.clock is None else ctx.time_us()
            rt.journal.append(now, ctx.principal, self.action, key.name, key.key_id,
                              self.version, "ok", None, self.detail,
                              self.context.decode() if self.context else None)
            return False
        self._record(exc)
        return False

    def _record(self, exc: BaseException | None) -> None:
        """Append the record of any call (refused, failed, or on no key)."""
        if exc is None:
            outcome, error, detail = "ok", None, self.detail
        else:
            outcome = "denied" if isinstance(exc, AccessDenied) else "failed"
            error = type(exc).__name__
            detail = self.detail or (str(exc)[:500] if isinstance(exc, KeyLedgerError) else None)
        key = self.key
        name = key.name if key is not None else self.name
        if key is None and name is not None and _refused_name(name, exc):
            name, detail = _hide_name(name, detail)
        ctx = self.ctx
        ctx.rt.journal.append(
            ctx.time_us(), ctx.principal, self.action,
            name, key.key_id if key is not None else None,
            self.version, outcome, error, detail,
            self.context.decode() if self.context else None,
        )


def _refused_name(name: str, exc: BaseException | None) -> bool:
    """A name the call refused because it names no key or is no name at all: it may be a
    secret passed in the wrong argument, so the ledger keeps only its hash."""
    if name == WILDCARD:  # "every key" (set_policy, grant), not a name
        return False
    return not is_valid_name(name) or isinstance(exc, KeyNotFound)


def _hide_name(name: str, detail: str | None) -> tuple[str, str | None]:
    """The name's digest, and the detail (e.g. the error message quoting it) without it."""
    label = name_digest(name)
    if detail and name:
        # messages quote names with !r (whole, or its first 130 characters); a longer name
        # may also appear bare, a short one ("k") would match inside words, so it is left
        forms = [repr(name), repr(name[:130]), *([name] if len(name) >= 6 else [])]
        for form in forms:
            detail = detail.replace(form, label)
    return label, detail


class Context:
    """One ``KeyLedger``'s caller, clock and runtime (the runtime is shared per process)."""

    def __init__(self, home: Path, principal: str, rt: HomeRuntime) -> None:
        self.home = home
        self.principal = principal
        self.rt = rt
        # trusted time, unless the home's mode lets an injected clock in (accept_clock)
        self.clock: Callable[[], datetime] | None = None
        self.closed = False
        # (grants snapshot, the (action, key_id) pairs it allowed this principal): a grant
        # change makes a new snapshot (catalog.json reloaded), which starts an empty set.
        # Replaced whole, never changed in place but by adding; the crypto hot path reads it.
        self.allowed: tuple[Grants | None, set[tuple[str, str | None]]] = (None, set())

    @property
    def simulation(self) -> bool:
        return self.rt.simulation

    def accept_clock(self, clock: Callable[[], datetime] | None) -> None:
        """Use an injected clock only in a simulation home: a real home's waiting periods
        (deletion windows, request expiry) are judged on trusted time, never a caller's."""
        if clock is None:
            return
        if not self.rt.simulation:
            raise ConfigError(
                "this home was created with the real clock; an injected clock is only accepted "
                "in a simulation home: create one with kl.open(new_home, clock=...)")
        if not callable(clock):
            raise InvalidInput("clock must be a callable returning a timezone-aware datetime")
        self.clock = clock

    def now(self) -> datetime:
        """Trusted time, or in a simulation home this ledger's injected clock's time."""
        if self.clock is None or not self.rt.simulation:
            return self.rt.trusted_now()
        now = self.clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise InvalidInput("clock() must return a timezone-aware datetime")
        return now.astimezone(UTC)

    def time_us(self) -> int:
        """``now()`` in microseconds since the epoch (an audit record's time)."""
        if self.clock is None or not self.rt.simulation:
            return self.rt.trusted_us()
        return (self.now() - _EPOCH) // _US

    def audited(self, action: str, name: object, context: bytes | None = None) -> Audited:
        """One audit record for this call; ``name`` is recorded only if it is text."""
        if self.closed:
            raise KeyStateError("this KeyLedger is closed; open the home again")
        return Audited(self, action, name if isinstance(name, str) else None, context)

    def record_failure(self, action: str, name: object, context: bytes | None, key: Key | None,
                       version: int | None, exc: BaseException,
                       detail: str | None = None) -> None:
        """The record of a call that failed on the hot path (``CryptoService``'s one function
        per action, which has no ``Audited``): the same record ``Audited`` writes for a call
        that reached the same point (``key``, ``version``, ``detail`` set or not)."""
        rec = Audited(self, action, name if isinstance(name, str) else None, context)
        rec.key, rec.version, rec.detail = key, version, detail
        rec._record(exc)

    def key(self, rec: Audited, name: object) -> Key:
        """Resolve a key name or alias and authorise ``rec.action`` on it (deny by default)."""
        if type(name) is not str or name not in VALID_NAMES:
            validate_name(name)
            if type(name) is str:  # (a str subclass might hash differently: not kept)
                _remember_valid(name)
        key = self.rt.catalog.get(name)  # type: ignore[arg-type]
        rec.key = key
        self.authorize(rec, rec.action, key)
        return key

    def record_filter(self, rec: Audited, name: str | None) -> None:
        """A key name used as a filter is recorded as the key it names, or (naming no key: it
        may be a secret searched for) as its hash, like a refused name."""
        if name is None or name == WILDCARD:
            return
        try:
            rec.key = self.rt.catalog.get(name)
        except KeyNotFound:
            rec.name = name_digest(name)

    def authorize(self, rec: Audited, action: str, key: Key | None, *,
                  any_scope: bool = False) -> None:
        grants = self.rt.catalog.grants_now()
        if any_scope and any(p == self.principal and Role.ADMIN in r
                             for (_, p), r in grants.items()):
            return
        key_id = key.key_id if key else None
        under, allowed = self.allowed
        if under is not grants:  # another snapshot of the grants: forget what the old allowed
            allowed = set()
            self.allowed = (grants, allowed)
        elif (action, key_id) in allowed:
            return
        check(grants, self.principal, action, key_id, key.name if key else None)
        if len(allowed) < _ALLOWED_MAX:
            allowed.add((action, key_id))

    # -- the quorum gate's question: how many admins must agree --------------------------------
    def quorum(self, key: Key | None) -> int:
        q: Any = key.policy.get("quorum") if key is not None else None  # a JSON value
        return int(q) if q else self.rt.home_quorum()

    def require_quorum(self, key: Key | None, action: str, what: str, args: str = "") -> None:
        needed = self.quorum(key)
        if needed > 1:
            raise PolicyViolation(
                f"{what} needs {needed} distinct admins: run request({action!r}, name, reason"
                f"{args}) and ask {needed - 1} other admin(s) to approve it")


# -- argument checks shared by the services ------------------------------------------------------
def as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        raise InvalidInput(f"{what} must be bytes; encode text first, e.g. s.encode()")
    raise InvalidInput(f"{what} must be bytes, not {type(value).__name__}")


def reason_text(value: object) -> str:
    """A reason is text; checked before anything changes (it is written last)."""
    if not isinstance(value, str):
        raise InvalidInput(f"reason must be text, not {type(value).__name__}")
    return value


def require_purpose(key: Key, *purposes: Purpose) -> None:
    if key.purpose not in purposes:
        want = " or ".join(p.value for p in purposes)
        raise PolicyViolation(
            f"key {key.name!r} is a {key.purpose.value} key ({key.spec.name}); "
            f"this operation needs a {want} key"
        )


def tags_json(tags: object) -> str:
    if tags is None:
        return "{}"
    if not isinstance(tags, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise InvalidInput("tags must be a mapping of strings to strings, e.g. {'team': 'pay'}")
    return json.dumps(dict(tags), sort_keys=True)


class Service:
    """Base of the services: the context's helpers under the names the service code uses,
    bound once here (no extra call per use: the crypto calls are the hot path)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.principal: str = ctx.principal
        self.home: Path = ctx.home
        self._rt: HomeRuntime = ctx.rt
        self._now: Callable[[], datetime] = ctx.now
        self._audited: Callable[..., Audited] = ctx.audited
        self._key: Callable[[Audited, object], Key] = ctx.key
        self._record_filter: Callable[[Audited, str | None], None] = ctx.record_filter
        self._authorize: Callable[..., None] = ctx.authorize
        self._quorum: Callable[[Key | None], int] = ctx.quorum
        self._require_quorum: Callable[..., None] = ctx.require_quorum

    @property
    def simulation(self) -> bool:
        return self.ctx.simulation

    _bytes = staticmethod(as_bytes)
    _reason = staticmethod(reason_text)
    _require_purpose = staticmethod(require_purpose)
    _tags_json = staticmethod(tags_json)
