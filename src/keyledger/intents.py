"""One protocol for an HSM change the catalog must follow: intent -> HSM step -> commit.

    with HsmChange(rt, "rotate", principal) as change:
        with rt.db.write(export=False) as tx:      # checks, then the intent row
            change.write(tx, key_id=..., name=..., version=..., handles=[handle], now=now)
        change.step(lambda: rt.backend.generate(...))   # or change.each(handles, destroy)
        with change.commit() as tx:                # catalog rows + intent cleared, one commit
            ...

A crash anywhere in between leaves the intent row; ``reconcile`` (every open) then rolls the
change back or forward by its kind (``RECOVERY``), finding objects by CKA_ID. An error in the
process itself undoes a change that rolls back at once; a change that rolls forward is left
for the next reconcile to complete. Fault points (``KEYLEDGER_FAULT=<kind>:<step>``) sit
between the steps, so the SIGKILL tests reach every step of every kind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, TypeVar

from .errors import KeyLedgerError, KeyStateError
from .model import KeyState
from .store import imports, keys
from .store import intents as repo
from .store.db import Database, Tx
from .store.intents import IntentRow

if TYPE_CHECKING:
    from .hsm.backend import HsmBackend

T = TypeVar("T")
FAULT_ENV = "KEYLEDGER_FAULT"
# the steps between which a process may die: after the intent commits, after the first of
# several HSM objects, after the whole HSM step (the catalog commit is the end)
STEPS = ("after_intent", "after_first_object", "after_hsm")


def fault(point: str) -> None:
    """Crash-test hook: ``KEYLEDGER_FAULT=create:after_hsm`` SIGKILLs the process right there."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _fault(point: str) -> None:
    fault(point)  # looked up at call time, so a test may replace ``intents.fault``


# -- what reconcile does with an intent left behind ------------------------------------------------
Finish = Callable[[Tx, IntentRow, "HsmBackend", str, datetime], str]


@dataclass(frozen=True)
class Recovery:
    """How an interrupted change of one kind is repaired: ``forward`` completes it (the HSM
    change cannot be undone), otherwise it is rolled back. ``finish`` returns the report line."""

    forward: bool
    finish: Finish


class Refused(Exception):
    """An intent the catalog contradicts (the store was changed outside keyledger): it is
    dropped without touching the HSM, and reported as a problem."""


def _remove_new_objects(tx: Tx, backend: HsmBackend, intent: IntentRow) -> str:
    """Remove the objects the change made; never one a catalog version uses (an intent
    written into the store by someone else must not destroy live material)."""
    used = keys.handles_in_use(tx, intent.handles)
    removed = sum(backend.destroy(h) for h in intent.handles if h not in used)
    return (f" (removed {removed} orphan HSM object(s))" if removed else "") + \
        (f" (kept {len(used)} object(s) the catalog uses)" if used else "")


def _undo_create(tx: Tx, intent: IntentRow, backend: HsmBackend, actor: str,
                 now: datetime) -> str:
    return f"rolled back interrupted key creation of {intent.name!r}" + \
        _remove_new_objects(tx, backend, intent)


def _undo_rotate(tx: Tx, intent: IntentRow, backend: HsmBackend, actor: str,
                 now: datetime) -> str:
    return f"rolled back interrupted rotation to v{intent.version} of {intent.name!r}" + \
        _remove_new_objects(tx, backend, intent)


def _undo_import(tx: Tx, intent: IntentRow, backend: HsmBackend, actor: str,
                 now: datetime) -> str:
    imports.release(tx, intent.key_id)  # nothing was imported: the token may be used again
    return f"rolled back interrupted import of {intent.name!r}" + \
        _remove_new_objects(tx, backend, intent)


def _own_handles(tx: Tx, intent: IntentRow, below: int | None = None) -> list[bytes]:
    """The intent's objects that are versions of its key (below ``below``); any other
    handle in it means the intent was not written by keyledger."""
    own = set(keys.version_handles(tx, intent.key_id, below=below))
    if not set(intent.handles) <= own:
        raise Refused(f"ignored an intent to destroy HSM objects of {intent.name!r} that are "
                      "not its versions: the store was changed outside keyledger")
    return list(intent.handles)


def _finish_destroy(tx: Tx, intent: IntentRow, backend: HsmBackend, actor: str,
                    now: datetime) -> str:
    if keys.state_of(tx, intent.key_id) != KeyState.PENDING_DELETION.value:
        raise Refused(f"ignored an intent to destroy {intent.name!r}, which is not pending "
                      "deletion: the store was changed outside keyledger")
    for h in _own_handles(tx, intent):
        backend.destroy(h)
    keys.destroy_versions(tx, intent.key_id, now)
    prior = keys.state_of(tx, intent.key_id)
    keys.update(tx, intent.key_id, {"state": KeyState.DESTROYED.value, "prior_state": None})
    keys.add_transition(tx, now=now, key_id=intent.key_id, version=None, action="destroy",
                        from_state=prior, to_state=KeyState.DESTROYED.value, actor=actor,
                        reason="completed an interrupted destroy on open")
    return f"completed interrupted destruction of {intent.name!r}"


def _finish_trim(tx: Tx, intent: IntentRow, backend: HsmBackend, actor: str,
                 now: datetime) -> str:
    # the minimum versions were raised with the intent, so the versions are already unusable
    if keys.min_decryption_version(tx, intent.key_id) < (intent.version or 0):
        raise Refused(f"ignored an intent to trim {intent.name!r} below v{intent.version}, "
                      "above its minimum decryption version: the store was changed outside "
                      "keyledger")
    for h in _own_handles(tx, intent, below=intent.version):
        backend.destroy(h)
    keys.destroy_versions(tx, intent.key_id, now, below=intent.version)
    return f"completed interrupted trim of {intent.name!r}"


RECOVERY: dict[str, Recovery] = {
    "create": Recovery(forward=False, finish=_undo_create),
    "rotate": Recovery(forward=False, finish=_undo_rotate),
    "import": Recovery(forward=False, finish=_undo_import),
    "destroy": Recovery(forward=True, finish=_finish_destroy),
    "trim": Recovery(forward=True, finish=_finish_trim),
}
KINDS = tuple(RECOVERY)


def recover(tx: Tx, intent: IntentRow, backend: HsmBackend, actor: str,
            now: datetime) -> tuple[bool, str]:
    """Repair one interrupted change (its owner is gone) and drop its intent. Returns
    (repaired, what was done) or (False, why it was refused)."""
    try:
        recovery = RECOVERY.get(intent.kind)
        if recovery is None:
            raise Refused(f"ignored an intent of unknown kind {intent.kind!r} for "
                          f"{intent.name!r}")
        line, ok = recovery.finish(tx, intent, backend, actor, now), True
    except Refused as refused:
        line, ok = str(refused), False
    repo.take(tx, intent.intent_id)
    return ok, line


# -- the protocol ----------------------------------------------------------------------------------
class Runtime(Protocol):
    """What the protocol needs of the process's runtime (``runtime.HomeRuntime``)."""

    db: Database
    backend: HsmBackend
    in_flight: set[str]


class HsmChange:
    """Context manager for one HSM change the catalog must follow (see the module docstring)."""

    def __init__(self, rt: Runtime, kind: str, actor: str) -> None:
        if kind not in RECOVERY:
            raise ValueError(f"unknown intent kind {kind!r}")
        self.rt, self.kind, self.actor = rt, kind, actor
        self.intent: IntentRow | None = None
        self.committed = False

    def __enter__(self) -> HsmChange:
        return self

    def write(self, tx: Tx, *, key_id: str, name: str, version: int | None,
              handles: Iterable[bytes], now: datetime) -> None:
        """Record the intent in the caller's transaction (it commits with the caller's checks);
        from then on the change is in flight in this process (an open elsewhere leaves it)."""
        intent = IntentRow(str(uuid.uuid4()), self.kind, key_id, name, version,
                           tuple(handles), os.getpid())
        repo.add(tx, intent_id=intent.intent_id, kind=self.kind, key_id=key_id, name=name,
                 version=version, handles=list(intent.handles), started_at=now,
                 pid=intent.pid, actor=self.actor)
        self.intent = intent
        self.rt.in_flight.add(intent.intent_id)

    def step(self, hsm: Callable[[], T]) -> T:
        """The HSM step (one call), between the fault points after_intent and after_hsm."""
        _fault(f"{self.kind}:after_intent")
        out = hsm()
        _fault(f"{self.kind}:after_hsm")
        return out

    def each(self, handles: Iterable[bytes], hsm: Callable[[bytes], object]) -> None:
        """The HSM step as one call per object (destroying several versions)."""
        _fault(f"{self.kind}:after_intent")
        for i, handle in enumerate(handles):
            hsm(handle)
            if i == 0:
                _fault(f"{self.kind}:after_first_object")
        _fault(f"{self.kind}:after_hsm")

    @contextlib.contextmanager
    def commit(self, *, export: bool = True) -> Iterator[Tx]:
        """The catalog change, in the transaction that clears the intent. A change that rolls
        back fails if a reconcile took its intent over (it removed the new objects)."""
        assert self.intent is not None, "write() the intent first"
        with self.rt.db.write(export=export) as tx:
            taken = repo.take(tx, self.intent.intent_id)
            if not taken and not RECOVERY[self.kind].forward:
                raise KeyStateError("the operation was rolled back by a concurrent reconcile; "
                                    "retry")
            yield tx
        self.committed = True

    def __exit__(self, etype: object, exc: BaseException | None, tb: object) -> None:
        intent, self.intent = self.intent, None
        if intent is None:
            return
        try:
            if exc is not None and not self.committed and not RECOVERY[self.kind].forward:
                self._undo(intent)
        finally:
            self.rt.in_flight.discard(intent.intent_id)

    def _undo(self, intent: IntentRow) -> None:
        """Roll back at once what failed in this process; if even that fails, the intent
        stays for the next reconcile (this process no longer claims it)."""
        with contextlib.suppress(KeyLedgerError), self.rt.db.write(export=False) as tx:
            if repo.take(tx, intent.intent_id):
                RECOVERY[self.kind].finish(tx, intent, self.rt.backend, self.actor,
                                           datetime.min)
            else:  # a reconcile rolled it back already; new objects may remain
                for h in intent.handles:
                    self.rt.backend.destroy(h)
