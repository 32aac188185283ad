"""Key lifecycle: create, rotate, state changes, deletion, aliases, tags and policy."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ..access import WILDCARD, roles_of
from ..errors import InvalidInput, KeyExists, KeyNotFound, KeyStateError, PolicyViolation
from ..frames import KEY_STATES, normalize
from ..intents import HsmChange
from ..model import (
    Family,
    Key,
    KeySpec,
    KeyState,
    Purpose,
    default_rotation_period,
    next_state,
    parse_period,
    parse_purpose,
    parse_spec,
    valid_usage_limit,
    validate_bool,
    validate_name,
)
from ..model import usage_limit as key_usage_limit
from ..runtime import SIMULATION_LABEL, naive
from ..store import catalog as cat
from ..store import grants as grants_repo
from ..store import keys as keys_repo
from ..store import meta
from ..store.db import Tx
from .context import Audited, Service

if TYPE_CHECKING:
    import pandas as pd

MIN_DELETION_DAYS, MAX_DELETION_DAYS = 7, 30
# what set_policy takes besides the name: also what a set_policy request may carry
SET_POLICY_PARAMS = ("rotation_period", "min_decryption_version", "min_encryption_version",
                     "owner", "quorum", "creator_is_user", "usage_limit", "auto_rotate",
                     "rotation_by_purpose", "rotation_by_tag")


class LifecycleService(Service):
    """Create keys, rotate them, move them through their states, change their metadata."""

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
            # intents are not in catalog.json: no snapshot export for the first transaction
            with self._held_for(kspec), HsmChange(self._rt, "create", self.principal) as change:
                with self._rt.db.write(export=False) as tx:
                    if self._name_taken(tx, name):
                        raise KeyExists(f"a key or alias named {name!r} already exists")
                    change.write(tx, key_id=key_id, name=name, version=1, handles=[handle],
                                 now=now)
                change.step(lambda: self._rt.backend.generate(kspec, handle, f"kl:{name}:v1",
                                                              exportable=exportable))
                self._rt.usage.create(key_id, 1)
                with change.commit() as tx:
                    self.catalog_new_key(
                        tx, key_id=key_id, name=name, spec=kspec, purpose=kpurpose, state=state,
                        owner=owner, now=now, period=period, exportable=exportable,
                        tag_json=tag_json, policy={}, handle=handle, action="create",
                        reason="created", creator_is_user=creator_is_user)
            key = self._exported(key_id)
            rec.key, rec.version = key, 1
            return key

    def _held_for(self, spec: KeySpec) -> contextlib.AbstractContextManager[None]:
        """The store held across a change whose HSM step is quick (AES, HMAC, EC, Ed25519: a
        few ms), so its intent and its commit share one start of DuckDB. Not across an RSA
        key's generation (seconds for RSA-4096): other processes must not wait for that."""
        return contextlib.nullcontext() if spec.family is Family.RSA else self._rt.db.hold()

    def get_key(self, name: str) -> Key:
        """The key's current metadata: a copy, so changing it changes nothing else."""
        with self._audited("get_key", name) as rec:
            return copy.deepcopy(self._key(rec, name))

    def list_keys(self) -> pd.DataFrame:
        """One row per key: name, spec, purpose, state, latest_version, owner, created_at, ..."""
        import pandas as pd

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
        return self.rotate_version(name, reason)

    def rotate_version(self, name: str, reason: str, expect_version: int | None = None, *,
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
            held.enter_context(self._held_for(key.spec))  # after the key's lock, never before
            now = naive(self._now())
            handle = uuid.uuid4().bytes
            with HsmChange(self._rt, "rotate", self.principal) as change:
                with self._rt.db.write(export=False) as tx:
                    key = rec.key = self._current(tx, key, known=True)
                    if expect_version is not None and key.latest_version != expect_version:
                        raise KeyStateError(f"{key.name!r} was already rotated to "
                                            f"v{key.latest_version} by another process")
                    next_state("rotate", key.state, key.name)
                    version = key.latest_version + 1
                    change.write(tx, key_id=key.key_id, name=key.name, version=version,
                                 handles=[handle], now=now)
                change.step(lambda: self._rt.backend.generate(
                    key.spec, handle, f"kl:{key.name}:v{version}", exportable=key.exportable))
                self._rt.usage.create(key.key_id, version)
                with change.commit() as tx:
                    changes = {"latest_version": version, "rotated_at": now,
                               "state": KeyState.ACTIVE.value}
                    if not keys_repo.update(tx, key.key_id, changes, only_if={
                            "latest_version": key.latest_version, "state": key.state.value}):
                        # a state change by another call meanwhile (rotations wait for each
                        # other); leaving the block rolls the new version back
                        raise KeyStateError(
                            f"key {key.name!r} became {self._current(tx, key).state.value} "
                            "during the rotation; nothing changed: check its state and retry")
                    old_state = "compromised" if key.state is KeyState.COMPROMISED else "retired"
                    retired = keys_repo.retire_latest(tx, key.key_id, key.latest_version,
                                                      old_state)
                    added = keys_repo.insert_version(tx, key.key_id, version, handle, now)
                    self._transition(tx, now, key.key_id, version, "rotate", key.state,
                                     KeyState.ACTIVE, reason)
                    self._rt.exporter.wrote(
                        tx, key.key_id, changes, versions=[added],
                        states={key.latest_version: old_state} if retired else None)
            key = self._exported(key.key_id)
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
        return self.destroy_key(name, reason, approved=False)

    def destroy_key(self, name: str | None, reason: str, *, approved: bool) -> Key:
        # name None: an approved request whose key is gone; the name check refuses it (audited)
        with self._audited("destroy", name) as rec:
            key = self._key(rec, name)
            self._reason(reason)
            if not approved:
                self._require_quorum(key, "destroy", f"destroy {key.name!r}")
            now = naive(self._now())
            # destroying objects is quick: the intent and the commit share one start of the store
            with self._rt.db.hold(), HsmChange(self._rt, "destroy", self.principal) as change:
                with self._rt.db.write(export=False) as tx:
                    key = cat.load_key(tx, key.name)
                    rec.key = key
                    next_state("destroy", key.state, key.name)
                    if key.deletion_due is None or now < naive(key.deletion_due):
                        raise PolicyViolation(
                            f"key {key.name!r} may be destroyed after "
                            f"{key.deletion_due:%Y-%m-%d %H:%M} UTC, when its deletion waiting "
                            "period ends; cancel the deletion to keep it")
                    handles = [v.handle for v in key.versions.values() if v.state != "destroyed"]
                    change.write(tx, key_id=key.key_id, name=key.name, version=None,
                                 handles=handles, now=now)
                # material goes first; a crash after this is completed on open
                change.each(handles, self._rt.backend.destroy)
                with change.commit() as tx:
                    self._rt.exporter.expect(key.key_id)
                    keys_repo.destroy_versions(tx, key.key_id, now)
                    keys_repo.update(tx, key.key_id, {"state": KeyState.DESTROYED.value,
                                                      "prior_state": None})
                    self._transition(tx, now, key.key_id, None, "destroy", key.state,
                                     KeyState.DESTROYED, reason)
            key = rec.key = self._exported(key.key_id)
            return key

    def set_alias(self, name: str, alias: str) -> Key:
        with self._audited("set_alias", name) as rec:
            key = self._key(rec, name)
            validate_name(alias, "alias")
            with self._rt.db.write() as tx:
                self._rt.exporter.expect(key.key_id)
                if keys_repo.name_taken(tx, alias):
                    raise KeyExists(f"a key or alias named {alias!r} already exists")
                keys_repo.add_alias(tx, alias, key.key_id)
            key = self._exported(key.key_id)
            rec.detail = f"alias {alias}"
            return key

    def remove_alias(self, alias: str) -> Key:
        """Remove an alias (never a key's name); the key keeps its name and other aliases."""
        with self._audited("remove_alias", alias) as rec:
            key = self._alias_owner(rec, alias)
            with self._rt.db.write() as tx:
                self._rt.exporter.expect(key.key_id)
                keys_repo.remove_alias(tx, alias, key.key_id)
            rec.key = key = self._reloaded(key)
            rec.detail = f"alias {alias} removed"
        return key

    def move_alias(self, alias: str, name: str) -> Key:
        """Point an existing alias at key ``name`` in one transaction (admin on both keys)."""
        with self._audited("move_alias", name) as rec:
            key = self._key(rec, name)
            current = self._alias_owner(rec, alias)
            with self._rt.db.write() as tx:
                self._rt.exporter.expect(key.key_id)
                self._rt.exporter.expect(current.key_id)
                keys_repo.remove_alias(tx, alias, current.key_id)
                keys_repo.add_alias(tx, alias, key.key_id)
            rec.key = key = self._reloaded(key)
            rec.detail = f"alias {alias} moved from {current.name}"
        return key

    def _reloaded(self, key: Key) -> Key:
        """``key`` as the catalog holds it after this process's last write."""
        self._rt.catalog.refresh(force=True)
        return self._rt.catalog.get(key.name)

    def _exported(self, key_id: str) -> Key:
        """The key as the commit just made left it: the store's commit hook exported the
        changed rows and handed them to this process's catalog cache, so this reads neither
        the store nor catalog.json again (a fresh load cost ~4 queries, and a reload of
        catalog.json grew with the number of keys)."""
        self._rt.catalog.refresh(force=True)  # a stat: the file is this process's export
        key = self._rt.catalog.get_id(key_id)
        if key is None:  # only if catalog.json was removed meanwhile
            raise KeyNotFound(f"key {key_id} vanished from catalog.json; reopen the home")
        return key

    def _current(self, tx: Tx, key: Key, *, known: bool = False) -> Key:
        """``key`` with its state and latest version as committed (read in ``tx``): what a
        rotation checks and builds on. Name, spec and exportability never change. ``known``:
        from this process's last export when nothing can have changed since (no query)."""
        status = self._rt.exporter.status(key.key_id) if known else None
        state, latest = cat.key_status(tx, key.key_id) if status is None else status
        if state is key.state and latest == key.latest_version:
            return key
        return dataclasses.replace(key, state=state, latest_version=latest)

    def _name_taken(self, tx: Tx, name: str) -> bool:
        """Whether a key or an alias has ``name``: from this process's last export when nothing
        can have changed since (a held store's creates: no query), else read in ``tx``."""
        taken = self._rt.exporter.name_taken(name)
        return keys_repo.name_taken(tx, name) if taken is None else taken

    def _alias_owner(self, rec: Audited, alias: str) -> Key:
        """The key ``alias`` names, authorised for ``rec.action``; a key's own name is no
        alias (names are permanent: ciphertexts and the ledger refer to them)."""
        validate_name(alias, "alias")
        key = self._rt.catalog.get(alias)
        self._authorize(rec, rec.action, key)
        if key.name == alias:
            raise InvalidInput(f"{alias!r} is the name of a key, not an alias; a key's name "
                               "cannot be removed or moved")
        return key

    def set_tags(self, name: str, tags: Mapping[str, str]) -> Key:
        with self._audited("set_tags", name) as rec:
            key = self._key(rec, name)
            tag_json = self._tags_json(tags)
            with self._rt.db.write() as tx:
                self._rt.exporter.expect(key.key_id)
                keys_repo.update(tx, key.key_id, {"tags": tag_json})
            return self._exported(key.key_id)

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
        return self.apply_policy(name, approved=False, rotation_period=rotation_period,
                                min_decryption_version=min_decryption_version,
                                min_encryption_version=min_encryption_version, owner=owner,
                                quorum=quorum, creator_is_user=creator_is_user,
                                usage_limit=usage_limit, auto_rotate=auto_rotate,
                                rotation_by_purpose=rotation_by_purpose,
                                rotation_by_tag=rotation_by_tag)

    def apply_policy(self, name: str, *, approved: bool, rotation_period=None,
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
                self._set_home_policy(rec, approved, quorum, creator_is_user,
                                      usage_limit, rotation_by_purpose, rotation_by_tag)
                return None
            key = self._key(rec, name)
            updates: dict[str, object] = {}
            weakens = []
            if rotation_period is not None:
                period_s = updates["rotation_period_s"] = _period_s(rotation_period)
                if key.rotation_period and period_s > key.rotation_period.total_seconds():
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
                self._rt.exporter.expect(key.key_id)
                keys_repo.update(tx, key.key_id, updates)
            key = self._exported(key.key_id)
            rec.detail = ", ".join(f"{k}={v}" for k, v in updates.items())
            return key

    def _set_home_policy(self, rec: Audited, approved: bool, quorum: int | None,
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
                p: _period_s(v) for p, v in by_purpose.items()}
        if by_tag is not None:
            if not isinstance(by_tag, Mapping) or not all(
                    isinstance(t, str) and "=" in t for t in by_tag):
                raise InvalidInput("rotation_by_tag must map 'tag=value' to periods, "
                                   "e.g. {'env=prod': '30d'}")
            policy["rotation_by_tag"] = {
                t: _period_s(v) for t, v in by_tag.items()}
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
            meta.set_home_policy(tx, policy)
        self._rt.catalog.refresh(force=True)
        rec.detail = f"home policy {policy}"

    def _change_state(self, action: str, name: str, reason: str) -> Key:
        with self._audited(action, name) as rec:
            return self._transition_key(rec, action, name, reason)

    def _transition_key(self, rec: Audited, action: str, name: str, reason: str,
                        extra: dict[str, object] | None = None) -> Key:
        key = self._key(rec, name)
        self._reason(reason)
        now = naive(self._now())
        with self._rt.db.write() as tx:
            self._rt.exporter.expect(key.key_id)
            key = cat.load_key(tx, key.name)
            rec.key = key
            target = next_state(action, key.state, key.name, key.prior_state)
            prior = key.state.value if action == "schedule_deletion" else None
            sets = {"state": target.value, "prior_state": prior, **(extra or {})}
            if action == "mark_compromised":
                keys_repo.compromise_versions(tx, key.key_id)
            keys_repo.update(tx, key.key_id, sets)
            self._transition(tx, now, key.key_id, None, action, key.state, target, reason)
        key = rec.key = self._exported(key.key_id)
        return key

    def _transition(self, tx, now, key_id, version, action, from_state, to_state, reason) -> None:
        keys_repo.add_transition(tx, now=now, key_id=key_id, version=version, action=action,
                                 from_state=from_state.value if from_state is not None else None,
                                 to_state=to_state.value, actor=self.principal, reason=reason)

    def catalog_new_key(self, tx, *, key_id: str, name: str, spec, purpose: Purpose,
                         state: KeyState, owner: str | None, now: datetime,
                         period: timedelta | None, exportable: bool, tag_json: str,
                         policy: dict, handle: bytes, action: str, reason: str,
                         creator_is_user: bool) -> None:
        """Catalog rows of a new key's version 1 (created or imported), in the caller's tx;
        the export builds the key's document from the rows written (``SnapshotExporter.wrote``)."""
        row = keys_repo.insert_key(
            tx, key_id=key_id, name=name, spec=spec.name, purpose=purpose.value,
            state=state.value, owner=owner, now=now,
            rotation_period_s=int(period.total_seconds()) if period else None,
            exportable=exportable, tags=tag_json, policy=policy)
        version = keys_repo.insert_version(tx, key_id, 1, handle, now)
        self._transition(tx, now, key_id, 1, action, None, state, reason)
        grants: list[tuple[str, str, str]] = []
        if creator_is_user:  # one person can work alone; the separation-of-duties rule reports it
            grants_repo.add(tx, scope=key_id, principal=self.principal, role="user",
                            granted_by=self.principal, now=now, new_scope=True)
            grants.append((key_id, self.principal, "user"))
        self._rt.exporter.wrote(tx, key_id, row, versions=[version], grants=grants)


def _period_s(value: object) -> int:
    """Seconds of a period that must be given (a rule's period, a new rotation period)."""
    period = parse_period(value)
    if period is None:
        raise InvalidInput("a period must be a timedelta or a string like '90d', not None")
    return int(period.total_seconds())


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
