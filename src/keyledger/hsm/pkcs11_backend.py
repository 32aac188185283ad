"""PKCS#11 backend over python-pkcs11.

One login per process and token; one session per thread (PKCS#11 sessions run one operation at
a time); key objects cached per thread by CKA_ID, never found by listing the token.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pkcs11
import pkcs11.exceptions as px
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from ..config import HsmConfig
from ..errors import ConfigError, HsmError, InvalidInput, KeyStateError, UnsupportedMechanism
from ..model import Family, KeySpec
from . import gcm_params
from .backend import Capabilities, DecryptFailed, KeyAttributes, TokenFile, UnwrapFailed
from .errors import mapped, translate
from .softhsm import read_token_dir, token_dir

_PSS = (Mechanism.SHA256, MGF.SHA256, 32)
_EC_HASH = {"secp256r1": hashlib.sha256, "secp384r1": hashlib.sha384}
_CRYPTO_CURVES = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}
_CAP = MechanismFlag
# How long a lookup by CKA_ID waits for an object to appear (see Pkcs11Backend._look_up);
# it holds this process's PKCS#11 lock meanwhile, so only genuinely missing material pays it.
_APPEAR_WAIT_S = 2.0
_APPEAR_PAUSE_S = 0.002  # first pause; doubled up to 50 ms
_AES_GCM = Mechanism.AES_GCM
_gcm_param = gcm_params.param  # the GCM parameter of one hot-path call (raw CK_GCM_PARAMS)
_SECRET = ObjectClass.SECRET_KEY
_STALE = (px.ObjectHandleInvalid, px.KeyHandleInvalid)  # a cached object destroyed elsewhere
# what a failed AES-GCM authentication (tampered data, wrong AAD) raises in SoftHSM2
_GCM_REFUSED = (px.GeneralError, px.EncryptedDataInvalid, px.EncryptedDataLenRange,
                px.DataInvalid, px.DataLenRange, px.FunctionFailed)
_OAEP = {"sha1": (Mechanism.SHA_1, MGF.SHA1, None), "sha256": (Mechanism.SHA256, MGF.SHA256, None)}


# python-pkcs11 calls C_Initialize(NULL), which tells the module the application is single
# threaded; SoftHSM2 then disables its own mutexes, and concurrent calls from two threads fail
# with GeneralError (measured). Every PKCS#11 call in this process is therefore serialised here.
_CALL_LOCK = threading.RLock()


def _serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CALL_LOCK:
            return method(*args, **kwargs)

    return wrapper


def _gcm_decrypt(key: Any, data: bytes, param: Any) -> bytes:
    """AES-GCM decrypt with a key object; a failed authentication is ``DecryptFailed``."""
    try:
        return key.decrypt(data, mechanism=_AES_GCM, mechanism_param=param)
    except _GCM_REFUSED as exc:
        raise DecryptFailed(type(exc).__name__) from None


class _Process:
    """Process-wide state: PKCS#11 libraries can be loaded (and initialised) once per process."""

    lock = _CALL_LOCK  # loading, login and teardown are PKCS#11 calls too
    active_conf: dict[str, str | None] = {}  # module -> SOFTHSM2_CONF it was initialised with
    backends: dict[tuple[str, str | None, str], tuple[Pkcs11Backend, int]] = {}


def connect(cfg: HsmConfig) -> Pkcs11Backend:
    """A shared, logged-in backend for this process and token (reference counted)."""
    conf = str(cfg.softhsm2_conf) if cfg.softhsm2_conf else None
    ident = (cfg.module, conf, cfg.token_label)
    with _Process.lock:
        if ident in _Process.backends:
            backend, refs = _Process.backends[ident]
            _Process.backends[ident] = (backend, refs + 1)
            return backend
        in_use = [k for k in _Process.backends if k[0] == cfg.module and k[1] != conf]
        if in_use:
            raise ConfigError(
                f"this process already uses {cfg.module} with SOFTHSM2_CONF={in_use[0][1]}; "
                "a PKCS#11 library has one configuration per process: close the other home "
                "first or use it from another process"
            )
        lib = _load(cfg, conf)
        alone = not any(k[0] == cfg.module for k in _Process.backends)
        backend = Pkcs11Backend(cfg, *_log_in(cfg, lib, may_reinitialize=alone))
        _Process.backends[ident] = (backend, 1)
        return backend


def _load(cfg: HsmConfig, conf: str | None) -> Any:
    if not os.path.exists(cfg.module):
        raise ConfigError(
            f"PKCS#11 module {cfg.module} does not exist; install it (softhsm2 for the embedded "
            "HSM) or fix module in keyledger.toml / KEYLEDGER_PKCS11_MODULE"
        )
    if conf is not None:
        os.environ["SOFTHSM2_CONF"] = conf
    try:
        lib = pkcs11.lib(cfg.module)
        if cfg.module in _Process.active_conf and _Process.active_conf[cfg.module] != conf:
            lib.reinitialize()  # re-reads SOFTHSM2_CONF (SoftHSM2 loads its config in C_Initialize)
    except px.PKCS11Error as exc:
        raise ConfigError(
            f"cannot load PKCS#11 module {cfg.module} ({type(exc).__name__}); check that it is "
            "a PKCS#11 library for this platform"
        ) from None
    _Process.active_conf[cfg.module] = conf
    return lib


# SoftHSM2 rewrites token.object on every login, and a process that starts (C_Initialize) or
# asks for the token while another process logs in can read it half-written: it then reports
# GeneralError, NoSuchToken or UserPinNotInitialized, and keeps that broken view until it is
# re-initialised (measured: ~4% of opens with four processes starting at once). Such failures
# are retried after a pause, re-initialising the library when no other token of it is in use.
_TRANSIENT_OPEN_ERRORS = (px.GeneralError, px.NoSuchToken, px.UserPinNotInitialized,
                          px.TokenNotRecognised, px.DeviceError)
_OPEN_ATTEMPTS = 5
_OPEN_PAUSE = 0.02  # seconds before the first retry; doubled each time


def _log_in(cfg: HsmConfig, lib: Any, *, may_reinitialize: bool) -> tuple[Any, Any]:
    """Find the token and log in: ``(token, logged-in rw session)``; transient failures retried."""
    pin = cfg.read_pin()
    doing = "opening the HSM"
    failure: Exception | None = None
    for attempt in range(_OPEN_ATTEMPTS):
        if attempt:
            time.sleep(_OPEN_PAUSE * 2 ** (attempt - 1))
            if may_reinitialize:
                _reinitialize(lib, doing)
        doing = "opening the HSM"
        try:
            token = lib.get_token(token_label=cfg.token_label)
            doing = "logging in to the HSM"
            return token, _logged_in_session(token, pin)
        except (px.PinIncorrect, px.PinInvalid, px.PinLenRange):
            source = f"${cfg.pin_env}" if cfg.pin_env else str(cfg.pin_file)
            raise ConfigError(
                f"the HSM rejected the PIN read from {source}; put the token's user PIN there"
            ) from None  # never retried: each wrong try counts towards locking the PIN
        except _TRANSIENT_OPEN_ERRORS as exc:
            failure = exc
        except px.PKCS11Error as exc:
            raise _open_error(cfg, exc, doing) from None
    assert failure is not None  # every attempt failed with a transient error
    raise _open_error(cfg, failure, doing) from None


def _logged_in_session(token: Any, pin: str) -> Any:
    try:
        return token.open(rw=True, user_pin=pin)
    except px.UserAlreadyLoggedIn:  # another session of this process logged the token in
        return token.open(rw=True)


def _reinitialize(lib: Any, doing: str) -> None:
    with mapped(doing):
        lib.reinitialize()


def _open_error(cfg: HsmConfig, exc: Exception, doing: str) -> Exception:
    if isinstance(exc, (px.NoSuchToken, px.MultipleTokensReturned)):
        return ConfigError(
            f"no single token labelled {cfg.token_label!r} in {cfg.module}; check token_label "
            "(list tokens with `pkcs11-tool --module <module> --list-slots`)"
        )
    return translate(exc, doing)


def embedded_confs_in_use() -> list[str]:
    """The SoftHSM2 configurations this process has loaded a token with (one per process)."""
    with _Process.lock:
        return [k[1] for k in _Process.backends if k[1] is not None]


def release(backend: Pkcs11Backend) -> None:
    with _Process.lock:
        for ident, (b, refs) in list(_Process.backends.items()):
            if b is backend:
                if refs <= 1:
                    del _Process.backends[ident]
                    backend.close()
                else:
                    _Process.backends[ident] = (b, refs - 1)


# What _probe_oaep_sha256 found, per (module path, manufacturer, token model) in this process.
_OAEP_SHA256_BY_MODEL: dict[tuple[str, str, str], bool] = {}


class Pkcs11Backend:
    def __init__(self, cfg: HsmConfig, token: Any, login_session: Any) -> None:
        self._cfg = cfg
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._lock = threading.Lock()
        self._token = token
        self._login_session = login_session
        self._sessions.append(self._login_session)
        self._local.session = self._login_session
        self._local.keys = {}
        self._caps: Capabilities | None = None

    def __repr__(self) -> str:
        return f"<Pkcs11Backend module={self._cfg.module!r} token={self._cfg.token_label!r}>"

    # -- sessions and lookups --------------------------------------------------------------
    def _session(self) -> Any:
        s = getattr(self._local, "session", None)
        if s is None:
            with mapped("opening an HSM session"):
                s = self._token.open(rw=True)
            with self._lock:
                self._sessions.append(s)
            self._local.session = s
            self._local.keys = {}
        return s

    def _find(self, handle: bytes, cls: ObjectClass) -> Any:
        keys: dict = self._local.__dict__.setdefault("keys", {})
        found = keys.get((handle, cls))
        if found is None:
            found = keys[(handle, cls)] = self._look_up(handle, cls)
        return found

    def _look_up(self, handle: bytes, cls: ObjectClass) -> Any:
        """Find an object by CKA_ID, waiting a moment for one another process just made.

        The catalog names a version only after its object exists, yet SoftHSM2 may not show
        this process an object another process created for a while (measured: up to ~0.1 s
        with three processes rotating and using one key; it re-reads the token only after
        the token's generation changes, and may have read the new file half-written), and a
        lookup during another process's token rewrite can fail with GeneralError. Both are
        retried until ``_APPEAR_WAIT_S``; only then is the material reported missing.
        """
        deadline = time.monotonic() + _APPEAR_WAIT_S
        pause = _APPEAR_PAUSE_S
        while True:
            try:
                return self._session().get_key(object_class=cls, id=handle)
            except (px.NoSuchKey, px.GeneralError) as exc:
                if time.monotonic() >= deadline:
                    if isinstance(exc, px.NoSuchKey):
                        raise KeyStateError(
                            "the key material for this version is missing from the HSM; "
                            "run `keyledger init` to reconcile the catalog with the HSM"
                        ) from None
                    raise translate(exc, "looking up a key in the HSM") from None
            except px.PKCS11Error as exc:
                raise translate(exc, "looking up a key in the HSM") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _cached(self, handle: bytes, cls: ObjectClass) -> Any:
        """The key object this thread already found, or None."""
        keys = self._local.__dict__.get("keys")
        return None if keys is None else keys.get((handle, cls))

    def _run(self, handle: bytes, cls: ObjectClass, doing: str, op: Callable[[Any], Any]) -> Any:
        """Run ``op(key)``; if a cached handle went stale (destroyed elsewhere), look it up once more."""
        for attempt in (0, 1):
            key = self._find(handle, cls)
            try:
                return op(key)
            except _STALE:
                self._local.keys.pop((handle, cls), None)
                if attempt:
                    raise translate(px.ObjectHandleInvalid(), doing) from None
            except px.PKCS11Error as exc:
                raise translate(exc, doing) from None
        raise HsmError(doing)  # pragma: no cover

    # -- capabilities ----------------------------------------------------------------------
    @_serialized
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            with mapped("probing the HSM's mechanisms"):
                mechs = self._token.slot.get_mechanisms()
            names = frozenset(m.name for m in mechs if hasattr(m, "name"))
            supports = {
                "AES_GCM": Mechanism.AES_GCM in mechs,
                "AES_KEY_WRAP_PAD": Mechanism.AES_KEY_WRAP_PAD in mechs,
                "SHA256_HMAC": Mechanism.SHA256_HMAC in mechs,
                "RSA_PSS_SHA256": Mechanism.SHA256_RSA_PKCS_PSS in mechs,
                "ECDSA": Mechanism.ECDSA in mechs,
                "ECDSA_SHA256": Mechanism.ECDSA_SHA256 in mechs,
                "EDDSA": Mechanism.EDDSA in mechs,
                "RSA_OAEP_SHA256": self._probe_oaep_sha256(mechs),
            }
            self._caps = Capabilities(
                self._cfg.module, self._token.manufacturer_id.strip(), names, supports
            )
        return self._caps

    def _probe_oaep_sha256(self, mechs: set) -> bool:
        """Whether the token encrypts with RSA-OAEP over SHA-256 (BYOK's wrapping), found by
        trying it on a throwaway key pair, once per process for a module and token model (an
        RSA-2048 key pair costs SoftHSM2 0.3-1 s of CPU)."""
        if Mechanism.RSA_PKCS_OAEP not in mechs:
            return False
        model = (self._cfg.module, self._token.manufacturer_id, self._token.model)
        if model not in _OAEP_SHA256_BY_MODEL:
            try:
                pub, _ = self._session().generate_keypair(KeyType.RSA, 2048, store=False)
                pub.encrypt(b"probe", mechanism=Mechanism.RSA_PKCS_OAEP,
                            mechanism_param=(Mechanism.SHA256, MGF.SHA256, None))
                _OAEP_SHA256_BY_MODEL[model] = True
            except px.PKCS11Error:
                _OAEP_SHA256_BY_MODEL[model] = False
        return _OAEP_SHA256_BY_MODEL[model]

    # -- lifecycle ---------------------------------------------------------------------------
    @_serialized
    def generate(self, spec: KeySpec, handle: bytes, label: str, *, exportable: bool) -> None:
        s = self._session()
        secret = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: bool(exportable)}
        with mapped(f"generating a {spec.name} key in the HSM"):
            if spec.family is Family.AES:
                s.generate_key(KeyType.AES, spec.bits, id=handle, label=label, store=True,
                               capabilities=_CAP.ENCRYPT | _CAP.DECRYPT | _CAP.WRAP | _CAP.UNWRAP,
                               template=secret)
            elif spec.family is Family.HMAC:
                s.generate_key(KeyType.GENERIC_SECRET, spec.bits, id=handle, label=label,
                               store=True, capabilities=_CAP.SIGN | _CAP.VERIFY, template=secret)
            elif spec.family is Family.RSA:
                s.generate_keypair(KeyType.RSA, spec.bits, id=handle, label=label, store=True,
                                   capabilities=_CAP.SIGN | _CAP.VERIFY,
                                   private_template=secret)
            else:
                curve = "1.3.101.112" if spec.family is Family.EDDSA else str(spec.curve)
                key_type = KeyType.EC_EDWARDS if spec.family is Family.EDDSA else KeyType.EC
                params = s.create_domain_parameters(
                    key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
                    local=True)
                params.generate_keypair(id=handle, label=label, store=True,
                                        capabilities=_CAP.SIGN | _CAP.VERIFY,
                                        private_template=secret)

    @_serialized
    def exists(self, handle: bytes) -> bool:
        with mapped("looking up a key in the HSM"):
            return next(iter(self._session().get_objects({Attribute.ID: handle})), None) is not None

    @_serialized
    def destroy(self, handle: bytes) -> int:
        s = self._session()
        with mapped("destroying key material in the HSM"):
            objs = list(s.get_objects({Attribute.ID: handle}))
            for obj in objs:
                obj.destroy()
        for cache in (self._local.__dict__.get("keys", {}),):
            for k in [k for k in cache if k[0] == handle]:
                cache.pop(k, None)
        return len(objs)

    @_serialized
    def attributes(self, handle: bytes) -> KeyAttributes:
        with mapped("reading key attributes"):
            obj = next(iter(self._session().get_objects(
                {Attribute.ID: handle, Attribute.PRIVATE: True})), None)
            if obj is None:
                raise KeyStateError("the key material for this version is missing from the HSM")
            a = obj.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE,
                                    Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE])
        return KeyAttributes(bool(a[Attribute.SENSITIVE]), bool(a[Attribute.EXTRACTABLE]),
                             bool(a[Attribute.ALWAYS_SENSITIVE]),
                             bool(a[Attribute.NEVER_EXTRACTABLE]))

    # -- symmetric -----------------------------------------------------------------------------
    # encrypt_gcm and decrypt_gcm are the hot path: the key object cached in this thread is
    # used directly (no wrapper, no closure); a miss or a stale handle takes ``_run``. Their
    # data is always bytes, so they call python-pkcs11's one-shot ``_encrypt`` / ``_decrypt``,
    # which its public ``encrypt`` / ``decrypt`` call for bytes after type checks, through a
    # Python frame and a **kwargs dict (~4,000 instructions a call; tests/test_layers.py).
    def encrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        with _CALL_LOCK:
            param = _gcm_param(nonce, aad)
            try:  # _cached, inline: the hot path
                key = self._local.keys[(handle, _SECRET)]
            except (AttributeError, KeyError):  # this thread's first call, or with this key
                key = None
            if key is not None:
                try:
                    return key._encrypt(plaintext, _AES_GCM, param)  # (see above)
                except _STALE:
                    self._local.keys.pop((handle, ObjectClass.SECRET_KEY), None)
                except px.PKCS11Error as exc:
                    raise translate(exc, "encrypting in the HSM") from None
            return self._run(handle, ObjectClass.SECRET_KEY, "encrypting in the HSM",
                             lambda k: k.encrypt(plaintext, mechanism=_AES_GCM,
                                                 mechanism_param=param))

    def decrypt_gcm(self, handle: bytes, nonce: bytes, aad: bytes, data: bytes) -> bytes:
        with _CALL_LOCK:
            param = _gcm_param(nonce, aad)
            try:  # _cached, inline: the hot path
                key = self._local.keys[(handle, _SECRET)]
            except (AttributeError, KeyError):  # this thread's first call, or with this key
                key = None
            if key is not None:
                try:
                    return key._decrypt(data, _AES_GCM, param)
                except _GCM_REFUSED as exc:  # (_gcm_decrypt, inline: one call less per call)
                    raise DecryptFailed(type(exc).__name__) from None
                except _STALE:
                    self._local.keys.pop((handle, ObjectClass.SECRET_KEY), None)
                except px.PKCS11Error as exc:
                    raise translate(exc, "decrypting in the HSM") from None
            return self._run(handle, ObjectClass.SECRET_KEY, "decrypting in the HSM",
                             lambda k: _gcm_decrypt(k, data, param))

    # -- batches (services/batch.py): one lock, one session and one key lookup for N items ----
    @_serialized
    def encrypt_gcm_many(self, handle: bytes,
                         items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes]:
        out: list[bytes] = []

        def op(k: Any) -> list[bytes]:
            encrypt, append, params = k.encrypt, out.append, pkcs11.GCMParams
            for nonce, aad, data in items[len(out):]:  # a stale handle found again: go on
                append(encrypt(data, mechanism=Mechanism.AES_GCM,
                               mechanism_param=params(nonce, aad, 128)))
            return out

        return self._run(handle, ObjectClass.SECRET_KEY, "encrypting in the HSM", op)

    @_serialized
    def decrypt_gcm_many(self, handle: bytes,
                         items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bytes | None]:
        out: list[bytes | None] = []

        def op(k: Any) -> list[bytes | None]:
            decrypt, append, params = k.decrypt, out.append, pkcs11.GCMParams
            for nonce, aad, data in items[len(out):]:  # a stale handle found again: go on
                try:
                    append(decrypt(data, mechanism=Mechanism.AES_GCM,
                                   mechanism_param=params(nonce, aad, 128)))
                except _GCM_REFUSED:
                    append(None)
            return out

        return self._run(handle, ObjectClass.SECRET_KEY, "decrypting in the HSM", op)

    @_serialized
    def mac(self, handle: bytes, message: bytes) -> bytes:
        return self._run(handle, ObjectClass.SECRET_KEY, "computing a MAC in the HSM",
                         lambda k: k.sign(message, mechanism=Mechanism.SHA256_HMAC))

    @_serialized
    def verify_mac(self, handle: bytes, message: bytes, tag: bytes) -> bool:
        def op(k: Any) -> bool:
            try:
                return bool(k.verify(message, tag, mechanism=Mechanism.SHA256_HMAC))
            except (px.SignatureInvalid, px.SignatureLenRange):
                return False

        return self._run(handle, ObjectClass.SECRET_KEY, "verifying a MAC in the HSM", op)

    # -- asymmetric ------------------------------------------------------------------------------
    @_serialized
    def sign(self, spec: KeySpec, handle: bytes, message: bytes) -> bytes:
        doing = f"signing with a {spec.name} key in the HSM"
        if spec.family is Family.RSA:
            return self._run(handle, ObjectClass.PRIVATE_KEY, doing,
                             lambda k: k.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                                              mechanism_param=_PSS))
        if spec.family is Family.EDDSA:
            return self._run(handle, ObjectClass.PRIVATE_KEY, doing,
                             lambda k: k.sign(message, mechanism=Mechanism.EDDSA))
        digest = _EC_HASH[str(spec.curve)](message).digest()  # ECDSA_SHA256 is absent in SoftHSM2
        raw = self._run(handle, ObjectClass.PRIVATE_KEY, doing,
                        lambda k: k.sign(digest, mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half]), int.from_bytes(raw[half:]))

    @_serialized
    def verify(self, spec: KeySpec, handle: bytes, message: bytes, signature: bytes) -> bool:
        doing = f"verifying with a {spec.name} key in the HSM"
        if spec.family is Family.RSA:
            mech, param, data = Mechanism.SHA256_RSA_PKCS_PSS, _PSS, message
        elif spec.family is Family.EDDSA:
            mech, param, data = Mechanism.EDDSA, None, message
        else:
            mech, param, data = Mechanism.ECDSA, None, _EC_HASH[str(spec.curve)](message).digest()
            try:
                r, s_ = decode_dss_signature(signature)
                size = (spec.bits + 7) // 8
                signature = r.to_bytes(size) + s_.to_bytes(size)
            except (ValueError, OverflowError):
                return False

        def op(k: Any) -> bool:
            try:
                return bool(k.verify(data, signature, mechanism=mech, mechanism_param=param))
            except (px.SignatureInvalid, px.SignatureLenRange, px.DataLenRange,
                    px.GeneralError):
                return False

        return self._run(handle, ObjectClass.PUBLIC_KEY, doing, op)

    @_serialized
    def public_key_der(self, spec: KeySpec, handle: bytes) -> bytes:
        doing = "reading a public key from the HSM"

        def op(k: Any) -> Any:
            if spec.family is Family.RSA:
                n = int.from_bytes(k[Attribute.MODULUS])
                e = int.from_bytes(k[Attribute.PUBLIC_EXPONENT])
                return rsa.RSAPublicNumbers(e, n).public_key()
            point = bytes(k[Attribute.EC_POINT])
            point = _strip_octet_string(point)
            if spec.family is Family.EDDSA:
                return ed25519.Ed25519PublicKey.from_public_bytes(point)
            curve = _CRYPTO_CURVES[str(spec.curve)]()
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)

        pub = self._run(handle, ObjectClass.PUBLIC_KEY, doing, op)
        return pub.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)

    # -- data objects (audit head) -----------------------------------------------------------------
    @_serialized
    def put_data(self, label: str, value: bytes) -> None:
        """Store ``value`` under ``label``; SoftHSM2 makes CKA_VALUE read-only, so the new object
        is created before the old ones are destroyed (a crash in between leaves both)."""
        s = self._session()
        with mapped("writing a data object to the HSM"):
            old = list(s.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}))
            s.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                             Attribute.PRIVATE: True, Attribute.LABEL: label,
                             Attribute.APPLICATION: "keyledger", Attribute.VALUE: value})
            for obj in old:
                obj.destroy()

    @_serialized
    def get_data(self, label: str) -> list[bytes]:
        with mapped("reading a data object from the HSM"):
            objs = self._session().get_objects({Attribute.CLASS: ObjectClass.DATA,
                                                Attribute.LABEL: label})
            return [bytes(o[Attribute.VALUE]) for o in objs]

    # -- key transport (byok.py) -------------------------------------------------------------
    # The CKM_RSA_AES_KEY_WRAP construction in two steps (SoftHSM 2.6.1 lacks the mechanism).
    @_serialized
    def wrap_out(self, spec: KeySpec, handle: bytes, wrapping_key: rsa.RSAPublicKey,
                 oaep_hash: str) -> bytes:
        secret = spec.family in (Family.AES, Family.HMAC)
        doing = f"wrapping a {spec.name} key for export"
        nums = wrapping_key.public_numbers()
        target = self._find(handle, ObjectClass.SECRET_KEY if secret else ObjectClass.PRIVATE_KEY)
        s = self._session()
        made: list[Any] = []
        try:
            with mapped(doing):
                rsa_obj = s.create_object({
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
                    Attribute.TOKEN: False, Attribute.PRIVATE: False,
                    Attribute.MODULUS: nums.n.to_bytes((wrapping_key.key_size + 7) // 8, "big"),
                    Attribute.PUBLIC_EXPONENT: nums.e.to_bytes((nums.e.bit_length() + 7) // 8,
                                                               "big"),
                    Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False})
                made.append(rsa_obj)
                eph = s.generate_key(KeyType.AES, 256, store=False, capabilities=_CAP.WRAP,
                                     template={Attribute.SENSITIVE: True,
                                               Attribute.EXTRACTABLE: True})
                made.append(eph)
                head = rsa_obj.wrap_key(eph, mechanism=Mechanism.RSA_PKCS_OAEP,
                                        mechanism_param=_OAEP[oaep_hash])
                try:
                    body = eph.wrap_key(target, mechanism=Mechanism.AES_KEY_WRAP_PAD)
                except px.KeyNotWrappable:
                    raise UnsupportedMechanism(
                        f"the HSM cannot export {spec.name} keys (it refuses to wrap them); "
                        "only keys it can wrap leave it") from None
        finally:
            for obj in reversed(made):
                _destroy_quietly(obj)
        return bytes(head) + bytes(body)

    @_serialized
    def new_unwrap_key(self, handle: bytes, label: str, bits: int) -> bytes:
        with mapped("generating the import wrapping key in the HSM"):
            pub, _ = self._session().generate_keypair(
                KeyType.RSA, bits, id=handle, label=label, store=True,
                public_template={Attribute.WRAP: True, Attribute.ENCRYPT: True,
                                 Attribute.VERIFY: False},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.UNWRAP: True, Attribute.DECRYPT: False,
                                  Attribute.SIGN: False},
                capabilities=_CAP.WRAP | _CAP.UNWRAP)
            n = int.from_bytes(pub[Attribute.MODULUS], "big")
            e = int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    @_serialized
    def unwrap_in(self, unwrap_handle: bytes, oaep_hash: str, blob: bytes, spec: KeySpec,
                  handle: bytes, label: str) -> None:
        priv = self._find(unwrap_handle, ObjectClass.PRIVATE_KEY)
        with mapped("reading the import wrapping key"):
            n_len = len(priv[Attribute.MODULUS])
        try:
            eph = priv.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob[:n_len],
                                  mechanism=Mechanism.RSA_PKCS_OAEP,
                                  mechanism_param=_OAEP[oaep_hash], store=False,
                                  capabilities=_CAP.UNWRAP,
                                  template={Attribute.SENSITIVE: True,
                                            Attribute.EXTRACTABLE: False})
        except (px.MechanismInvalid, px.MechanismParamInvalid) as exc:
            raise translate(exc, "unwrapping the ephemeral key") from None
        except px.PKCS11Error:
            raise UnwrapFailed("ephemeral key") from None
        try:
            key = eph.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, blob[n_len:],
                mechanism=Mechanism.AES_KEY_WRAP_PAD, id=handle, label=label, store=True,
                capabilities=_CAP.ENCRYPT | _CAP.DECRYPT | _CAP.WRAP | _CAP.UNWRAP,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.PRIVATE: True})
        except px.PKCS11Error:
            raise UnwrapFailed("key material") from None
        finally:
            _destroy_quietly(eph)
        try:  # SoftHSM accepts any length as "AES": prove it is a usable AES key
            key.encrypt(b"", mechanism=Mechanism.AES_GCM,
                        mechanism_param=pkcs11.GCMParams(bytes(12), b"", 128))
        except px.PKCS11Error:
            _destroy_quietly(key)
            raise InvalidInput("the unwrapped material is not a valid AES key of the "
                               "declared size") from None

    # -- process-wide exclusion and backup ---------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with _CALL_LOCK:
            yield

    def snapshot_token(self) -> list[TokenFile]:
        if not self._cfg.embedded or self._cfg.softhsm2_conf is None:
            raise ConfigError(
                f"this home's HSM ({self._cfg.module}) keeps its keys outside the home: back "
                "them up with the HSM vendor's procedure (key material never leaves in clear)")
        root = token_dir(self._cfg.softhsm2_conf)
        with self.exclusive():  # no PKCS#11 call of this process touches the token meanwhile
            return read_token_dir(root)

    @_serialized
    def close(self) -> None:
        with self._lock:
            for s in self._sessions:
                try:
                    s.close()
                except px.PKCS11Error:
                    pass
            self._sessions.clear()
        self._local = threading.local()


def _destroy_quietly(obj: Any) -> None:
    try:
        obj.destroy()
    except px.PKCS11Error:
        pass


def _strip_octet_string(point: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the raw point; unwrap it if so."""
    if len(point) > 2 and point[0] == 0x04:
        if point[1] < 0x80 and point[1] == len(point) - 2:
            return point[2:]
        if point[1] == 0x81 and point[2] == len(point) - 3:
            return point[3:]
    return point
