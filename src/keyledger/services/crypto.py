"""Cryptographic calls (the hot path): encrypt, decrypt, rewrap, data keys, envelopes,
signatures and MACs, each authorised and audited once."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import ciphertext as ct
from .. import outputs
from ..errors import InvalidCiphertext, KeyLedgerError, KeyStateError, PolicyViolation
from ..hsm.backend import DecryptFailed
from ..model import Family, Key, KeyVersion, Purpose, Use, check_use, validate_version
from ..rotation import PROTECT_ACTIONS
from ..store import audit as audit_repo
from . import envelopes
from .context import VALID_NAMES, Audited, Context, Service
from .lifecycle import LifecycleService

_AUTO_ROTATIONS_PER_CALL = 3  # a call at a usage limit rotates at most this often
_NO_CONTEXT = b""  # canonical_context(None)
_monotonic = time.monotonic
_urandom = os.urandom
_NONCE_LEN = ct.NONCE_LEN
_new_object = object.__new__


@dataclass(frozen=True, slots=True)
class DataKey:
    """A data key for envelope encryption: use ``plaintext`` locally, store ``wrapped``."""

    plaintext: bytes
    wrapped: bytes
    key: str
    version: int

    def __repr__(self) -> str:  # never show the plaintext key
        return f"<DataKey for {self.key!r} v{self.version}, 256-bit, wrapped {len(self.wrapped)} B>"


# The hot path fills a new DataKey's slots through their descriptors: its frozen __init__
# (four object.__setattr__) and an instance __dict__ each cost generate_data_key ~1.5-2 us
# per call in the HSM loop, though only ~0.5 us in a tight loop (docs/benchmarks.md, §4).
_SET_PLAINTEXT, _SET_WRAPPED, _SET_KEY, _SET_VERSION = (
    DataKey.__dict__[name].__set__ for name in ("plaintext", "wrapped", "key", "version"))


class _Protect(NamedTuple):
    """What encrypting with a key needs, worked out from one catalog snapshot of it. The
    catalog builds a new ``Key`` object for every snapshot (a reload after any change in any
    process), so a plan is used only while ``key`` is the very object the catalog returns."""

    key: Key
    version: KeyVersion  # the latest version, allowed to encrypt
    prefix: bytes  # the ciphertext header up to the nonce
    limit: int  # the version's usage limit
    slot: tuple[str, int]  # (key_id, version): the usage counter's
    # action -> ((action, key_id) as the authorisations remember it, the record of a call
    # that worked with no context, rendered by JournalWriter.fixed_ok)
    calls: dict[str, tuple[tuple[str, str], tuple[str, str, bool]]]


# The hot path's entry for a key name, valid while the catalog holds its view: (the catalog
# snapshot, store.catalog._View, it was checked on; authorised action -> its record, as
# JournalWriter.fixed_ok renders it; then the plan's key, version number, HSM handle, header
# prefix, usage slot and limit, and the plan). A plain tuple, unpacked at once: cheaper than
# a NamedTuple's attribute reads on every call.
_Hot = tuple[Any, dict[str, tuple[str, str, bool]], Key, int, bytes, bytes, tuple[str, int],
             int, _Protect]


_PLANS_MAX = 4096
_PREFIX = ct.HEADER_LEN - ct.NONCE_LEN  # a header up to the nonce: names the key and version
_SHORTEST = ct.HEADER_LEN + ct.TAG_LEN  # the shortest ciphertext ct.parse accepts


class CryptoService(Service):
    """Encrypt, decrypt, sign, MAC: read key state from the in-memory catalog, never DuckDB."""

    def __init__(self, ctx: Context, lifecycle: LifecycleService) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle  # rotates a key at its usage limit (auto_rotate)
        self._plans: dict[str, _Protect] = {}  # key_id -> its encryption plan
        self._named: dict[str, _Hot] = {}  # key name or alias -> the hot path's entry
        # a ciphertext header up to the nonce (key id and version) -> (the Key snapshot it was
        # checked on, the version to decrypt with,
        # the record of a decrypt with it that worked with no context, see _Protect.calls, and
        # the catalog snapshot on which the hot path found both the key and the authorisation
        # unchanged, or None)
        self._readable: dict[bytes, tuple[Key, KeyVersion, tuple[str, str, bool], Any]] = {}
        self._seed = self._recorded_encryptions  # (bound once: every encryption passes it)

    def encrypt(self, name: str, plaintext: bytes, *,
                context: Mapping[str, str] | None = None) -> bytes:
        """AES-GCM in the HSM; returns a self-describing ciphertext (see docs/ciphertext.md)."""
        done = self._encrypt_now("encrypt", name, plaintext, context)
        if done is not None:
            return done[0]
        with self._audited("encrypt", name) as rec:
            ctx = rec.context = _NO_CONTEXT if context is None else ct.canonical_context(context)
            data = plaintext if type(plaintext) is bytes else self._bytes(plaintext, "plaintext")
            key = self._key(rec, name)
            return self._encrypt_with(rec, key, data, ctx)

    def _encrypt_now(self, action: str, name: object, data: object,
                     context: Mapping[str, str] | None) -> tuple[bytes, _Protect] | None:
        """The hot path of ``encrypt`` and ``generate_data_key``, in one function: resolve the
        key, check that this ledger may use it (an authorisation remembered for this grants
        snapshot, an encryption plan for this snapshot of the key), spend one use, encrypt in
        the HSM and append the record, as the ``Audited`` path does, without its object and
        per-step calls. -> (ciphertext, plan), or None when the call needs the full path (a
        ledger closed, non-bytes data, a name not checked yet, the first call on a key or on a
        new snapshot of it or of the grants, the version's uses spent): nothing happened then,
        and the full path does and records the call. A failure on the way is recorded here,
        with what the full path would have known at that point (``Context.record_failure``)."""
        ctx = self.ctx
        if type(data) is not bytes or type(name) is not str or ctx.closed:
            return None
        rt = self._rt
        catalog = rt.catalog
        aad = key = number = None
        try:
            aad = _NO_CONTEXT if context is None else ct.canonical_context(context)
            if _monotonic() - catalog.checked >= catalog.refresh_s:  # CatalogCache.get's
                catalog.refresh()
            view = catalog.view  # (one snapshot of the keys and grants)
            hot = self._named.get(name)
            if hot is None or hot[0] is not view or action not in hot[1]:
                hot = self._hot_entry(name, view)
                if hot is None or action not in hot[1]:
                    return None
            _, calls, key, number, handle, prefix, slot, limit, plan = hot
            usage = rt.usage
            block = usage.blocks.get(slot)  # usage.take's common case, inline: a use left
            if (block is None or block[1] != limit or not next(block[0], 0)) \
                    and not usage.take(key.key_id, number, limit, self._seed):
                return None  # no use was spent: the full path rotates (auto_rotate) or refuses
            nonce = _urandom(_NONCE_LEN)
            header = prefix + nonce
            body = rt.backend.encrypt_gcm(handle, nonce, header + aad, data)
        except BaseException as exc:
            ctx.record_failure(action, name, aad, key, number, exc)
            raise
        if aad or ctx.clock is not None:
            rt.journal.append(rt.trusted_us() if ctx.clock is None else ctx.time_us(),
                              ctx.principal, action, key.name, key.key_id, number, "ok", None,
                              None, aad.decode() if aad else None)
        else:  # the same record, its fixed fields rendered with the plan, dated under one lock
            rt.journal.append_ok(calls[action])
        return header + body, plan

    def _hot_entry(self, name: str, view: Any) -> _Hot | None:
        """What the hot path keeps for a key name on one catalog snapshot (``view``, whose
        keys and grants never change): the encryption plan of the key it names there and the
        record of each action this ledger was authorised for on that grants snapshot. None (the
        full path, which checks, makes the plan and authorises) when there is no such plan or
        authorisation yet, or the name was never checked."""
        if name not in VALID_NAMES:
            return None
        key = view.key(view.ids.get(name))
        plan = None if key is None else self._plans.get(key.key_id)
        under, allowed = self.ctx.allowed
        if plan is None or plan.key is not key or under is not view.grants:
            return None
        version = plan.version
        hot = (view, {action: fixed for action, (allow, fixed) in plan.calls.items()
                      if allow in allowed},
               key, version.version, version.handle, plan.prefix, plan.slot, plan.limit, plan)
        if len(self._named) >= _PLANS_MAX:
            self._named.clear()
        self._named[name] = hot
        return hot

    def _encrypt_with(self, rec: Audited, key: Key, data: bytes, ctx: bytes) -> bytes:
        plan = self._plans.get(key.key_id)
        if plan is None or plan.key is not key:  # a new snapshot of the key: check it again
            plan = self._protect_plan(key)
        version = plan.version
        rec.version = version.version
        nonce = os.urandom(ct.NONCE_LEN)
        if self._rt.usage.take(key.key_id, version.version, plan.limit,
                               self._seed):  # spent one use (usage_limit)
            header = plan.prefix + nonce
        else:
            key, version = self._at_usage_limit(rec, key)
            header = ct.pack_header(key.key_id_bytes, version.version, nonce)
        body = self._rt.backend.encrypt_gcm(version.handle, nonce, header + ctx, data)
        return header + body

    def _protect_plan(self, key: Key) -> _Protect:
        """Check that ``key`` may encrypt (purpose, state, minimum version) and remember what
        encrypting with it needs, for as long as the catalog hands out this ``Key`` object."""
        self._require_purpose(key, Purpose.ENCRYPT, Purpose.WRAP)
        check_use(key.state, Use.PROTECT, key.name)
        version = key.version_for_protect()
        header = ct.pack_header(key.key_id_bytes, version.version, bytes(ct.NONCE_LEN))
        journal, principal = self._rt.journal, self.ctx.principal
        calls = {action: ((action, key.key_id),
                          journal.fixed_ok(principal, action, key.name, key.key_id,
                                           version.version))
                 for action in ("encrypt", "generate_data_key")}
        plan = _Protect(key, version, header[:-ct.NONCE_LEN], self._rt.catalog.usage_limit(key),
                        (key.key_id, version.version), calls)
        if len(self._plans) >= _PLANS_MAX:
            self._plans.clear()
        self._plans[key.key_id] = plan
        return plan

    def _at_usage_limit(self, rec: Audited, key: Key) -> tuple[Key, KeyVersion]:
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
                self.lifecycle.rotate_version(key.name, f"v{version} reached its usage limit of {limit:,} "
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
        with self._rt.db.hold():  # the ingest and the read share one open of the store
            try:
                self._rt.ingest()
            except KeyLedgerError:  # busy or tampered: count what is in the store already
                pass
            with self._rt.db.read() as tx:
                counts = audit_repo.encryptions(tx, PROTECT_ACTIONS, key_id, version)
        return counts.get((key_id, version), 0)

    def decrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt any keyledger ciphertext; the key and version come from its header."""
        # The hot path, in this function (as _encrypt_now for encryption): a key version this
        # ledger has decrypted with, on the same snapshot of the key and of the grants.
        # Anything else, and a ciphertext that does not authenticate, takes the full path
        # below, which checks, decrypts and records it.
        known = self._readable.get(ciphertext[:_PREFIX]) if type(ciphertext) is bytes else None
        caller = self.ctx
        if known is not None and len(ciphertext) >= _SHORTEST and not caller.closed:
            rt = self._rt
            catalog = rt.catalog
            key, version, fixed, seen = known
            aad = found = number = plaintext = None
            try:
                aad = _NO_CONTEXT if context is None else ct.canonical_context(context)
                if _monotonic() - catalog.checked >= catalog.refresh_s:  # as in get_id
                    catalog.refresh()
                view = catalog.view
                if seen is not view:  # another snapshot: the same key, still authorised?
                    seen = self._still_readable(ciphertext[:_PREFIX], known, view)
                if seen is not None:
                    found = key
                    number = version.version
                    plaintext = rt.backend.decrypt_gcm(
                        version.handle, ciphertext[_PREFIX:ct.HEADER_LEN],
                        ciphertext[:ct.HEADER_LEN] + aad, ciphertext[ct.HEADER_LEN:])
            except DecryptFailed:
                pass
            except BaseException as exc:
                caller.record_failure("decrypt", None, aad, found, number, exc)
                raise
            if plaintext is not None:
                if aad or caller.clock is not None:
                    rt.journal.append(
                        rt.trusted_us() if caller.clock is None else caller.time_us(),
                        caller.principal, "decrypt", key.name, key.key_id, number, "ok", None,
                        None, aad.decode() if aad else None)
                else:  # the same record, rendered with the version (see _encrypt_now)
                    rt.journal.append_ok(fixed)
                return plaintext
        with self._audited("decrypt", None) as rec:
            ctx = rec.context = _NO_CONTEXT if context is None else ct.canonical_context(context)
            return self._decrypt(rec, ciphertext, ctx)

    def _still_readable(self, prefix: bytes, known: tuple[Key, KeyVersion,
                        tuple[str, str, bool], Any], view: Any) -> Any:
        """``view`` if the catalog snapshot ``view`` holds the very key a kept decryption
        version was checked on and this ledger's decrypt on it is authorised under its grants
        (then kept with the version), else None (the full path checks it again)."""
        key = known[0]
        under, allowed = self.ctx.allowed
        if (view.key(key.key_id) is not key or under is not view.grants
                or ("decrypt", key.key_id) not in allowed):
            return None
        self._readable[prefix] = (key, known[1], known[2], view)
        return view

    def _decrypt(self, rec: Audited, ciphertext: object, ctx: bytes) -> bytes:
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
        known = self._readable.get(header_bytes[:_PREFIX])
        if known is not None and known[0] is key:  # checked on this snapshot of the key
            version = known[1]
            rec.version = header.version
        else:
            version = self._readable_version(rec, key, header.version, header_bytes[:_PREFIX])
        try:
            return self._rt.backend.decrypt_gcm(version.handle, header.nonce,
                                                header_bytes + ctx, body)
        except DecryptFailed:
            rec.detail = "authentication failed: tampered data or wrong context"
            raise InvalidCiphertext(
                "the ciphertext cannot be decrypted: it was altered or the context differs"
            ) from None

    def _readable_version(self, rec: Audited, key: Key, number: int,
                          prefix: bytes) -> KeyVersion:
        """The version a ciphertext names, after the purpose, state and version checks;
        remembered for as long as the catalog hands out this ``Key`` object."""
        if key.purpose not in (Purpose.ENCRYPT, Purpose.WRAP):  # a forged header
            rec.detail = f"the header names a {key.purpose.value} key, which encrypts nothing"
            raise InvalidCiphertext("the ciphertext cannot be decrypted with any key here")
        if number not in key.versions:
            rec.detail = f"unknown version {number}"
            raise InvalidCiphertext("the ciphertext cannot be decrypted with any key here")
        rec.version = number
        check_use(key.state, Use.PROCESS, key.name)
        version = key.version_for_decrypt(number)
        if len(self._readable) >= _PLANS_MAX:
            self._readable.clear()
        self._readable[prefix] = (key, version, self._rt.journal.fixed_ok(
            self.ctx.principal, "decrypt", key.name, key.key_id, number), None)
        return version

    def rewrap(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Re-encrypt under the key's latest version without exposing plaintext to the caller."""
        with self._audited("rewrap", None) as rec:
            ctx = rec.context = ct.canonical_context(context)
            plaintext = self._decrypt(rec, ciphertext, ctx)
            old, key = rec.version, rec.key
            assert key is not None  # _decrypt returned, so it resolved the key
            out = self._encrypt_with(rec, key, plaintext, ctx)
            rec.detail = f"from v{old}"
            return out

    def generate_data_key(self, name: str, *,
                          context: Mapping[str, str] | None = None) -> DataKey:
        """A fresh 256-bit data key, and the same key encrypted under ``name`` to store."""
        plaintext = _urandom(32)  # what AESGCM.generate_key(256) returns
        done = self._encrypt_now("generate_data_key", name, plaintext, context)
        if done is not None:  # DataKey(...), without its frozen __init__ (see _SET_PLAINTEXT)
            plan = done[1]
            dk = _new_object(DataKey)
            _SET_PLAINTEXT(dk, plaintext)
            _SET_WRAPPED(dk, done[0])
            _SET_KEY(dk, plan.key.name)
            _SET_VERSION(dk, plan.version.version)
            return dk
        with self._audited("generate_data_key", name) as rec:
            ctx = rec.context = _NO_CONTEXT if context is None else ct.canonical_context(context)
            key = self._key(rec, name)  # (the hot path did nothing with ``plaintext``)
            wrapped = self._encrypt_with(rec, key, plaintext, ctx)
            return DataKey(plaintext, wrapped, key.name, rec.version or 0)

    def envelope_encrypt(self, name: str, data: bytes, *,
                         context: Mapping[str, str] | None = None) -> bytes:
        """Encrypt large data locally under a fresh data key; the wrapped key travels with it."""
        with self._audited("envelope_encrypt", name) as rec:
            ctx = rec.context = ct.canonical_context(context)
            payload = ct.byte_view(data, "data")  # bytes, bytearray or memoryview: no copy
            key = self._key(rec, name)
            dk = AESGCM.generate_key(bit_length=256)
            wrapped = self._encrypt_with(rec, key, dk, ctx)
            return envelopes.seal(dk, wrapped, payload, ctx)

    def envelope_decrypt(self, blob: bytes, *,
                         context: Mapping[str, str] | None = None) -> bytes:
        with self._audited("envelope_decrypt", None) as rec:
            ctx = rec.context = ct.canonical_context(context)
            header, wrapped, nonce, body = ct.parse_envelope(blob)  # body: a view, no copy
            dk = self._decrypt(rec, wrapped, ctx)
            try:
                return envelopes.open_body(dk, nonce, body, header + ctx)
            except InvalidCiphertext:
                rec.detail = "envelope body authentication failed"
                raise InvalidCiphertext("the envelope cannot be decrypted: it was altered or "
                                        "the context differs") from None

    def envelope_encrypt_stream(self, name: str, source: Any, sink: Any, *,
                                context: Mapping[str, str] | None = None,
                                chunk_size: int = envelopes.CHUNK_SIZE, overwrite: bool = False,
                                progress: bool = True) -> int:
        """``source`` (a binary file-like or a path) sealed chunk by chunk into ``sink`` (a
        file-like, or a path written through a temporary file); -> plaintext bytes. One
        ``envelope_encrypt`` record for the whole stream."""
        with self._audited("envelope_encrypt", name) as rec:
            ctx = rec.context = ct.canonical_context(context)

            def data_key() -> tuple[bytes, bytes]:
                key = self._key(rec, name)
                dk = AESGCM.generate_key(bit_length=256)
                return dk, self._encrypt_with(rec, key, dk, ctx)

            size, chunks = envelopes.encrypt_stream(
                data_key, source, sink, ctx=ctx, chunk_size=chunk_size, overwrite=overwrite,
                progress=progress, protected=self._protected())
            rec.detail = f"streamed: {size} bytes in {chunks} chunks"
            return size

    def envelope_decrypt_stream(self, source: Any, sink: Any, *,
                                context: Mapping[str, str] | None = None,
                                overwrite: bool = False, progress: bool = True) -> int:
        """Open a streamed envelope chunk by chunk, each authenticated before it is written;
        -> plaintext bytes. One ``envelope_decrypt`` record for the whole stream."""
        with self._audited("envelope_decrypt", None) as rec:
            ctx = rec.context = ct.canonical_context(context)

            def unwrap(wrapped: bytes) -> bytes:
                return self._decrypt(rec, wrapped, ctx)

            size, chunks = envelopes.decrypt_stream(
                unwrap, source, sink, ctx=ctx, overwrite=overwrite, progress=progress,
                protected=self._protected())
            rec.detail = f"streamed: {size} bytes in {chunks} chunks"
            return size

    def _protected(self) -> list[Path]:
        return outputs.protected_paths(self._rt.settings)

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

    def _for_protect(self, rec: Audited, name: object,
                     *purposes: Purpose) -> tuple[Key, KeyVersion]:
        """The key and its latest version, checked for purpose, state and minimum version."""
        key = self._key(rec, name)
        self._require_purpose(key, *purposes)
        check_use(key.state, Use.PROTECT, key.name)
        version = key.version_for_protect()
        rec.version = version.version
        return key, version

    def _for_process(self, rec: Audited, name: object, *purposes: Purpose) -> Key:
        key = self._key(rec, name)
        self._require_purpose(key, *purposes)
        check_use(key.state, Use.PROCESS, key.name)
        return key

    def _check_any(self, rec: Audited, key: Key, version: int | None,
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
