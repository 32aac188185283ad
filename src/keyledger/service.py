"""KeyLedger: the one way in. Every public call is authorised, executed and audited once."""

from __future__ import annotations

import contextlib
import copy
import getpass
import json
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import ciphertext as ct
from . import outputs
from .access import WILDCARD, Role, check, roles_of
from .backup import BackupMixin
from .byok import ImportExportMixin
from .compliance import ComplianceMixin
from .config import default_home
from .display import AuditFrame
from .errors import (
    AccessDenied,
    AuditError,
    ConfigError,
    InvalidCiphertext,
    InvalidInput,
    KeyExists,
    KeyLedgerError,
    KeyNotFound,
    KeyStateError,
    PolicyViolation,
)
from .frames import KEY_STATES, normalize
from .governance import GovernanceMixin
from .hsm.backend import Capabilities, DecryptFailed
from .maintenance import MaintenanceMixin
from .model import (
    Family,
    Key,
    KeyState,
    KeyVersion,
    Purpose,
    Use,
    check_use,
    default_rotation_period,
    is_valid_name,
    name_digest,
    next_state,
    parse_period,
    parse_purpose,
    parse_spec,
    valid_usage_limit,
    validate_bool,
    validate_name,
    validate_version,
    validate_when,
)
from .model import usage_limit as key_usage_limit
from .rotation import PROTECT_ACTIONS
from .runtime import SIMULATION_LABEL, HomeRuntime, ReconcileReport, naive
from .store import catalog as cat
from .store.ledger import ACCEPT_ACTION, VerifyReport, accept_detail
from .store.ledger import verify as verify_ledger

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
MIN_DELETION_DAYS, MAX_DELETION_DAYS = 7, 30
_AUTO_ROTATIONS_PER_CALL = 3  # a call at a usage limit rotates at most this often
MAX_QUERY_TIMEOUT_S = 3600
AUDIT_LIMIT = 1000  # audit() returns the newest this many records unless told otherwise


def _fault(point: str) -> None:
    """Crash-test hook: ``KEYLEDGER_FAULT=create:after_hsm`` SIGKILLs the process right there."""
    if os.environ.get("KEYLEDGER_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class DataKey:
    """A data key for envelope encryption: use ``plaintext`` locally, store ``wrapped``."""

    plaintext: bytes
    wrapped: bytes
    key: str
    version: int

    def __repr__(self) -> str:  # never show the plaintext key
        return f"<DataKey for {self.key!r} v{self.version}, 256-bit, wrapped {len(self.wrapped)} B>"


class _Audited:
    """Context manager: exactly one audit record per call, whatever happens inside."""

    __slots__ = ("kl", "action", "name", "key", "version", "context", "detail")

    def __init__(self, kl: KeyLedger, action: str, name: str | None,
                 context: bytes | None = None) -> None:
        self.kl, self.action, self.name, self.context = kl, action, name, context
        self.key: Key | None = None
        self.version: int | None = None
        self.detail: str | None = None

    def __enter__(self) -> _Audited:
        return self

    def __exit__(self, etype, exc, tb) -> bool:
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
        self.kl._rt.journal.append(
            self.kl._time_us(), self.kl.principal, self.action,
            name, key.key_id if key is not None else None,
            self.version, outcome, error, detail,
            self.context.decode() if self.context else None,
        )
        return False


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


class KeyLedger(GovernanceMixin, MaintenanceMixin, BackupMixin, ImportExportMixin,
                ComplianceMixin):
    """Manage keys held in an HSM, with every call recorded in a tamper-evident ledger.

    Open with ``keyledger.open()``. Safe to share between threads; several processes may open
    the same home at once.
    """

    def __init__(self, home: Path, *, principal: str,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.home = home
        self.principal = principal
        # trusted time, unless the home's mode lets an injected clock in (_accept_clock)
        self._clock: Callable[[], datetime] | None = None
        self._rt = HomeRuntime.acquire(home, simulate=clock is not None)
        self._closed = False
        self.last_reconcile: ReconcileReport = ReconcileReport()
        try:
            with self._audited("open", None) as rec:
                self._accept_clock(clock)
                notes = [self._rt.mode_note] if self._rt.mode_note else []
                self._rt.mode_note = None
                if self._rt.bootstrap_admin(principal, self._now()):
                    notes.insert(0, f"{principal} initialised the home and is its first admin")
                self.last_reconcile = self._rt.reconcile(principal, now=self._now())
                if not self.last_reconcile.clean:
                    notes.append(str(self.last_reconcile))
                rec.detail = "; ".join(notes)[:500] or None
        except BaseException:
            self.close()
            raise

    def _accept_clock(self, clock: Callable[[], datetime] | None) -> None:
        """Use an injected clock only in a simulation home: a real home's waiting periods
        (deletion windows, request expiry) are judged on trusted time, never a caller's."""
        if clock is None:
            return
        if not self._rt.simulation:
            raise ConfigError(
                "this home was created with the real clock; an injected clock is only accepted "
                "in a simulation home: create one with kl.open(new_home, clock=...)")
        if not callable(clock):
            raise InvalidInput("clock must be a callable returning a timezone-aware datetime")
        self._clock = clock

    @property
    def simulation(self) -> bool:
        """True in a home created as a simulation (``kl.open(new_home, clock=...)``): times may
        come from a simulated clock, and views and reports say so."""
        return self._rt.simulation

    def __repr__(self) -> str:
        return f"<KeyLedger home={str(self.home)!r} principal={self.principal!r}>"

    def __enter__(self) -> KeyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush the audit journal into the store and release the HSM session."""
        if not self._closed:
            self._closed = True
            self._rt.release()

    @contextlib.contextmanager
    def keep_store_open(self) -> Iterator[KeyLedger]:
        """Keep the DuckDB store open across the calls in this block, for bulk admin work.

        Each call that writes the store then costs ~1 ms of store time instead of ~24 ms
        (opening and closing the file), e.g. creating or granting hundreds of keys. The file
        stays locked until the block ends: other processes' key operations go on (they only
        journal), but their reads and admin calls wait, and fail with ``StoreBusy`` after
        ``store_busy_timeout_s``. Keep blocks for scripts that run while nothing else needs
        the store. Not audited: it changes no key, grant or record.
        """
        if self._closed:
            raise KeyStateError("this KeyLedger is closed; open the home again")
        with self._rt.db.hold():
            yield self

    # -- plumbing --------------------------------------------------------------------------------
    def _now(self) -> datetime:
        """Trusted time, or in a simulation home the injected clock's time."""
        if self._clock is None or not self._rt.simulation:
            return self._rt.trusted_now()
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise InvalidInput("clock() must return a timezone-aware datetime")
        return now.astimezone(UTC)

    def _time_us(self) -> int:
        return (self._now() - _EPOCH) // _US

    def _audited(self, action: str, name: object, context: bytes | None = None) -> _Audited:
        """One audit record for this call; ``name`` is recorded only if it is text."""
        if self._closed:
            raise KeyStateError("this KeyLedger is closed; open the home again")
        return _Audited(self, action, name if isinstance(name, str) else None, context)

    def _key(self, rec: _Audited, name: object) -> Key:
        """Resolve a key name or alias and authorise ``rec.action`` on it (deny by default)."""
        validate_name(name)
        key = self._rt.catalog.get(name)  # type: ignore[arg-type]
        rec.key = key
        self._authorize(rec, rec.action, key)
        return key

    def _record_filter(self, rec: _Audited, name: str | None) -> None:
        """A key name used as a filter is recorded as the key it names, or (naming no key: it
        may be a secret searched for) as its hash, like a refused name."""
        if name is None or name == WILDCARD:
            return
        try:
            rec.key = self._rt.catalog.get(name)
        except KeyNotFound:
            rec.name = name_digest(name)

    def _authorize(self, rec: _Audited, action: str, key: Key | None, *,
                   any_scope: bool = False) -> None:
        grants = self._rt.catalog.grants_now()
        if any_scope and any(p == self.principal and Role.ADMIN in r
                             for (_, p), r in grants.items()):
            return
        check(grants, self.principal, action, key.key_id if key else None,
              key.name if key else None)

    @staticmethod
    def _bytes(value: object, what: str) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if isinstance(value, str):
            raise InvalidInput(f"{what} must be bytes; encode text first, e.g. s.encode()")
        raise InvalidInput(f"{what} must be bytes, not {type(value).__name__}")

    @staticmethod
    def _reason(value: object) -> str:
        """A reason is text; checked before anything changes (it is written last)."""
        if not isinstance(value, str):
            raise InvalidInput(f"reason must be text, not {type(value).__name__}")
        return value

    @staticmethod
    def _require_purpose(key: Key, *purposes: Purpose) -> None:
        if key.purpose not in purposes:
            want = " or ".join(p.value for p in purposes)
            raise PolicyViolation(
                f"key {key.name!r} is a {key.purpose.value} key ({key.spec.name}); "
                f"this operation needs a {want} key"
            )

    # -- lifecycle -------------------------------------------------------------------------------
    def create_key(self, name: str, *, spec: str, purpose: str | None = None,
                   owner: str | None = None, tags: Mapping[str, str] | None = None,
                   rotation_period: timedelta | str | None = None,
                   exportable: bool = False, activate: bool = True) -> Key:
        """Generate version 1 in the HSM (sensitive; non-extractable unless ``exportable``)."""
        with self._audited("create_key", name) as rec:
            validate_name(name)
            self._authorize(rec, "create_key", None)
            kspec = parse_spec(spec)
            kpurpose = parse_purpose(purpose, kspec)
            if owner is not None:
                validate_name(owner, "owner")
            tag_json = self._tags_json(tags)
            period = parse_period(rotation_period)  # None: inherit (tag, home, default)
            validate_bool(exportable, "exportable")
            validate_bool(activate, "activate")
            now = naive(self._now())
            key_id, handle = str(uuid.uuid4()), uuid.uuid4().bytes
            state = KeyState.ACTIVE if activate else KeyState.PRE_ACTIVATION
            creator_is_user = self._rt.creator_is_user
            # 1. intent, so a crash after step 2 is rolled back (intents are not in catalog.json:
            # no snapshot export)
            with self._rt.db.write(export=False) as tx:
                if tx.execute("SELECT 1 FROM keys WHERE name = ? UNION SELECT 1 FROM aliases "
                              "WHERE alias = ?", [name, name]).fetchone():
                    raise KeyExists(f"a key or alias named {name!r} already exists")
                intent = self._intent(tx, "create", key_id, name, 1, [handle], now)
            try:
                _fault("create:after_intent")
                self._rt.backend.generate(kspec, handle, f"kl:{name}:v1", exportable=exportable)
                _fault("create:after_hsm")
                self._rt.usage.create(key_id, 1)
                with self._rt.db.write() as tx:  # 3. catalog rows + drop the intent, atomically
                    self._done(tx, intent)
                    self._catalog_new_key(
                        tx, key_id=key_id, name=name, spec=kspec, purpose=kpurpose, state=state,
                        owner=owner, now=now, period=period, exportable=exportable,
                        tag_json=tag_json, policy={}, handle=handle, action="create",
                        reason="created", creator_is_user=creator_is_user)
                    key = cat.load_key(tx, name)
            finally:
                self._rt.in_flight.discard(intent)
            self._rt.catalog.refresh(force=True)
            rec.key, rec.version = key, 1
            return key

    def get_key(self, name: str) -> Key:
        """The key's current metadata: a copy, so changing it changes nothing else."""
        with self._audited("get_key", name) as rec:
            return copy.deepcopy(self._key(rec, name))

    def list_keys(self) -> pd.DataFrame:
        """One row per key: name, spec, purpose, state, latest_version, owner, created_at, ..."""
        with self._audited("list_keys", None) as rec:
            self._rt.catalog.refresh(force=True)
            grants = self._rt.catalog.grants
            visible = [k for k in self._rt.catalog.all_keys()
                       if roles_of(grants, self.principal, k.key_id)]
            if not visible and not roles_of(grants, self.principal, None):
                self._authorize(rec, "list_keys", None)
            rows = [{
                "name": k.name, "spec": k.spec.name, "purpose": k.purpose.value,
                "state": k.state.value, "latest_version": k.latest_version, "owner": k.owner,
                "created_at": k.created_at, "rotated_at": k.rotated_at,
                "next_rotation_due": k.next_rotation_due,
                "min_decryption_version": k.min_decryption_version,
                "deletion_due": k.deletion_due, "aliases": list(k.aliases), "tags": dict(k.tags),
                "exportable": k.exportable, "key_id": k.key_id,
            } for k in sorted(visible, key=lambda k: k.name)]
            columns = ["name", "spec", "purpose", "state", "latest_version", "owner",
                       "created_at", "rotated_at", "next_rotation_due", "min_decryption_version",
                       "deletion_due", "aliases", "tags", "exportable", "key_id"]
            df = normalize(pd.DataFrame(rows, columns=columns),
                           times=("created_at", "rotated_at", "next_rotation_due",
                                  "deletion_due"), categories={"state": KEY_STATES})
            if self.simulation:  # the times above may come from a simulated clock
                df.attrs["note"] = SIMULATION_LABEL
            return df

    def rotate(self, name: str, *, reason: str = "rotation") -> Key:
        """Add a new version; older versions keep decrypting and verifying."""
        return self._rotate(name, reason)

    def _rotate(self, name: str, reason: str, expect_version: int | None = None, *,
                automatic: bool = False) -> Key:
        """Rotate; with ``expect_version``, only if nobody rotated since (due work runs once).

        Rotations of one key are serialised across processes and threads (the key's lock):
        a second caller waits for the first to finish, then rotates on top of its version.
        ``automatic``: the key's policy asks for it (a usage limit was reached during a call),
        so the caller needs no right to rotate; the audit record says so.
        """
        with self._audited("rotate", name) as rec, contextlib.ExitStack() as held:
            if automatic:
                key = rec.key = self._rt.catalog.get(name)
                rec.detail = f"automatic: {reason}"
            else:
                key = self._key(rec, name)
                self._reason(reason)
            held.enter_context(self._rt.key_lock(key.key_id, key.name,
                                                 2 * self._rt.settings.store_busy_timeout_s))
            now = naive(self._now())
            handle = uuid.uuid4().bytes
            with self._rt.db.write(export=False) as tx:
                key = cat.load_key(tx, key.name)
                rec.key = key
                if expect_version is not None and key.latest_version != expect_version:
                    raise KeyStateError(f"{key.name!r} was already rotated to "
                                        f"v{key.latest_version} by another process")
                next_state("rotate", key.state, key.name)
                version = key.latest_version + 1
                intent = self._intent(tx, "rotate", key.key_id, key.name, version, [handle],
                                      now)
            try:
                _fault("rotate:after_intent")
                self._rt.backend.generate(key.spec, handle, f"kl:{key.name}:v{version}",
                                          exportable=key.exportable)
                _fault("rotate:after_hsm")
                self._rt.usage.create(key.key_id, version)
                with self._rt.db.write() as tx:
                    fresh = cat.load_key(tx, key.name)
                    if fresh.latest_version != key.latest_version or fresh.state != key.state:
                        # a state change by another call meanwhile (rotations wait for each other)
                        self._rt.backend.destroy(handle)
                        tx.execute("DELETE FROM intents WHERE intent_id = ?", [intent])
                        raise KeyStateError(
                            f"key {key.name!r} became {fresh.state.value} during the rotation; "
                            "nothing changed: check its state and retry")
                    self._done(tx, intent)
                    old_state = "compromised" if key.state is KeyState.COMPROMISED else "retired"
                    tx.execute("UPDATE versions SET state = ? WHERE key_id = ? AND version = ? "
                               "AND state = 'active'", [old_state, key.key_id, key.latest_version])
                    tx.execute("INSERT INTO versions VALUES (?, ?, ?, 'active', ?, NULL)",
                               [key.key_id, version, handle.hex(), now])
                    tx.execute("UPDATE keys SET latest_version = ?, rotated_at = ?, state = ? "
                               "WHERE key_id = ?",
                               [version, now, KeyState.ACTIVE.value, key.key_id])
                    self._transition(tx, now, key.key_id, version, "rotate", key.state,
                                     KeyState.ACTIVE, reason)
                    key = cat.load_key(tx, key.name)
            finally:
                self._rt.in_flight.discard(intent)
            self._rt.catalog.refresh(force=True)
            rec.key, rec.version = key, version
            return key

    def enable(self, name: str, *, reason: str = "enabled") -> Key:
        return self._change_state("enable", name, reason)

    def disable(self, name: str, *, reason: str = "disabled") -> Key:
        """Suspend all use of the key until it is enabled again."""
        return self._change_state("disable", name, reason)

    def deactivate(self, name: str, *, reason: str = "deactivated") -> Key:
        """Stop applying protection; existing data stays decryptable and verifiable."""
        return self._change_state("deactivate", name, reason)

    def mark_compromised(self, name: str, reason: str) -> Key:
        """Record a suspected compromise: no more protection; decrypt/verify stay possible."""
        if not isinstance(reason, str) or not reason.strip():
            with self._audited("mark_compromised", name):
                raise InvalidInput("say why the key is considered compromised (reason=...)")
        return self._change_state("mark_compromised", name, reason)

    def schedule_deletion(self, name: str, days: int = 30, *, reason: str = "scheduled") -> Key:
        """Block all use now and allow ``destroy`` after ``days`` (7..30)."""
        with self._audited("schedule_deletion", name) as rec:
            if isinstance(days, bool) or not isinstance(days, int):
                raise InvalidInput("days must be a whole number between 7 and 30")
            if not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
                raise PolicyViolation(
                    f"the deletion waiting period must be {MIN_DELETION_DAYS} to "
                    f"{MAX_DELETION_DAYS} days, not {days}")
            due = naive(self._now()) + timedelta(days=days)
            return self._transition_key(rec, "schedule_deletion", name, reason,
                                        extra={"deletion_due": due})

    def cancel_deletion(self, name: str, *, reason: str = "deletion cancelled") -> Key:
        """Restore the state the key had before deletion was scheduled."""
        with self._audited("cancel_deletion", name) as rec:
            return self._transition_key(rec, "cancel_deletion", name, reason,
                                        extra={"deletion_due": None})

    def destroy(self, name: str, *, reason: str = "destroyed") -> Key:
        """Remove every version's material from the HSM once the waiting period has passed.

        The catalog keeps the key's metadata as ``destroyed``. When the key's quorum is above 1,
        use ``request("destroy", name, reason)`` and have other admins ``approve`` it.
        """
        return self._destroy(name, reason, approved=False)

    def _destroy(self, name: str, reason: str, *, approved: bool) -> Key:
        with self._audited("destroy", name) as rec:
            key = self._key(rec, name)
            self._reason(reason)
            if not approved:
                self._require_quorum(key, "destroy", f"destroy {key.name!r}")
            now = naive(self._now())
            with self._rt.db.write(export=False) as tx:
                key = cat.load_key(tx, key.name)
                rec.key = key
                next_state("destroy", key.state, key.name)
                if key.deletion_due is None or now < naive(key.deletion_due):
                    raise PolicyViolation(
                        f"key {key.name!r} may be destroyed after {key.deletion_due:%Y-%m-%d %H:%M}"
                        " UTC, when its deletion waiting period ends; cancel the deletion to keep it")
                handles = [v.handle for v in key.versions.values() if v.state != "destroyed"]
                intent = self._intent(tx, "destroy", key.key_id, key.name, None, handles, now)
            try:
                _fault("destroy:after_intent")
                for h in handles:  # 2. material goes first; a crash here is completed on open
                    self._rt.backend.destroy(h)
                    _fault("destroy:after_first_object")
                with self._rt.db.write() as tx:
                    tx.execute("UPDATE versions SET state = 'destroyed', destroyed_at = ? "
                               "WHERE key_id = ? AND state <> 'destroyed'", [now, key.key_id])
                    tx.execute("UPDATE keys SET state = 'destroyed', prior_state = NULL "
                               "WHERE key_id = ?", [key.key_id])
                    self._transition(tx, now, key.key_id, None, "destroy", key.state,
                                     KeyState.DESTROYED, reason)
                    tx.execute("DELETE FROM intents WHERE intent_id = ?", [intent])
                    key = cat.load_key(tx, key.name)
            finally:
                self._rt.in_flight.discard(intent)
            self._rt.catalog.refresh(force=True)
            rec.key = key
            return key

    def set_alias(self, name: str, alias: str) -> Key:
        with self._audited("set_alias", name) as rec:
            key = self._key(rec, name)
            validate_name(alias, "alias")
            with self._rt.db.write() as tx:
                if tx.execute("SELECT 1 FROM keys WHERE name = ? UNION SELECT 1 FROM aliases "
                              "WHERE alias = ?", [alias, alias]).fetchone():
                    raise KeyExists(f"a key or alias named {alias!r} already exists")
                tx.execute("INSERT INTO aliases VALUES (?, ?)", [alias, key.key_id])
                key = cat.load_key(tx, key.name)
            self._rt.catalog.refresh(force=True)
            rec.detail = f"alias {alias}"
            return key

    def set_tags(self, name: str, tags: Mapping[str, str]) -> Key:
        with self._audited("set_tags", name) as rec:
            key = self._key(rec, name)
            tag_json = self._tags_json(tags)
            with self._rt.db.write() as tx:
                tx.execute("UPDATE keys SET tags = ? WHERE key_id = ?", [tag_json, key.key_id])
                key = cat.load_key(tx, key.name)
            self._rt.catalog.refresh(force=True)
            return key

    def set_policy(self, name: str, *, rotation_period: timedelta | str | None = None,
                   min_decryption_version: int | None = None,
                   min_encryption_version: int | None = None, owner: str | None = None,
                   quorum: int | None = None, creator_is_user: bool | None = None,
                   usage_limit: int | None = None, auto_rotate: bool | None = None,
                   rotation_by_purpose: Mapping[str, timedelta | str] | None = None,
                   rotation_by_tag: Mapping[str, timedelta | str] | None = None) -> Key | None:
        """Change a key's policy, or with ``name="*"`` the home's.

        Per key: rotation_period, min_decryption_version, min_encryption_version, owner,
        quorum, usage_limit (encryptions per version, 1 to 2**63-1, enforced in each call:
        see docs/rotation.md), auto_rotate (rotate at the limit instead of refusing).
        Home (``"*"``): quorum, creator_is_user, usage_limit, rotation_by_purpose
        (e.g. ``{"encrypt": "30d"}``), rotation_by_tag (e.g. ``{"env=prod": "30d"}``).
        A key's own rotation_period beats a tag rule, which beats the home's purpose rule.

        Weakening changes (longer rotation period, lower minimum versions, lower quorum) need
        ``request("set_policy", name, reason, **changes)`` when the quorum is above 1.
        """
        return self._set_policy(name, approved=False, rotation_period=rotation_period,
                                min_decryption_version=min_decryption_version,
                                min_encryption_version=min_encryption_version, owner=owner,
                                quorum=quorum, creator_is_user=creator_is_user,
                                usage_limit=usage_limit, auto_rotate=auto_rotate,
                                rotation_by_purpose=rotation_by_purpose,
                                rotation_by_tag=rotation_by_tag)

    def _require_quorum(self, key: Key | None, action: str, what: str, args: str = "") -> None:
        needed = self._quorum(key)
        if needed > 1:
            raise PolicyViolation(
                f"{what} needs {needed} distinct admins: run request({action!r}, name, reason"
                f"{args}) and ask {needed - 1} other admin(s) to approve it")

    def _set_policy(self, name: str, *, approved: bool, rotation_period=None,
                    min_decryption_version=None, min_encryption_version=None, owner=None,
                    quorum=None, creator_is_user=None, usage_limit=None, auto_rotate=None,
                    rotation_by_purpose=None, rotation_by_tag=None) -> Key | None:
        with self._audited("set_policy", name) as rec:
            if quorum is not None and (isinstance(quorum, bool) or not isinstance(quorum, int)
                                       or not 1 <= quorum <= 10):
                raise InvalidInput("quorum must be a whole number from 1 to 10")
            if usage_limit is not None and not valid_usage_limit(usage_limit):
                raise InvalidInput(
                    "usage_limit must be a whole number of encryptions from 1 to 2**63-1 "
                    f"(not {usage_limit!r}); AES-GCM's bound with random nonces is 2**32")
            if name == WILDCARD:
                return self._set_home_policy(rec, approved, quorum, creator_is_user,
                                             usage_limit, rotation_by_purpose, rotation_by_tag)
            key = self._key(rec, name)
            updates: dict[str, object] = {}
            weakens = []
            if rotation_period is not None:
                updates["rotation_period_s"] = int(parse_period(rotation_period).total_seconds())
                if key.rotation_period and updates["rotation_period_s"] > \
                        key.rotation_period.total_seconds():
                    weakens.append("a longer rotation period")
            for col, value in (("min_decryption_version", min_decryption_version),
                               ("min_encryption_version", min_encryption_version)):
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InvalidInput(f"{col} must be a positive whole number")
                if value > key.latest_version:
                    raise PolicyViolation(
                        f"{col} {value} is above the latest version {key.latest_version} of "
                        f"{key.name!r}; rotate first")
                updates[col] = value
                if value < getattr(key, col):
                    weakens.append(f"a lower {col}")
            if owner is not None:
                updates["owner"] = validate_name(owner, "owner")
            policy = dict(key.policy)
            if usage_limit is not None:
                if usage_limit > key_usage_limit(key.policy, self._rt.home_policy()):
                    weakens.append("a higher usage limit")
                policy["usage_limit"] = usage_limit
                updates["policy"] = json.dumps(policy, sort_keys=True)
            if auto_rotate is not None:
                if not validate_bool(auto_rotate, "auto_rotate"):
                    weakens.append("no automatic rotation")
                policy["auto_rotate"] = auto_rotate
                updates["policy"] = json.dumps(policy, sort_keys=True)
            if quorum is not None:
                if quorum < self._quorum(key):
                    weakens.append("a lower quorum")
                policy["quorum"] = quorum
                updates["policy"] = json.dumps(policy, sort_keys=True)
            if not updates:
                raise InvalidInput("nothing to change: pass rotation_period, "
                                   "min_decryption_version, min_encryption_version, owner or quorum")
            if weakens and not approved:
                self._require_quorum(key, "set_policy",
                                     f"weakening the policy of {key.name!r} ({', '.join(weakens)})")
            with self._rt.db.write() as tx:
                sets = ", ".join(f"{c} = ?" for c in updates)
                tx.execute(f"UPDATE keys SET {sets} WHERE key_id = ?",
                           [*updates.values(), key.key_id])
                key = cat.load_key(tx, key.name)
            self._rt.catalog.refresh(force=True)
            rec.detail = ", ".join(f"{k}={v}" for k, v in updates.items())
            return key

    def _set_home_policy(self, rec: _Audited, approved: bool, quorum: int | None,
                         creator_is_user: bool | None, usage_limit: int | None,
                         by_purpose: Mapping | None, by_tag: Mapping | None) -> None:
        self._authorize(rec, "set_policy", None)
        policy = dict(self._rt.home_policy())
        before = dict(policy)
        if usage_limit is not None:
            policy["usage_limit"] = usage_limit
        if by_purpose is not None:
            if not isinstance(by_purpose, Mapping):
                raise InvalidInput("rotation_by_purpose must map purposes to periods")
            for purpose in by_purpose:
                if purpose not in {p.value for p in Purpose}:
                    raise InvalidInput(f"unknown purpose {purpose!r} in rotation_by_purpose")
            policy["rotation_by_purpose"] = {
                p: int(parse_period(v).total_seconds()) for p, v in by_purpose.items()}
        if by_tag is not None:
            if not isinstance(by_tag, Mapping) or not all(
                    isinstance(t, str) and "=" in t for t in by_tag):
                raise InvalidInput("rotation_by_tag must map 'tag=value' to periods, "
                                   "e.g. {'env=prod': '30d'}")
            policy["rotation_by_tag"] = {
                t: int(parse_period(v).total_seconds()) for t, v in by_tag.items()}
        weakens = _home_weakenings(before, policy)
        if weakens and not approved:
            self._require_quorum(None, "set_policy",
                                 f"weakening the home's policy ({', '.join(weakens)})")
        if quorum is not None:
            if quorum < policy.get("quorum", 1) and not approved:
                self._require_quorum(None, "set_policy", "lowering the home's quorum")
            policy["quorum"] = quorum
        if creator_is_user is not None:
            policy["creator_is_user"] = validate_bool(creator_is_user, "creator_is_user")
        with self._rt.db.write() as tx:
            tx.execute("INSERT INTO meta VALUES ('home_policy', ?) ON CONFLICT DO UPDATE "
                       "SET value = excluded.value", [json.dumps(policy, sort_keys=True)])
        self._rt.catalog.refresh(force=True)
        rec.detail = f"home policy {policy}"
        return None

    def _quorum(self, key: Key | None) -> int:
        q = key.policy.get("quorum") if key is not None else None
        return int(q) if q else self._rt.home_quorum()

    def _change_state(self, action: str, name: str, reason: str) -> Key:
        with self._audited(action, name) as rec:
            return self._transition_key(rec, action, name, reason)

    def _transition_key(self, rec: _Audited, action: str, name: str, reason: str,
                        extra: dict[str, object] | None = None) -> Key:
        key = self._key(rec, name)
        self._reason(reason)
        now = naive(self._now())
        with self._rt.db.write() as tx:
            key = cat.load_key(tx, key.name)
            rec.key = key
            target = next_state(action, key.state, key.name, key.prior_state)
            prior = key.state.value if action == "schedule_deletion" else None
            sets = {"state": target.value, "prior_state": prior, **(extra or {})}
            if action == "mark_compromised":
                tx.execute("UPDATE versions SET state = 'compromised' WHERE key_id = ? "
                           "AND state <> 'destroyed'", [key.key_id])
            tx.execute(f"UPDATE keys SET {', '.join(f'{c} = ?' for c in sets)} WHERE key_id = ?",
                       [*sets.values(), key.key_id])
            self._transition(tx, now, key.key_id, None, action, key.state, target, reason)
            key = cat.load_key(tx, key.name)
        self._rt.catalog.refresh(force=True)
        rec.key = key
        return key

    def _transition(self, tx, now, key_id, version, action, from_state, to_state, reason) -> None:
        tx.execute("INSERT INTO transitions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [now, key_id, version, action,
                    from_state.value if from_state is not None else None, to_state.value,
                    self.principal, reason])

    def _catalog_new_key(self, tx, *, key_id: str, name: str, spec, purpose: Purpose,
                         state: KeyState, owner: str | None, now: datetime,
                         period: timedelta | None, exportable: bool, tag_json: str,
                         policy: dict, handle: bytes, action: str, reason: str,
                         creator_is_user: bool) -> None:
        """Catalog rows of a new key's version 1 (created or imported), in the caller's tx."""
        tx.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, 1, 1, 1, NULL, "
                   "?, ?)",
                   [key_id, name, spec.name, purpose.value, state.value, owner, now, now,
                    int(period.total_seconds()) if period else None, exportable, tag_json,
                    json.dumps(policy, sort_keys=True)])
        tx.execute("INSERT INTO versions VALUES (?, 1, ?, 'active', ?, NULL)",
                   [key_id, handle.hex(), now])
        self._transition(tx, now, key_id, 1, action, None, state, reason)
        if creator_is_user:  # one person can work alone; the separation-of-duties rule reports it
            tx.execute("INSERT INTO grants VALUES (?, ?, 'user', ?, ?) ON CONFLICT DO NOTHING",
                       [key_id, self.principal, self.principal, now])

    def _intent(self, tx, kind: str, key_id: str, name: str, version: int | None,
                handles: list[bytes], now: datetime) -> str:
        """Record what is about to change in the HSM; in flight until ``_done`` drops it."""
        intent_id = str(uuid.uuid4())
        tx.execute("INSERT INTO intents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [intent_id, kind, key_id, version,
                    json.dumps({"name": name, "handles": [h.hex() for h in handles]}), now,
                    os.getpid(), self.principal])
        self._rt.in_flight.add(intent_id)  # an open() elsewhere in this process leaves it alone
        return intent_id

    def _done(self, tx, intent_id: str) -> None:
        """Drop the intent with the catalog change; fail if a reconcile took it over."""
        if not tx.execute("DELETE FROM intents WHERE intent_id = ? RETURNING intent_id",
                          [intent_id]).fetchall():
            raise KeyStateError("the operation was rolled back by a concurrent reconcile; retry")

    @staticmethod
    def _tags_json(tags: object) -> str:
        if tags is None:
            return "{}"
        if not isinstance(tags, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise InvalidInput("tags must be a mapping of strings to strings, e.g. {'team': 'pay'}")
        return json.dumps(dict(tags), sort_keys=True)

    # -- crypto ----------------------------------------------------------------------------------
    def encrypt(self, name: str, plaintext: bytes, *,
                context: Mapping[str, str] | None = None) -> bytes:
        """AES-GCM in the HSM; returns a self-describing ciphertext (see docs/ciphertext.md)."""
        with self._audited("encrypt", name) as rec:
            ctx = rec.context = ct.canonical_context(context)
            data = self._bytes(plaintext, "plaintext")
            key = self._key(rec, name)
            return self._encrypt_with(rec, key, data, ctx)

    def _encrypt_with(self, rec: _Audited, key: Key, data: bytes, ctx: bytes) -> bytes:
        self._require_purpose(key, Purpose.ENCRYPT, Purpose.WRAP)
        check_use(key.state, Use.PROTECT, key.name)
        key, version = self._spend_use(rec, key)
        nonce = os.urandom(ct.NONCE_LEN)
        header = ct.pack_header(key.key_id_bytes, version.version, nonce)
        body = self._rt.backend.encrypt_gcm(version.handle, nonce, header + ctx, data)
        return header + body

    def _spend_use(self, rec: _Audited, key: Key) -> tuple[Key, KeyVersion]:
        """The version to encrypt with, after spending one of its uses (``usage_limit``)."""
        version = key.version_for_protect()
        rec.version = version.version
        if self._rt.usage.take(key.key_id, version.version, self._rt.catalog.usage_limit(key),
                               self._recorded_encryptions):
            return key, version
        return self._at_usage_limit(rec, key)

    def _at_usage_limit(self, rec: _Audited, key: Key) -> tuple[Key, KeyVersion]:
        """The latest version has no use left: rotate if the key's policy says so
        (``auto_rotate``, the default) and go on with the new version, else refuse."""
        for _ in range(_AUTO_ROTATIONS_PER_CALL):
            version = key.version_for_protect()
            rec.version = version.version
            limit = self._rt.catalog.usage_limit(key)
            if self._rt.usage.take(key.key_id, version.version, limit,
                                   self._recorded_encryptions):
                return key, version
            if not key.policy.get("auto_rotate", True):
                raise PolicyViolation(
                    f"key {key.name!r} v{version.version} reached its usage limit of {limit:,} "
                    f"encryptions and auto_rotate is off: rotate it (`keyledger key rotate "
                    f"{key.name}`) or raise usage_limit with set_policy")
            key = rec.key = self._rotate_at_limit(key, version.version, limit)
        raise PolicyViolation(
            f"key {key.name!r} reached its usage limit of {limit:,} encryptions again right "
            f"after {_AUTO_ROTATIONS_PER_CALL} automatic rotations; raise usage_limit")

    def _rotate_at_limit(self, key: Key, version: int, limit: int) -> Key:
        """Rotate a key whose latest version used up its limit, once across processes (a
        process that finds it rotated meanwhile goes on with the new version)."""
        self._rt.catalog.refresh(force=True)
        fresh = self._rt.catalog.get_id(key.key_id)
        failure = None
        if fresh is not None and fresh.latest_version == version:
            try:
                self._rotate(key.name, f"v{version} reached its usage limit of {limit:,} "
                             "encryptions", expect_version=version, automatic=True)
            except KeyStateError as exc:  # e.g. rotated by another process meanwhile
                failure = exc
            self._rt.catalog.refresh(force=True)
            fresh = self._rt.catalog.get_id(key.key_id)
        if fresh is None or fresh.latest_version == version:
            raise PolicyViolation(
                f"key {key.name!r} v{version} reached its usage limit of {limit:,} encryptions "
                f"and rotating it failed ({failure}); rotate it or raise usage_limit")
        check_use(fresh.state, Use.PROTECT, fresh.name)
        return fresh

    def _recorded_encryptions(self, key_id: str, version: int) -> int:
        """Encryptions the ledger holds for a version: the start of a usage counter that did
        not exist yet (versions made before call-time limits, restored homes)."""
        try:
            self._rt.ingest()
        except KeyLedgerError:  # busy or tampered: count what is in the store already
            pass
        marks = ", ".join("?" for _ in PROTECT_ACTIONS)
        with self._rt.db.read() as tx:
            row = tx.execute(f"SELECT coalesce(sum(count), 0) FROM usage WHERE key_id = ? AND "
                             f"version = ? AND action IN ({marks})",
                             [key_id, version, *PROTECT_ACTIONS]).fetchone()
        return int(row[0])

    def decrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt any keyledger ciphertext; the key and version come from its header."""
        with self._audited("decrypt", None) as rec:
            ctx = rec.context = ct.canonical_context(context)
            return self._decrypt(rec, ciphertext, ctx)

    def _decrypt(self, rec: _Audited, ciphertext: object, ctx: bytes) -> bytes:
        try:
            header, header_bytes, body = ct.parse(ciphertext)
        except InvalidCiphertext:
            rec.detail = "malformed ciphertext"
            raise
        key = self._rt.catalog.get_id(header.key_id)
        if key is None:
            rec.detail = f"unknown key id {header.key_id}"
            raise InvalidCiphertext("the ciphertext cannot be decrypted with any key here")
        rec.key = key
        self._authorize(rec, rec.action, key)
        if key.purpose not in (Purpose.ENCRYPT, Purpose.WRAP):  # a forged header
            rec.detail = f"the header names a {key.purpose.value} key, which encrypts nothing"
            raise InvalidCiphertext("the ciphertext cannot be decrypted with any key here")
        if header.version not in key.versions:
            rec.detail = f"unknown version {header.version}"
            raise InvalidCiphertext("the ciphertext cannot be decrypted with any key here")
        rec.version = header.version
        check_use(key.state, Use.PROCESS, key.name)
        version = key.version_for_decrypt(header.version)
        try:
            return self._rt.backend.decrypt_gcm(version.handle, header.nonce,
                                                header_bytes + ctx, body)
        except DecryptFailed:
            rec.detail = "authentication failed: tampered data or wrong context"
            raise InvalidCiphertext(
                "the ciphertext cannot be decrypted: it was altered or the context differs"
            ) from None

    def rewrap(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Re-encrypt under the key's latest version without exposing plaintext to the caller."""
        with self._audited("rewrap", None) as rec:
            ctx = rec.context = ct.canonical_context(context)
            plaintext = self._decrypt(rec, ciphertext, ctx)
            old = rec.version
            out = self._encrypt_with(rec, rec.key, plaintext, ctx)
            rec.detail = f"from v{old}"
            return out

    def generate_data_key(self, name: str, *,
                          context: Mapping[str, str] | None = None) -> DataKey:
        """A fresh 256-bit data key, and the same key encrypted under ``name`` to store."""
        with self._audited("generate_data_key", name) as rec:
            ctx = rec.context = ct.canonical_context(context)
            key = self._key(rec, name)
            plaintext = AESGCM.generate_key(bit_length=256)
            wrapped = self._encrypt_with(rec, key, plaintext, ctx)
            return DataKey(plaintext, wrapped, key.name, rec.version or 0)

    def envelope_encrypt(self, name: str, data: bytes, *,
                         context: Mapping[str, str] | None = None) -> bytes:
        """Encrypt large data locally under a fresh data key; the wrapped key travels with it."""
        with self._audited("envelope_encrypt", name) as rec:
            ctx = rec.context = ct.canonical_context(context)
            payload = self._bytes(data, "data")
            key = self._key(rec, name)
            dk = AESGCM.generate_key(bit_length=256)
            wrapped = self._encrypt_with(rec, key, dk, ctx)
            nonce = os.urandom(ct.NONCE_LEN)
            body = AESGCM(dk).encrypt(nonce, payload, ct.envelope_header(wrapped) + ctx)
            return ct.pack_envelope(wrapped, nonce, body)

    def envelope_decrypt(self, blob: bytes, *,
                         context: Mapping[str, str] | None = None) -> bytes:
        with self._audited("envelope_decrypt", None) as rec:
            ctx = rec.context = ct.canonical_context(context)
            header, wrapped, nonce, body = ct.parse_envelope(blob)
            dk = self._decrypt(rec, wrapped, ctx)
            try:
                return AESGCM(dk).decrypt(nonce, body, header + ctx)
            except Exception:
                rec.detail = "envelope body authentication failed"
                raise InvalidCiphertext("the envelope cannot be decrypted: it was altered or "
                                        "the context differs") from None

    def sign(self, name: str, message: bytes) -> bytes:
        """RSA-PSS-SHA256, ECDSA (DER) or Ed25519 signature with the latest version."""
        with self._audited("sign", name) as rec:
            data = self._bytes(message, "message")
            key, version = self._for_protect(rec, name, Purpose.SIGN)
            return self._rt.backend.sign(key.spec, version.handle, data)

    def verify(self, name: str, message: bytes, signature: bytes, *,
               version: int | None = None) -> bool:
        """True if any live version (or the given one) of the key made the signature."""
        with self._audited("verify", name) as rec:
            data = self._bytes(message, "message")
            sig = self._bytes(signature, "signature")
            validate_version(version)
            key = self._for_process(rec, name, Purpose.SIGN)
            return self._check_any(rec, key, version,
                                   lambda h: self._rt.backend.verify(key.spec, h, data, sig))

    def mac(self, name: str, message: bytes) -> bytes:
        """HMAC-SHA256 computed in the HSM with the latest version."""
        with self._audited("mac", name) as rec:
            data = self._bytes(message, "message")
            _, version = self._for_protect(rec, name, Purpose.MAC)
            return self._rt.backend.mac(version.handle, data)

    def verify_mac(self, name: str, message: bytes, tag: bytes, *,
                   version: int | None = None) -> bool:
        with self._audited("verify_mac", name) as rec:
            data = self._bytes(message, "message")
            mac = self._bytes(tag, "tag")
            validate_version(version)
            key = self._for_process(rec, name, Purpose.MAC)
            return self._check_any(rec, key, version,
                                   lambda h: self._rt.backend.verify_mac(h, data, mac))

    def _for_protect(self, rec: _Audited, name: object,
                     *purposes: Purpose) -> tuple[Key, KeyVersion]:
        """The key and its latest version, checked for purpose, state and minimum version."""
        key = self._key(rec, name)
        self._require_purpose(key, *purposes)
        check_use(key.state, Use.PROTECT, key.name)
        version = key.version_for_protect()
        rec.version = version.version
        return key, version

    def _for_process(self, rec: _Audited, name: object, *purposes: Purpose) -> Key:
        key = self._key(rec, name)
        self._require_purpose(key, *purposes)
        check_use(key.state, Use.PROCESS, key.name)
        return key

    def _check_any(self, rec: _Audited, key: Key, version: int | None,
                   check: Callable[[bytes], bool]) -> bool:
        if version is not None:
            candidates = [version]
        else:
            candidates = sorted((v for v in key.versions if v >= key.min_decryption_version),
                                reverse=True)
        for v in candidates:
            kv = key.versions.get(v)
            if kv is None or kv.state == "destroyed" or v < key.min_decryption_version:
                continue
            if check(kv.handle):
                rec.version = v
                return True
        rec.detail = "signature did not verify"
        return False

    def public_key_pem(self, name: str, *, version: int | None = None) -> str:
        with self._audited("public_key_pem", name) as rec:
            key = self._key(rec, name)
            validate_version(version)
            if key.spec.family in (Family.AES, Family.HMAC):
                raise PolicyViolation(f"key {key.name!r} is symmetric; it has no public key")
            v = key.versions.get(version or key.latest_version)
            if v is None or v.state == "destroyed":
                raise KeyStateError(f"version {version} of {key.name!r} is destroyed or unknown")
            rec.version = v.version
            der = self._rt.backend.public_key_der(key.spec, v.handle)
            pub = serialization.load_der_public_key(der)
            return pub.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    # -- HSM and home --------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """What the HSM module supports (e.g. SoftHSM 2.6.1 lacks RSA-OAEP-SHA256)."""
        with self._audited("capabilities", None) as rec:
            self._authorize(rec, "capabilities", None)
            return self._rt.backend.capabilities()

    def reconcile(self, *, full: bool = True) -> ReconcileReport:
        """Repair interrupted operations and (``full``) check every version's HSM material."""
        with self._audited("reconcile", None) as rec:
            self._authorize(rec, "reconcile", None)
            report = self._rt.reconcile(self.principal, full=validate_bool(full, "full"),
                                        now=self._now())
            rec.detail = str(report)[:500]
            return report

    def key_attributes(self, name: str, *, version: int | None = None):
        """CKA_SENSITIVE / CKA_EXTRACTABLE of a version as the HSM reports them."""
        with self._audited("key_attributes", name) as rec:
            key = self._key(rec, name)
            v = key.versions.get(validate_version(version) or key.latest_version)
            if v is None or v.state == "destroyed":
                raise KeyStateError(f"version {version} of {key.name!r} is destroyed or unknown; "
                                    f"its versions are 1 to {key.latest_version}")
            rec.version = v.version
            return self._rt.backend.attributes(v.handle)

    # -- audit -----------------------------------------------------------------------------------
    def flush_audit(self) -> int:
        """Move pending journal records of every process into the store now; returns how many."""
        return self._rt.ingest().records

    def audit(self, *, key: str | None = None, principal: str | None = None,
              action: str | None = None, outcome: str | None = None,
              since: datetime | None = None, until: datetime | None = None,
              limit: int | None = AUDIT_LIMIT, offset: int = 0, newest_first: bool = False
              ) -> AuditFrame:
        """The newest ``limit`` (default 1,000) matching audit records, oldest first (so
        ``.tail()`` is the newest), or newest first with ``newest_first=True``: time,
        principal, action, key, version, outcome, error, detail, ... ``offset`` skips that
        many newest records (the next page back); ``limit=None`` returns every match. Only
        the page is read: the query sorts newest first with a LIMIT, never loading the log.

        ``key`` also matches the records of refused calls that name no key, which keep only
        the name's hash (``sha256:...``, docs/audit.md)."""
        with self._audited("audit", key) as rec:
            self._authorize(rec, "audit", None)
            for what, value in (("key", key), ("principal", principal), ("action", action),
                                ("outcome", outcome)):
                if value is not None and not isinstance(value, str):
                    raise InvalidInput(f"{what} must be text, not {type(value).__name__}")
            validate_when(since, "since")
            validate_when(until, "until")
            validate_bool(newest_first, "newest_first")
            if limit is not None:
                _count(limit, "limit")
            _count(offset, "offset")  # all checked before the ingest below does any work
            self._record_filter(rec, key)
            self._rt.ingest()
            where, args = [], []
            if key is not None:
                where.append("key IN (?, ?)")
                args += [key, name_digest(key)]
            for col, value in (("principal", principal), ("action", action),
                               ("outcome", outcome)):
                if value is not None:
                    where.append(f"{col} = ?")
                    args.append(value)
            if since is not None:
                where.append("time >= ?")
                args.append(naive(since))
            if until is not None:
                where.append("time < ?")
                args.append(naive(until))
            # proven: covered by a journal seal made in the HSM (docs/audit.md "Seals")
            select = ("SELECT seq, time, principal, action, key, version, outcome, error, "
                      "detail, context, key_id, pid, journal, jseq, "
                      "jseq <= coalesce(o.seal_jseq, 0) AS proven "
                      "FROM audit_log LEFT JOIN journal_offsets o USING (journal)")
            sql = _audit_page_sql(select, " AND ".join(where) or "TRUE", limit, offset,
                                  newest_first)
            with self._rt.db.read() as tx:
                df = tx.execute(sql, args).df()
            return AuditFrame(normalize(df))

    def query(self, sql: str, params: Sequence[object] | Mapping[str, object] | None = None, *,
              label: str | None = None, timeout_s: float | None = None) -> pd.DataFrame:
        """Run one read-only SQL query over the store and return a DataFrame (admin or auditor).

        Tables: keys, versions, transitions, audit_log, grants, requests, approvals, usage,
        compliance_findings, ... (docs/audit.md). The query runs in a transaction that is always
        rolled back, with file access disabled; the frame follows keyledger's conventions
        (``keyledger.frames``: UTC times, ``string``/``Int64``/``boolean``). ``label`` names the
        query in its audit record (default: its first 200 characters). A query still running
        after ``timeout_s`` (default: ``[store] query_timeout_s`` of keyledger.toml, 10 s) is
        stopped with ``InvalidInput``: while it runs, other processes cannot write the store.
        """
        with self._audited("query", None) as rec:
            self._authorize(rec, "query", None)
            if not isinstance(sql, str) or not sql.strip():
                raise InvalidInput("sql must be a non-empty SQL text")
            if label is not None and not isinstance(label, str):
                raise InvalidInput(f"label must be text, not {type(label).__name__}")
            limit = self._query_timeout(timeout_s)
            rec.detail = (label or " ".join(sql.split()))[:200]
            _check_read_only(sql)
            if params is not None and not isinstance(params, Sequence | Mapping):
                raise InvalidInput("params must be a list of values or a mapping of names to "
                                   f"values, not {type(params).__name__}")
            try:
                self._rt.ingest(for_read=True)
            except AuditError:  # a tampered ledger is still readable (verify_audit reports it)
                pass
            with self._rt.db.snapshot() as tx:
                tx.execute("SET enable_external_access = false")
                try:
                    with _interrupt_after(tx.con, limit) as timer:
                        df = tx.execute(sql, params if params is not None else []).df()
                except duckdb.Error as exc:
                    if timer.fired:
                        raise InvalidInput(
                            f"the query was stopped after {limit:g} s; narrow it (a WHERE on "
                            "time, fewer joins), or allow longer with query(..., timeout_s=...) "
                            "or [store] query_timeout_s in keyledger.toml") from None
                    raise InvalidInput(f"the query failed: {str(exc).splitlines()[0][:300]}"
                                       ) from None
            return normalize(df)

    def _query_timeout(self, timeout_s: object) -> float:
        if timeout_s is None:
            return self._rt.settings.query_timeout_s
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or \
                not 0 < timeout_s <= MAX_QUERY_TIMEOUT_S:
            raise InvalidInput(f"timeout_s must be a number of seconds above 0 and at most "
                               f"{MAX_QUERY_TIMEOUT_S}, not {timeout_s!r}")
        return float(timeout_s)

    def verify_audit(self) -> VerifyReport:
        """Check the chain, the checkpoints, the HSM-held head, the journals and their seals;
        name the first bad record. Not ok while any record is unproven (not accepted)."""
        with self._audited("verify_audit", None) as rec:
            self._authorize(rec, "verify_audit", None)
            try:
                due = self._rt.await_seals()  # seals and ingests first
            except AuditError:  # a ledger that no longer matches its checkpoint: report it
                due = {}
            with self._rt.db.write(export=False) as tx:
                report = verify_ledger(tx, self._rt.verify_checkpoint, self._rt.audit_head(tx),
                                       self._rt.journal_check(due))
                tx.execute("INSERT INTO verifications VALUES (?, ?, ?, ?, ?)",
                           [naive(self._now()), report.ok, report.records,
                            (report.first_bad or {}).get("seq"),
                            "; ".join(report.problems)[:1000] or None])
            rec.detail = "ok" if report.ok else "; ".join(report.problems)[:500]
            return report

    def accept_unproven(self, journal: str, through_jseq: int, reason: str) -> None:
        """Accept, after investigating, the unproven records of ``journal`` up to
        ``through_jseq`` (see ``verify_audit()``): verification then lists them as accepted
        instead of failing. Needs the admin role; the acceptance is itself an audit record."""
        with self._audited(ACCEPT_ACTION, None) as rec:
            self._authorize(rec, ACCEPT_ACTION, None)
            if not isinstance(reason, str) or not reason.strip():
                raise InvalidInput("say what the investigation found (reason=...); auditors "
                                   "read it")
            if not isinstance(journal, str) or type(through_jseq) is not int:
                raise InvalidInput("journal must be a journal name and through_jseq an int, "
                                   "as verify_audit() names them")
            self._rt.ingest()
            with self._rt.db.read() as tx:
                row = tx.execute("SELECT coalesce(seal_jseq, 0), tip_jseq FROM journal_offsets "
                                 "WHERE journal = ?", [journal]).fetchone()
            if row is None or not row[0] < through_jseq <= row[1]:
                have = (f"its unproven records are {row[0] + 1}-{row[1]}" if row and row[0] <
                        row[1] else "it has no unproven records")
                raise InvalidInput(f"journal {journal!r}: cannot accept records through "
                                   f"{through_jseq}; {have if row else 'no such journal'}")
            rec.detail = accept_detail(journal, through_jseq, " ".join(reason.split()))[:500]

    def export_audit(self, path: str | os.PathLike, format: str = "parquet", *,
                     overwrite: bool = False) -> Path:
        """JSONL file, or Parquet partitioned by day (Hive layout: day=YYYY-MM-DD/).

        ``path`` must lie outside the home and not exist yet (``overwrite=True`` replaces a
        file, or a folder holding a previous Parquet export); see ``keyledger.outputs``.
        """
        with self._audited("export_audit", None) as rec:
            if not isinstance(path, str | os.PathLike):
                raise InvalidInput(f"path must be a file path, not {type(path).__name__}")
            self._authorize(rec, "export_audit", None)
            if format not in ("parquet", "jsonl"):
                raise InvalidInput("format must be 'parquet' or 'jsonl'")
            out = outputs.check_target(path, outputs.protected_paths(self._rt.settings),
                                       overwrite=overwrite, folder=format == "parquet",
                                       replaceable=_is_parquet_export, what="audit export")
            self._rt.ingest()
            query = ("SELECT seq, time, principal, action, key, key_id, version, outcome, error, "
                     "detail, context, pid, journal, jseq, prev, hash, "
                     "strftime(time, '%Y-%m-%d') AS day FROM audit_log ORDER BY seq")
            # DuckDB's COPY writes the files itself: into a fresh private folder next to the
            # target, renamed into place afterwards (a failure leaves nothing behind).
            if format == "jsonl":
                with outputs.staged_file(out, overwrite=overwrite) as tmp, \
                        self._rt.db.read() as tx:
                    tx.execute(f"COPY ({query}) TO '{_sql_path(tmp)}' (FORMAT json)")
            else:
                with outputs.atomic_folder(out, overwrite=overwrite) as tmp, \
                        self._rt.db.read() as tx:
                    tx.execute(f"COPY ({query}) TO '{_sql_path(tmp)}' "
                               "(FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE true)")
            rec.detail = f"{format} to {out}"
            return out


def _home_weakenings(old: dict, new: dict) -> list[str]:
    """What a change of the home's rotation rules or usage limit makes weaker."""
    out = []
    if key_usage_limit({}, new) > key_usage_limit({}, old):
        out.append("a higher usage limit")
    defaults = {p.value: default_rotation_period(None, p).total_seconds() for p in Purpose}
    old_p, new_p = old.get("rotation_by_purpose", {}), new.get("rotation_by_purpose", {})
    if any(new_p.get(p, d) > old_p.get(p, d) for p, d in defaults.items()):
        out.append("a longer rotation period by purpose")
    old_t, new_t = old.get("rotation_by_tag", {}), new.get("rotation_by_tag", {})
    if any(t not in new_t or new_t[t] > secs for t, secs in old_t.items()):
        out.append("a longer or removed rotation rule by tag")
    return out


def _audit_page_sql(select: str, cond: str, limit: int | None, offset: int,
                    newest_first: bool) -> str:
    """``select`` of the records matching ``cond``: the newest ``limit`` after skipping
    ``offset``, picked by ``seq`` alone in a top-N subquery (so DuckDB reads the wide columns
    of the page only: 5x faster than sorting whole rows), newest or oldest first."""
    if limit is not None or offset:
        page = f"SELECT seq FROM audit_log WHERE {cond} ORDER BY time DESC, seq DESC"
        if limit is not None:
            page += f" LIMIT {_count(limit, 'limit')}"
        if offset:
            page += f" OFFSET {_count(offset, 'offset')}"
        cond = f"seq IN ({page})"
    order = " DESC" if newest_first else ""
    return f"{select} WHERE {cond} ORDER BY time{order}, seq{order}"


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidInput(f"{what} must be a whole number >= 0, not {value!r}"[:200])
    return value


class _Timer:
    fired = False


@contextlib.contextmanager
def _interrupt_after(con: duckdb.DuckDBPyConnection, seconds: float) -> Iterator[_Timer]:
    """Interrupt ``con``'s running statement once ``seconds`` have passed (then ``fired``)."""
    state = _Timer()

    def fire() -> None:
        state.fired = True
        con.interrupt()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield state
    finally:
        timer.cancel()


def _check_read_only(sql: str) -> None:
    """Accept exactly one SELECT-like statement (SELECT, FROM, WITH, DESCRIBE, SUMMARIZE)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise InvalidInput(f"the query does not parse: {str(exc).splitlines()[0][:300]}"
                           ) from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements) or "nothing"
        raise InvalidInput(f"query() runs one read-only SELECT statement; this is {kinds}")


def _sql_path(path: Path) -> str:
    return str(path.absolute()).replace("'", "''")


def _is_parquet_export(folder: Path) -> bool:
    """Whether ``folder`` holds only an earlier Parquet export (day=.../*.parquet)."""
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_dir() or not entry.name.startswith("day="):
            return False
        if not all(f.is_file() and not f.is_symlink() and f.suffix == ".parquet"
                   for f in entry.iterdir()):
            return False
    return True


def open(home: str | os.PathLike | None = None, *, principal: str | None = None,
         clock: Callable[[], datetime] | None = None) -> KeyLedger:
    """Open (and on first use provision) a keyledger home.

    ``home`` defaults to ``$KEYLEDGER_HOME`` or ``./.keyledger``; ``principal`` to the OS user.
    ``clock``: leave it out for real use (trusted time, the system clock). Passing one when the
    home is created makes it a simulation home, labelled as such everywhere; an existing real
    home refuses a clock (``ConfigError``).
    """
    if home is not None and not isinstance(home, str | os.PathLike):
        raise InvalidInput(f"home must be a folder path, not {type(home).__name__}")
    if clock is not None and not callable(clock):
        raise InvalidInput("clock must be a function returning a timezone-aware datetime")
    path = Path(home).expanduser().absolute() if home is not None else default_home()
    who = principal if principal is not None else getpass.getuser()
    validate_name(who, "principal")
    return KeyLedger(path, principal=who, clock=clock)
