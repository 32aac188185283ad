"""Batch encryption for columns (docs/batch.md): ``encrypt_many`` and ``decrypt_many`` over a
list, a pandas Series or an Arrow array. One authorisation and ONE audit record per batch, the
usage counter spent per item, the HSM called N items at a time (``HsmBackend.*_gcm_many``);
every output is an ordinary keyledger ciphertext, which ``decrypt`` reads, and ``decrypt_many``
reads what ``encrypt`` wrote.

The batch's audit record (action ``encrypt_many``/``decrypt_many``, the key, outcome) says in
``detail``: ``count=<items> nulls=<n> ok=<items done> failed=<n> [first_failed=<index>]
versions=<version>:<items>,...`` and, after a failure, ``; item <i>: <reason>``. Its ``version``
column is, for ``encrypt_many``, the version the batch ended on (the key's latest at the
record's time, also after an automatic rotation mid-batch), for ``decrypt_many`` the lowest
version read; ingest counts the ``versions=`` items into ``usage`` per version
(store/ingest.py), so ``version_usage`` and usage limits see every item.

``rewrap_chunk`` is ``rewrap_many``'s batch path (docs/rotation.md): one ``rewrap_many`` record
per chunk and key (``count= ok= failed= versions=<new>:<n> from=<old>:<n>``), every item it
does not take left to a single ``rewrap``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import ciphertext as ct
from ..columns import BatchResult, ItemError, Rebuild, as_items
from ..errors import InvalidCiphertext, InvalidInput, KeyLedgerError, KeyStateError, PolicyViolation
from ..model import Family, Key, KeyVersion, Purpose, Use, check_use
from .context import Audited, as_bytes
from .crypto import CryptoService

BATCH_ROTATIONS = 16  # automatic rotations one batch may cause at a usage limit
# items per backend call: the HSM lock is held for one call, so other threads' calls (and the
# journal's seals) wait at most this many items (~20 ms), at no measurable cost per item
CHUNK = 1024
_ERRORS = ("raise", "return")
_PREFIX_LEN = ct.HEADER_LEN - ct.NONCE_LEN  # magic, format, algorithm, key id, version
_FORMAT = ct.pack_header(bytes(16), 1, bytes(ct.NONCE_LEN))[:4]  # magic, format, algorithm
_NO_VERSION = bytes(4)
_OPAQUE = "cannot be decrypted with any key here"


class _Tally:
    """What one batch did, for its audit record and its result: items, uses per version,
    failures (index, the caller's error, the precise reason for the record)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.nulls = 0
        self.used: dict[int, int] = {}
        self.failures: list[tuple[int, KeyLedgerError, str]] = []
        self.note: str | None = None  # why the whole batch failed, when the caller's is opaque

    def fail(self, index: int, exc: KeyLedgerError, reason: str | None = None) -> None:
        self.failures.append((index, exc, reason or str(exc)))

    def add(self, version: int, n: int) -> None:
        if n:
            self.used[version] = self.used.get(version, 0) + n

    def first(self) -> KeyLedgerError:
        return min(self.failures, key=lambda f: f[0])[1]

    def errors(self) -> list[ItemError]:
        return [(i, type(e).__name__, str(e)) for i, e, _ in sorted(self.failures,
                                                                    key=lambda f: f[0])]

    def record(self, rec: Audited, exc: KeyLedgerError | None = None) -> None:
        """The batch's counts into its audit record (see the module docstring)."""
        parts = [f"count={self.count}", f"nulls={self.nulls}", f"ok={sum(self.used.values())}",
                 f"failed={len(self.failures)}"]
        first = min(self.failures, key=lambda f: f[0]) if self.failures else None
        if first is not None:
            parts.append(f"first_failed={first[0]}")
        parts.append("versions=" + ",".join(f"{v}:{n}" for v, n in sorted(self.used.items())))
        detail = " ".join(parts)
        if first is not None:
            detail += f"; {first[2]}"
        elif exc is not None:
            detail += f"; {self.note or exc}"
        rec.detail = detail[:1000]
        if self.used:  # encrypt: the version it ended on (the latest then); decrypt: the oldest
            rec.version = max(self.used) if rec.action == "encrypt_many" else min(self.used)


@dataclass
class _Batch:
    """One batch in progress: its record, context, items and where each output goes."""

    rec: Audited
    ctx: bytes
    keep_going: bool  # errors="return"
    items: list[Any]
    rebuild: Rebuild
    tally: _Tally
    out: list[bytes | None]

    def result(self) -> Any:
        """The input's kind rebuilt from the outputs (a ``BatchResult`` with errors="return")."""
        values = self.rebuild(self.out)
        return BatchResult(values, self.tally.errors()) if self.keep_going else values


def _keep_going(errors: object) -> bool:
    if errors not in _ERRORS:
        raise InvalidInput(f"errors must be 'raise' or 'return', not {errors!r}")
    return errors == "return"


class BatchService(CryptoService):
    """``encrypt_many``/``decrypt_many``: the crypto service's checks, usage limits and
    automatic rotation, applied once per batch."""

    def encrypt_many(self, name: str, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any:
        """Encrypt each non-null item under ``name`` (bytes only, like ``encrypt``); the same
        kind back, nulls null. ``errors="return"``: a ``BatchResult`` instead of raising."""
        with self._batch("encrypt_many", name, values, context, errors) as run:
            key = self._key(run.rec, name)
            self._require_purpose(key, Purpose.ENCRYPT, Purpose.WRAP)
            check_use(key.state, Use.PROTECT, key.name)
            todo = _plaintexts(run.items, run.tally)
            if run.tally.failures and not run.keep_going:
                raise run.tally.first()
            start = 0
            for used_key, version, n in self._spend_uses(run.rec, key, len(todo)):
                self._encrypt_part(used_key, version, todo[start:start + n], run.ctx, run.out)
                run.tally.add(version.version, n)
                start += n
            return run.result()

    @contextlib.contextmanager
    def _batch(self, action: str, name: str | None, values: Any,
               context: Mapping[str, str] | None, errors: str) -> Iterator[_Batch]:
        """One batch call: audited once, its counts (``_Tally``) in the record however it ends."""
        with self._audited(action, name) as rec:
            ctx = rec.context = ct.canonical_context(context)
            keep_going = _keep_going(errors)
            items, rebuild = as_items(values)
            run = _Batch(rec, ctx, keep_going, items, rebuild, _Tally(len(items)),
                         [None] * len(items))
            try:
                yield run
            except KeyLedgerError as exc:
                run.tally.record(rec, exc)
                raise
            run.tally.record(rec)

    def _spend_uses(self, rec: Audited, key: Key, n: int) -> list[tuple[Key, KeyVersion, int]]:
        """How the batch's ``n`` encryptions split over versions, their uses spent: at a usage
        limit the key rotates (``auto_rotate``) and the rest go to the new version; with
        ``auto_rotate`` off the batch is refused whole and its uses are given back."""
        plan: list[tuple[Key, KeyVersion, int, int]] = []
        try:
            for _ in range(BATCH_ROTATIONS + 1):
                version = key.version_for_protect()
                rec.version = version.version
                limit = self._rt.catalog.usage_limit(key)
                got = self._rt.usage.take_many(key.key_id, version.version, limit,
                                               self._recorded_encryptions, n) if n else 0
                if got:
                    plan.append((key, version, got, limit))
                    n -= got
                if not n:
                    return [(k, v, got) for k, v, got, _ in plan]
                if not key.policy.get("auto_rotate", True):
                    raise PolicyViolation(
                        f"key {key.name!r} v{version.version} has {got:,} of its usage limit of "
                        f"{limit:,} encryptions left, fewer than this batch needs, and "
                        f"auto_rotate is off: nothing was encrypted; rotate it (`keyledger key "
                        f"rotate {key.name}`), raise usage_limit or split the batch")
                key = rec.key = self._rotate_at_limit(key, version.version, limit)
            raise PolicyViolation(
                f"a batch for key {key.name!r} needs more than {BATCH_ROTATIONS} automatic "
                f"rotations at its usage limit of {limit:,}: raise usage_limit or split it")
        except KeyLedgerError:
            for k, v, got, lim in plan:
                self._rt.usage.give_back(k.key_id, v.version, lim, got)
            raise

    def _encrypt_part(self, key: Key, version: KeyVersion, todo: list[tuple[int, bytes]],
                      ctx: bytes, out: list[bytes | None]) -> None:
        """Encrypt ``todo`` (index, plaintext) with one version, in one backend call."""
        prefix = ct.pack_header(key.key_id_bytes, version.version,
                                bytes(ct.NONCE_LEN))[:_PREFIX_LEN]
        size = ct.NONCE_LEN
        for start in range(0, len(todo), CHUNK):
            part = todo[start:start + CHUNK]
            nonces = os.urandom(size * len(part))  # fresh random nonces, one kernel call
            heads = [prefix + nonces[j:j + size] for j in range(0, len(nonces), size)]
            calls = [(h[_PREFIX_LEN:], h + ctx, data) for h, (_, data) in zip(heads, part,
                                                                                strict=True)]
            bodies = self._rt.backend.encrypt_gcm_many(version.handle, calls)
            for (i, _), head, body in zip(part, heads, bodies, strict=True):
                out[i] = head + body

    def decrypt_many(self, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any:
        """Decrypt each non-null ciphertext (one key per batch, any of its versions); the same
        kind back, nulls null. ``errors="return"``: a ``BatchResult`` instead of raising."""
        with self._batch("decrypt_many", None, values, context, errors) as run:
            kid, groups = _headers(run.items, run.tally, run.keep_going)
            if kid is not None:
                key = self._batch_key(run.rec, kid, run.tally)
                for version, members in sorted(groups.items()):
                    self._decrypt_part(key, version, members, run.ctx, run.tally, run.out)
            if run.tally.failures and not run.keep_going:
                raise run.tally.first()
            return run.result()

    def _batch_key(self, rec: Audited, kid: bytes, tally: _Tally) -> Key:
        """The batch's key, authorised and usable for decryption (else the whole batch fails)."""
        key_id = str(uuid.UUID(bytes=kid))
        key = self._rt.catalog.get_id(key_id)
        if key is None:
            tally.note = f"unknown key id {key_id}"
            raise InvalidCiphertext(f"the ciphertexts {_OPAQUE}")
        rec.key = key
        self._authorize(rec, rec.action, key)
        if key.purpose not in (Purpose.ENCRYPT, Purpose.WRAP):  # a forged header
            tally.note = f"the header names a {key.purpose.value} key, which encrypts nothing"
            raise InvalidCiphertext(f"the ciphertexts {_OPAQUE}")
        check_use(key.state, Use.PROCESS, key.name)
        return key

    def _decrypt_part(self, key: Key, version: int, members: list[tuple[int, bytes]],
                      ctx: bytes, tally: _Tally, out: list[bytes | None]) -> None:
        """Decrypt one version's items in one backend call; failures are the items'."""
        if version not in key.versions:
            for i, _ in members:
                tally.fail(i, InvalidCiphertext(f"item {i} {_OPAQUE}"),
                           f"item {i}: unknown version {version}")
            return
        try:
            kv = key.version_for_decrypt(version)
        except KeyStateError as exc:
            for i, _ in members:
                tally.fail(i, KeyStateError(f"item {i}: {exc}"))
            return
        h = ct.HEADER_LEN
        done = 0
        for start in range(0, len(members), CHUNK):
            part = members[start:start + CHUNK]
            plain = self._rt.backend.decrypt_gcm_many(
                kv.handle, [(b[_PREFIX_LEN:h], b[:h] + ctx, b[h:]) for _, b in part])
            for (i, _), p in zip(part, plain, strict=True):
                if p is None:
                    tally.fail(i, InvalidCiphertext(
                        f"item {i} cannot be decrypted: it was altered or the context differs"),
                        f"item {i}: authentication failed: tampered data or wrong context")
                else:
                    out[i] = p
                    done += 1
        tally.add(version, done)


    # -- rewrap_many's batch path (services/maintenance.py, docs/rotation.md) --------------------
    def rewrap_chunk(self, blobs: list[Any],
                     context: Mapping[str, str] | None) -> list[bytes | KeyLedgerError]:
        """Rewrap each item to its key's latest version: per key, its items read per version
        and encrypted in batches under one ``rewrap_many`` record with the key. Every item the
        batch path does not take (not bytes, malformed, an unknown key or version, refused, a
        failed tag, a key spec without AES-GCM batches, a usage limit it cannot fit under)
        goes through ``rewrap`` one by one, so its result, error and record are a single
        call's. -> the new ciphertext or the item's error, in order."""
        out: list[Any] = [None] * len(blobs)
        try:
            ctx = ct.canonical_context(context)
        except KeyLedgerError:  # every item fails as a single rewrap would (and is audited)
            ctx = None
        if ctx is not None:
            for kid, groups in _rewrap_groups(blobs).items():
                self._rewrap_key(kid, groups, ctx, out)
        for i, blob in enumerate(blobs):
            if out[i] is None:
                try:
                    out[i] = self.rewrap(blob, context=context)
                except KeyLedgerError as exc:
                    out[i] = exc
        return out

    def _rewrap_key(self, kid: bytes, groups: dict[int, list[tuple[int, bytes]]], ctx: bytes,
                    out: list[Any]) -> None:
        """One key's items of a chunk; those it cannot do stay None (for the per-item path)."""
        key = self._rt.catalog.get_id(str(uuid.UUID(bytes=kid)))
        if key is None:
            return
        rec = self._audited("rewrap_many", key.name)  # written only once it encrypts
        rec.key, rec.context = key, ctx
        if not self._rewrap_ready(rec, key):
            return
        plain: list[tuple[int, bytes]] = []
        read: dict[int, int] = {}
        for number, members in sorted(groups.items()):
            got = self._rewrap_read(key, number, members, ctx)
            if got:
                plain += got
                read[number] = len(got)
        if not plain:
            return
        try:
            plan = self._spend_uses(rec, key, len(plain))
        except KeyLedgerError:  # e.g. a usage limit and auto_rotate off: item by item
            return
        used: dict[int, int] = {}
        with contextlib.suppress(KeyLedgerError), rec:
            rec.detail = _rewrap_detail(len(plain), used, read)
            start = 0
            for used_key, version, n in plan:
                self._encrypt_part(used_key, version, plain[start:start + n], ctx, out)
                used[version.version] = used.get(version.version, 0) + n
                start += n
                rec.detail = _rewrap_detail(len(plain), used, read)

    def _rewrap_ready(self, rec: Audited, key: Key) -> bool:
        """Whether the batch path takes this key: an AES-GCM key the caller may rewrap with,
        usable to decrypt and to encrypt (else each item is refused as a single call)."""
        if key.spec.family is not Family.AES or key.purpose not in (Purpose.ENCRYPT,
                                                                     Purpose.WRAP):
            return False
        try:
            self._authorize(rec, "rewrap", key)
            check_use(key.state, Use.PROCESS, key.name)
            check_use(key.state, Use.PROTECT, key.name)
            key.version_for_protect()
        except KeyLedgerError:
            return False
        return True

    def _rewrap_read(self, key: Key, number: int, members: list[tuple[int, bytes]],
                     ctx: bytes) -> list[tuple[int, bytes]]:
        """(index, plaintext) of one version's items that decrypt; none if the version cannot
        be read (unknown, destroyed, below the minimum, an HSM error)."""
        if number not in key.versions:
            return []
        try:
            kv = key.version_for_decrypt(number)
        except KeyStateError:
            return []
        h = ct.HEADER_LEN
        got: list[tuple[int, bytes]] = []
        for start in range(0, len(members), CHUNK):
            part = members[start:start + CHUNK]
            try:
                plain = self._rt.backend.decrypt_gcm_many(
                    kv.handle, [(b[_PREFIX_LEN:h], b[:h] + ctx, b[h:]) for _, b in part])
            except KeyLedgerError:  # e.g. the version destroyed meanwhile: item by item
                continue
            got += [(i, p) for (i, _), p in zip(part, plain, strict=True) if p is not None]
        return got


def _rewrap_groups(blobs: list[Any]) -> dict[bytes, dict[int, list[tuple[int, bytes]]]]:
    """Well-formed bytes items by key id and version (what ``ct.parse`` accepts)."""
    shortest = ct.HEADER_LEN + ct.TAG_LEN
    keys: dict[bytes, dict[int, list[tuple[int, bytes]]]] = {}
    for i, v in enumerate(blobs):
        if type(v) is bytes and len(v) >= shortest and v.startswith(_FORMAT) \
                and not v.startswith(_NO_VERSION, 20):
            versions = keys.setdefault(v[4:20], {})
            versions.setdefault(int.from_bytes(v[20:24]), []).append((i, v))
    return keys


def _rewrap_detail(count: int, used: dict[int, int], read: dict[int, int]) -> str:
    """A ``rewrap_many`` record's counts: items, done, per new version (``versions=``, which
    ingest counts as encryptions) and per version read (``from=``)."""
    done = sum(used.values())
    return (f"count={count} ok={done} failed={count - done} versions="
            + ",".join(f"{v}:{n}" for v, n in sorted(used.items()))
            + " from=" + ",".join(f"{v}:{n}" for v, n in sorted(read.items())))


def _plaintexts(items: list[Any], tally: _Tally) -> list[tuple[int, bytes]]:
    """(index, bytes) of each non-null item; a non-bytes item is that item's failure."""
    todo: list[tuple[int, bytes]] = []
    for i, v in enumerate(items):
        if v is None:
            tally.nulls += 1
        elif type(v) is bytes:
            todo.append((i, v))
        else:
            try:
                todo.append((i, as_bytes(v, f"item {i}")))
            except InvalidInput as exc:
                tally.fail(i, exc)
    return todo


def _headers(items: list[Any], tally: _Tally,
             keep_going: bool) -> tuple[bytes | None, dict[int, list[tuple[int, bytes]]]]:
    """The batch's key id (of its first well-formed item) and its items by version. Malformed
    items, and items of another key (one key per batch), are those items' failures; without
    ``keep_going`` nothing after the first failure is looked at."""
    kid: bytes | None = None
    head = b"\0"  # magic, format, algorithm and the batch's key id, once it is known
    groups: dict[bytes, list[tuple[int, bytes]]] = {}
    shortest = ct.HEADER_LEN + ct.TAG_LEN
    for i, v in enumerate(items):
        # the usual item: bytes of the batch's key, a version seen before (one test each)
        if type(v) is bytes and len(v) >= shortest and v.startswith(head):
            members = groups.get(v[20:24])
            if members is not None:
                members.append((i, v))
                continue
        if v is None:
            tally.nulls += 1
            continue
        failure = _header_failure(i, v, kid)
        if failure is None:
            v = bytes(v)
            kid = v[4:20]
            head = _FORMAT + kid
            groups.setdefault(v[20:24], []).append((i, v))
            continue
        tally.fail(i, *failure)
        if not keep_going:
            break
    return kid, {int.from_bytes(b): members for b, members in groups.items()}


def _header_failure(i: int, v: object,
                    kid: bytes | None) -> tuple[KeyLedgerError, str | None] | None:
    """Why item ``i`` cannot be in the batch (its error, the record's reason), or None."""
    if not isinstance(v, bytes | bytearray | memoryview):
        return InvalidInput(f"item {i} must be bytes (a keyledger ciphertext), not "
                            f"{type(v).__name__}"), None
    v = bytes(v)
    if len(v) < ct.HEADER_LEN + ct.TAG_LEN or not v.startswith(_FORMAT) \
            or v.startswith(_NO_VERSION, 20):
        return (InvalidCiphertext(f"item {i} is not a keyledger ciphertext"),
                f"item {i}: malformed ciphertext")
    if kid is not None and not v.startswith(kid, 4):
        return InvalidInput(f"item {i} is under another key than the batch's first ciphertext: "
                            "decrypt_many takes one key's ciphertexts per batch"), None
    return None


__all__ = ["BATCH_ROTATIONS", "BatchService"]
