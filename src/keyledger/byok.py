"""Key import (BYOK) and wrapped export of exportable keys.

Both directions use the same two-layer wrap (the CKM_RSA_AES_KEY_WRAP construction, done in two
PKCS#11 steps because SoftHSM 2.6.1 lacks that mechanism):

    wrapped = RSA-OAEP(wrapping public key, ephemeral AES-256 key)      (modulus-size bytes)
           || AES-KWP(ephemeral key, key material)                      (RFC 5649)

OAEP uses SHA-1 with MGF1-SHA-1 where the HSM lacks OAEP-SHA-256 (SoftHSM 2.6.1), SHA-256
otherwise; the parameters and results name which. The client side is in ``docs/byok.md``.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, timedelta
from hashlib import sha256
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .errors import (
    InvalidCiphertext,
    InvalidInput,
    KeyExists,
    KeyStateError,
    PolicyViolation,
)
from .hsm.backend import HsmBackend, UnwrapFailed
from .intents import HsmChange
from .model import Family, KeySpec, KeyState, Use, check_use, parse_purpose, parse_spec, validate_name
from .runtime import naive
from .services.context import Service
from .store import catalog as cat
from .store import imports
from .store import keys as keys_repo

if TYPE_CHECKING:
    from .model import Key, KeyVersion
    from .services.lifecycle import LifecycleService

IMPORT_TTL = timedelta(hours=24)
IMPORT_RSA_BITS = 3072
IMPORTABLE = ("AES_256", "AES_128")
MIN_WRAPPING_BITS = 2048
ALGORITHM = "RSA_OAEP_AES_KWP"  # RSA-OAEP(ephemeral AES-256) || AES-KWP(material), RFC 5649


@dataclass(frozen=True)
class WrappedKey:
    """Key material wrapped for the holder of one RSA private key (see docs/byok.md).

    ``wrapped`` = RSA-OAEP(``oaep_hash``) of an ephemeral AES-256 key (as many bytes as the
    wrapping key's modulus), then AES key wrap with padding (RFC 5649) of the material under
    that ephemeral key. The material is the raw secret for AES/HMAC keys (``format`` "raw") or a
    DER PKCS#8 private key for RSA/EC keys (``format`` "pkcs8"; SoftHSM 2.6.1 zero-pads it to a
    multiple of 8 bytes: read the DER length, see docs/byok.md).
    """

    key: str
    key_id: str
    version: int
    spec: str
    format: str
    algorithm: str
    oaep_hash: str
    wrapped: bytes
    wrapping_key_sha256: str

    def __repr__(self) -> str:
        return (f"<WrappedKey {self.key!r} v{self.version} {self.spec} {self.format}, "
                f"{len(self.wrapped)} B for RSA key sha256:{self.wrapping_key_sha256[:16]}>")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``wrapped`` as hex)."""
        d = asdict(self)
        d["wrapped"] = self.wrapped.hex()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WrappedKey:
        return cls(**{**d, "wrapped": bytes.fromhex(d["wrapped"])})


def _oaep_hash(backend: HsmBackend) -> str:
    return "sha256" if backend.capabilities().supports.get("RSA_OAEP_SHA256") else "sha1"


def _wrapping_public_key(value: object) -> tuple[rsa.RSAPublicKey, str]:
    pub: PublicKeyTypes
    if isinstance(value, rsa.RSAPublicKey):
        pub = value
    else:
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes | bytearray):
            raise InvalidInput("wrapping_key_pem must be a PEM RSA public key "
                               "(-----BEGIN PUBLIC KEY-----)")
        try:
            pub = serialization.load_pem_public_key(bytes(value))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise InvalidInput("wrapping_key_pem is not a PEM public key; pass the text of "
                               "-----BEGIN PUBLIC KEY----- ... -----END PUBLIC KEY-----") from None
    if not isinstance(pub, rsa.RSAPublicKey) or pub.key_size < MIN_WRAPPING_BITS:
        raise InvalidInput(f"the wrapping key must be an RSA public key of at least "
                           f"{MIN_WRAPPING_BITS} bits (3072 recommended)")
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pub, sha256(der).hexdigest()


# -- the HSM steps (the backend does the PKCS#11 work; these name the failures for BYOK) ----------
def _hsm_new_wrapping_key(backend: HsmBackend, handle: bytes, label: str) -> str:
    """An RSA key pair in the HSM whose private half can only unwrap; returns the public PEM."""
    der = backend.new_unwrap_key(handle, label, IMPORT_RSA_BITS)
    return serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _hsm_unwrap_in(backend: HsmBackend, wrapping_handle: bytes, oaep: str, blob: bytes,
                   spec: KeySpec, handle: bytes, label: str) -> None:
    """Unwrap ``blob`` into a sensitive, non-extractable AES token object with CKA_ID ``handle``."""
    try:
        backend.unwrap_in(wrapping_handle, oaep, blob, spec, handle, label)
    except UnwrapFailed:
        raise InvalidCiphertext(
            "the wrapped key could not be unwrapped: it was not made with this import token's "
            "public key (RSA-OAEP, then AES key wrap with padding, see docs/byok.md) or it was "
            "altered") from None
    except KeyStateError:
        raise PolicyViolation("the import token's wrapping key is gone from the HSM; get new "
                              "import parameters") from None


def _request_key(name: str | None, what: str) -> str:
    """An approved export or import request always names its key; a home-wide one is corrupt."""
    if name is None:
        raise InvalidInput(f"an {what} request must name a key")
    return name


def _expected_len(spec: KeySpec) -> int:
    n = spec.bits // 8
    return IMPORT_RSA_BITS // 8 + ((n + 7) // 8) * 8 + 8


# -- the KeyLedger methods -----------------------------------------------------------------------
class ImportExportMixin(Service):
    """The import/export service's calls (services/importexport.py): ``export_key``,
    ``import_parameters``, ``import_key``."""

    lifecycle: LifecycleService  # catalogs an imported key as it catalogs a created one

    # -- export ------------------------------------------------------------------------------
    def export_key(self, name: str, wrapping_key_pem: str | bytes, *,
                   version: int | None = None) -> WrappedKey:
        """The material of an exportable key's latest (or given) version, wrapped for the holder
        of the RSA private key matching ``wrapping_key_pem`` (see docs/byok.md to unwrap).

        Keys created with ``exportable=False`` (the default) never leave the HSM. When the key's
        quorum is above 1, run ``request("export_key", name, reason, wrapping_key_pem=pem)``;
        once approved, ``export_key`` with the same public key returns the approved export.
        """
        return self._export_key(name, wrapping_key_pem, version, approval=None)

    def run_export_key(self, name: str | None, reason: str, params: dict) -> None:
        self._export_key(_request_key(name, "export"), params.get("wrapping_key_pem"),
                         params.get("version"), approval=reason)

    def _export_key(self, name: str, pem: object, version: object,
                    approval: str | None) -> WrappedKey:
        with self._audited("export_key", name if isinstance(name, str) else None) as rec:
            key = self._key(rec, name)
            pub, fingerprint = _wrapping_public_key(pem)
            if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                        or version < 1):
                raise InvalidInput("version must be a positive whole number")
            if not key.exportable:
                raise PolicyViolation(
                    f"key {key.name!r} is not exportable: it was created with exportable=False, "
                    "so its material never leaves the HSM")
            check_use(key.state, Use.PROCESS, key.name)
            kv = key.version_for_decrypt(version or key.latest_version)
            rec.version = kv.version
            if approval is None:
                delivered = self._deliver_export(key, fingerprint, version)
                if delivered is not None:
                    rec.version = delivered.version
                    rec.detail = (f"delivered the approved export of v{delivered.version} for "
                                  f"RSA key sha256:{fingerprint[:16]}")
                    return delivered
                self._require_quorum(key, "export_key", f"exporting key {key.name!r}")
            out = self._wrap_version(key, kv, pub, fingerprint)
            rec.detail = (f"v{kv.version} wrapped for RSA-{pub.key_size} key "
                          f"sha256:{fingerprint[:16]} (OAEP-{out.oaep_hash.upper()} + AES-KWP)")
            if approval is not None:
                with self._rt.db.write() as tx:
                    tx.execute("INSERT INTO key_exports (export_id, key_id, version, "
                               "wrapping_key_sha256, payload, approval, created_at, created_by) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               [uuid.uuid4().hex, key.key_id, kv.version, fingerprint,
                                json.dumps(out.to_dict()), approval[:1000],
                                naive(self._now()), self.principal])
                rec.detail += f"; held for the requester ({approval[-300:]})"
            return out

    def _wrap_version(self, key: Key, kv: KeyVersion, pub: rsa.RSAPublicKey,
                      fingerprint: str) -> WrappedKey:
        oaep = _oaep_hash(self._rt.backend)
        blob = self._rt.backend.wrap_out(key.spec, kv.handle, pub, oaep)
        fmt = "raw" if key.spec.family in (Family.AES, Family.HMAC) else "pkcs8"
        return WrappedKey(key.name, key.key_id, kv.version, key.spec.name, fmt, ALGORITHM, oaep,
                          blob, fingerprint)

    def _deliver_export(self, key: Key, fingerprint: str,
                        version: int | None) -> WrappedKey | None:
        with self._rt.db.write() as tx:
            sql = ("SELECT export_id, payload FROM key_exports WHERE key_id = ? AND "
                   "wrapping_key_sha256 = ? AND delivered_at IS NULL")
            args: list[Any] = [key.key_id, fingerprint]
            if version is not None:
                sql += " AND version = ?"
                args.append(version)
            row = tx.execute(sql + " ORDER BY created_at LIMIT 1", args).fetchone()
            if row is None:
                return None
            tx.execute("UPDATE key_exports SET delivered_at = ?, delivered_to = ? "
                       "WHERE export_id = ?", [naive(self._now()), self.principal, row[0]])
        return WrappedKey.from_dict(json.loads(row[1]))

    # -- import --------------------------------------------------------------------------------
    def import_parameters(self, name: str) -> dict[str, Any]:
        """Start importing your own key material as new key ``name``.

        Returns ``public_key_pem`` (a fresh RSA-3072 key held in the HSM, for wrapping) and its
        ``public_key_sha256`` (SHA-256 of the DER SubjectPublicKeyInfo), ``token`` (pass it to
        ``import_key``), ``expires_at`` (24 h), ``oaep_hash`` and ``specs`` (what can be
        imported). The token is bound to ``name`` and good for one successful import.
        """
        with self._audited("import_parameters", name if isinstance(name, str) else None) as rec:
            validate_name(name)
            self._authorize(rec, "import_parameters", None)
            now = naive(self._now())
            oaep = _oaep_hash(self._rt.backend)
            token, handle = secrets.token_hex(16), uuid.uuid4().bytes
            expires = now + IMPORT_TTL
            with self._rt.db.write() as tx:
                self._name_free(tx, name)
                # the row first: a crash after the HSM step leaves a key that expiry sweeps away
                tx.execute("INSERT INTO import_tokens (token, name, handle, oaep_hash, created_at,"
                           " expires_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [token, name, handle.hex(), oaep, now, expires, self.principal])
            try:
                pem = _hsm_new_wrapping_key(self._rt.backend, handle, f"kl-import:{name}")
            except BaseException:
                with self._rt.db.write() as tx:
                    tx.execute("DELETE FROM import_tokens WHERE token = ?", [token])
                raise
            self._sweep_import_tokens()
            rec.detail = (f"import token {token[:8]}, RSA-{IMPORT_RSA_BITS} OAEP-{oaep.upper()}, "
                          f"expires {expires:%Y-%m-%d %H:%M} UTC")
            return {"name": name, "token": token, "public_key_pem": pem,
                    "public_key_sha256": _wrapping_public_key(pem)[1],
                    "algorithm": ALGORITHM, "oaep_hash": oaep,
                    "wrapping_key_bits": IMPORT_RSA_BITS, "specs": list(IMPORTABLE),
                    "expires_at": expires.replace(tzinfo=UTC)}

    def import_key(self, name: str, *, spec: str, wrapped: bytes, token: str,
                   purpose: str | None = None, owner: str | None = None,
                   tags: Mapping[str, str] | None = None) -> Key:
        """Create key ``name`` (version 1) from material wrapped with ``import_parameters``.

        The material is unwrapped inside the HSM into a sensitive, non-extractable AES key; it
        never exists in clear outside the HSM after your wrapping. Imported keys are not rotated
        automatically (``auto_rotate`` is off: ``rotate`` would replace your material with
        HSM-generated material); import a new key to change material.
        """
        return self._import_key(name, spec, wrapped, token, purpose, owner, tags, approval=None)

    def run_import_key(self, name: str | None, reason: str, params: dict) -> None:
        name = _request_key(name, "import")
        wrapped = params.get("wrapped")
        if isinstance(wrapped, str):
            try:
                wrapped = bytes.fromhex(wrapped)
            except ValueError:
                raise InvalidInput("the request's wrapped= must be the wrapped key as hex") from None
        self._import_key(name, params.get("spec"), wrapped, params.get("token"),
                         params.get("purpose"), params.get("owner"), params.get("tags"),
                         approval=reason)

    def _import_key(self, name: str, spec: object, wrapped: object, token: object,
                    purpose: str | None, owner: str | None, tags: Mapping[str, str] | None,
                    approval: str | None) -> Key:
        with self._audited("import_key", name if isinstance(name, str) else None) as rec:
            validate_name(name)
            self._authorize(rec, "import_key", None)
            if not isinstance(spec, str):
                raise InvalidInput(f"spec must be one of {', '.join(IMPORTABLE)}")
            kspec = parse_spec(spec)
            if kspec.name not in IMPORTABLE:
                raise InvalidInput(f"only {' and '.join(IMPORTABLE)} material can be imported, "
                                   f"not {kspec.name}")
            kpurpose = parse_purpose(purpose, kspec)
            if owner is not None:
                validate_name(owner, "owner")
            tag_json = self._tags_json(tags)
            blob = self._bytes(wrapped, "wrapped")
            if not isinstance(token, str) or not token:
                raise InvalidInput("token must be the token that import_parameters() returned")
            if len(blob) != _expected_len(kspec):
                raise InvalidInput(
                    f"wrapped must be {_expected_len(kspec)} bytes for {kspec.name} "
                    f"({IMPORT_RSA_BITS // 8} bytes of RSA-OAEP, then AES key wrap with padding "
                    f"of the {kspec.bits // 8}-byte key), not {len(blob)}")
            if approval is None:
                self._require_quorum(None, "import_key", f"importing key {name!r}")
            now = naive(self._now())
            key_id, handle = str(uuid.uuid4()), uuid.uuid4().bytes
            # unwrapping is quick: the intent and the commit share one start of the store
            with self._rt.db.hold(), HsmChange(self._rt, "import", self.principal) as change:
                with self._rt.db.write() as tx:
                    self._name_free(tx, name)
                    row = imports.token(tx, token)
                    if row is None:
                        raise InvalidInput("unknown import token; call import_parameters(name) "
                                           "and wrap the material with the public key it returns")
                    t_name, t_handle, oaep, expires, used = row
                    if t_name != name:
                        raise PolicyViolation(f"this import token was issued for key {t_name!r}, "
                                              f"not {name!r}")
                    if used is not None:
                        raise PolicyViolation("this import token was already used; get new "
                                              "import parameters")
                    if now >= expires:
                        raise PolicyViolation(f"this import token expired at "
                                              f"{expires:%Y-%m-%d %H:%M} UTC; get new import "
                                              "parameters and wrap again")
                    imports.use(tx, token, now=now, by=self.principal, key_id=key_id)
                    change.write(tx, key_id=key_id, name=name, version=1, handles=[handle],
                                 now=now)
                # a failure rolls back (the new object goes, the token stays usable)
                change.step(lambda: _hsm_unwrap_in(self._rt.backend, bytes.fromhex(t_handle),
                                                   oaep, blob, kspec, handle, f"kl:{name}:v1"))
                with change.commit() as tx:
                    why = f"imported (BYOK) with import token {token[:8]}"
                    if approval:
                        why += f"; {approval}"
                    self.lifecycle.catalog_new_key(
                        tx, key_id=key_id, name=name, spec=kspec, purpose=kpurpose,
                        state=KeyState.ACTIVE, owner=owner, now=now, period=None,
                        exportable=False, tag_json=tag_json, policy={"auto_rotate": False},
                        handle=handle, action="import", reason=why[:1000],
                        creator_is_user=self._rt.creator_is_user)
                    key = cat.load_key(tx, name)
            self._rt.catalog.refresh(force=True)
            self._sweep_import_tokens()
            rec.key, rec.version = key, 1
            rec.detail = f"imported {kspec.name} material with import token {token[:8]}"
            return key

    @staticmethod
    def _name_free(tx: Any, name: str) -> None:
        if keys_repo.name_taken(tx, name):
            raise KeyExists(f"a key or alias named {name!r} already exists")

    def _sweep_import_tokens(self) -> int:
        """Destroy the HSM wrapping keys of used or expired import tokens."""
        now = naive(self._now())
        with self._rt.db.read() as tx:
            # done (the key exists), expired unused, or a day past expiry (an import that
            # crashed midway); never one whose import is still running
            rows = tx.execute(
                """SELECT token, handle FROM import_tokens WHERE destroyed_at IS NULL AND (
                       key_id IN (SELECT key_id FROM keys)
                       OR (used_at IS NULL AND expires_at <= ?) OR expires_at <= ?)""",
                [now, now - timedelta(days=1)]).fetchall()
        for token, handle in rows:
            self._rt.backend.destroy(bytes.fromhex(handle))
            with self._rt.db.write() as tx:
                tx.execute("UPDATE import_tokens SET destroyed_at = ? WHERE token = ?",
                           [now, token])
        return len(rows)

