"""keyledger's own API over ``keyledger serve``: ``KeyLedger.<method>`` targets.

Same door as the KMS API (SigV4, JSON 1.1 framing, the authenticated principal's ledger); the
body is the method's keyword arguments in keyledger's wire format (``keyledger.remote.wire``)
and the answer is ``{"result": <encoded value>}``. Only the methods of ``METHODS`` are served,
each with the types its arguments may have: nothing is looked up by a name the client sends.
Methods that act on the server's files (``backup``, ``export_audit``, ...) are not served; see
``NOT_SERVED``.

A ``KeyLedgerError`` answers with its class name as ``__type`` (the client raises the same
class); a call refused here before the ledger runs (unknown method, unknown or mistyped
argument) is audited once, as action ``keyledger:<method>``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from .. import errors
from ..errors import InvalidInput, KeyLedgerError
from ..remote.api import NOT_SERVED, TARGET_PREFIX
from ..remote.wire import decode, encode
from ..service import KeyLedger
from .errors import ApiError

_NONE = type(None)
S, OS = (str,), (str, _NONE)
INT, OINT, BOOL, OBOOL = (int,), (int, _NONE), (bool,), (bool, _NONE)
BYTES, MAP, OMAP = (bytes,), (dict,), (dict, _NONE)
PERIOD = (timedelta, str, _NONE)
WHEN = (datetime, _NONE)
FRAMEWORKS = (str, list, _NONE)


@dataclass(frozen=True)
class Method:
    """One served method: the facade function and each argument's allowed types."""

    func: Callable[..., Any]
    args: Mapping[str, tuple[type, ...]]
    extra: bool = False  # takes **params (``request``): extra arguments are the method's to check


def _whoami(led: KeyLedger) -> dict[str, Any]:
    """Who the server says the caller is, and what kind of home it serves."""
    return {"principal": led.principal, "simulation": led.simulation, "now": led.now()}


def _now(led: KeyLedger) -> datetime:
    return led.now()


_detectors: dict[str, Any] = {}
_detectors_lock = threading.Lock()


def _changes(led: KeyLedger) -> tuple[str, tuple]:
    """What a dashboard served through ``--url`` polls: the home's change token (catalog
    content, other writers' audit activity; reads do not count), one detector per home."""
    from ..dashboard.data import ChangeDetector  # loads Panel, once a remote dashboard polls

    with _detectors_lock:
        detector = _detectors.get(str(led.home))
        if detector is None:
            detector = _detectors[str(led.home)] = ChangeDetector(led.home, pid=-1)
        token = detector.token()
    return token.catalog, token.activity


def _rewrap_many(led: KeyLedger, ciphertexts: list[bytes], *, context: dict | None = None,
                 dry_run: bool = False) -> Any:
    """``rewrap_many`` over a list sent in the request (never a path on the server)."""
    if not all(isinstance(c, bytes) for c in ciphertexts):
        raise InvalidInput("rewrap_many over keyledger serve takes a list of ciphertexts (bytes)")
    return led.rewrap_many(ciphertexts, context=context, dry_run=dry_run, progress=False)


K = KeyLedger
METHODS: dict[str, Method] = {
    "whoami": Method(_whoami, {}),
    "now": Method(_now, {}),
    "changes": Method(_changes, {}),
    # lifecycle
    "create_key": Method(K.create_key, {
        "name": S, "spec": S, "purpose": OS, "owner": OS, "tags": OMAP,
        "rotation_period": PERIOD, "exportable": BOOL, "activate": BOOL}),
    "get_key": Method(K.get_key, {"name": S}),
    "list_keys": Method(K.list_keys, {}),
    "rotate": Method(K.rotate, {"name": S, "reason": S}),
    "enable": Method(K.enable, {"name": S, "reason": S}),
    "disable": Method(K.disable, {"name": S, "reason": S}),
    "deactivate": Method(K.deactivate, {"name": S, "reason": S}),
    "mark_compromised": Method(K.mark_compromised, {"name": S, "reason": S}),
    "schedule_deletion": Method(K.schedule_deletion, {"name": S, "days": INT, "reason": S}),
    "cancel_deletion": Method(K.cancel_deletion, {"name": S, "reason": S}),
    "destroy": Method(K.destroy, {"name": S, "reason": S}),
    "set_alias": Method(K.set_alias, {"name": S, "alias": S}),
    "remove_alias": Method(K.remove_alias, {"alias": S}),
    "move_alias": Method(K.move_alias, {"alias": S, "name": S}),
    "set_tags": Method(K.set_tags, {"name": S, "tags": MAP}),
    "set_policy": Method(K.set_policy, {
        "name": S, "rotation_period": PERIOD, "min_decryption_version": OINT,
        "min_encryption_version": OINT, "owner": OS, "quorum": OINT, "creator_is_user": OBOOL,
        "usage_limit": OINT, "auto_rotate": OBOOL, "rotation_by_purpose": OMAP,
        "rotation_by_tag": OMAP}),
    # crypto
    "encrypt": Method(K.encrypt, {"name": S, "plaintext": BYTES, "context": OMAP}),
    "decrypt": Method(K.decrypt, {"ciphertext": BYTES, "context": OMAP}),
    "rewrap": Method(K.rewrap, {"ciphertext": BYTES, "context": OMAP}),
    "encrypt_many": Method(K.encrypt_many, {"name": S, "values": (list,), "context": OMAP,
                                            "errors": S}),
    "decrypt_many": Method(K.decrypt_many, {"values": (list,), "context": OMAP, "errors": S}),
    "generate_data_key": Method(K.generate_data_key, {"name": S, "context": OMAP}),
    "envelope_encrypt": Method(K.envelope_encrypt, {"name": S, "data": BYTES, "context": OMAP}),
    "envelope_decrypt": Method(K.envelope_decrypt, {"blob": BYTES, "context": OMAP}),
    "sign": Method(K.sign, {"name": S, "message": BYTES}),
    "verify": Method(K.verify, {"name": S, "message": BYTES, "signature": BYTES,
                                "version": OINT}),
    "mac": Method(K.mac, {"name": S, "message": BYTES}),
    "verify_mac": Method(K.verify_mac, {"name": S, "message": BYTES, "tag": BYTES,
                                        "version": OINT}),
    "public_key_pem": Method(K.public_key_pem, {"name": S, "version": OINT}),
    # HSM
    "capabilities": Method(K.capabilities, {}),
    "key_attributes": Method(K.key_attributes, {"name": S, "version": OINT}),
    # audit
    "flush_audit": Method(K.flush_audit, {}),
    "audit": Method(K.audit, {
        "key": OS, "principal": OS, "action": OS, "outcome": OS, "since": WHEN, "until": WHEN,
        "limit": OINT, "offset": INT, "newest_first": BOOL}),
    "query": Method(K.query, {"sql": S, "params": (list, dict, _NONE), "label": OS,
                              "timeout_s": (int, float, _NONE)}),
    "verify_audit": Method(K.verify_audit, {}),
    "accept_unproven": Method(K.accept_unproven, {"journal": S, "through_jseq": INT,
                                                  "reason": S}),
    # grants and quorum
    "grant": Method(K.grant, {"name": S, "principal": S, "role": S}),
    "revoke": Method(K.revoke, {"name": S, "principal": S, "role": OS}),
    "grants": Method(K.grants, {"name": OS}),
    "request": Method(K.request, {"action": S, "name": S, "reason": S}, extra=True),
    "approve": Method(K.approve, {"request_id": S}),
    "requests": Method(K.requests, {"status": OS}),
    "acknowledge_custody": Method(K.acknowledge_custody, {"statement": S}),
    # maintenance
    "run_due": Method(K.run_due, {"now": WHEN, "compliance": BOOL}),
    "version_usage": Method(K.version_usage, {"name": OS}),
    "rewrap_many": Method(_rewrap_many, {"ciphertexts": (list,), "context": OMAP,
                                         "dry_run": BOOL}),
    "trim": Method(K.trim, {"name": S, "min_version": INT}),
    # import and export
    "export_key": Method(K.export_key, {"name": S, "wrapping_key_pem": (str, bytes),
                                        "version": OINT}),
    "import_parameters": Method(K.import_parameters, {"name": S}),
    "import_key": Method(K.import_key, {"name": S, "spec": S, "wrapped": BYTES, "token": S,
                                        "purpose": OS, "owner": OS, "tags": OMAP}),
    # backups (the record of them; writing one is the server host's job)
    "backups": Method(K.backups, {}),
    # compliance
    "compliance": Method(K.compliance, {"frameworks": FRAMEWORKS, "now": WHEN,
                                        "include_accepted": BOOL}),
    "compliance_trend": Method(K.compliance_trend, {"frameworks": FRAMEWORKS}),
    "findings": Method(K.findings, {"frameworks": FRAMEWORKS, "include_accepted": BOOL}),
    "compliance_rules": Method(K.compliance_rules, {}),
    "accept_finding": Method(K.accept_finding, {"rule_id": S, "key": OS, "reason": S,
                                                "until": (datetime, timedelta, str)}),
    "compliance_exceptions": Method(K.compliance_exceptions, {}),
    # access keys of keyledger serve
    "create_access_key": Method(K.create_access_key, {"principal": S, "key_id": OS,
                                                      "secret": OS}),
    "access_keys": Method(K.access_keys, {}),
    "disable_access_key": Method(K.disable_access_key, {"access_key_id": S}),
    "enable_access_key": Method(K.enable_access_key, {"access_key_id": S}),
    "delete_access_key": Method(K.delete_access_key, {"access_key_id": S}),
}

def dispatch(ledger: KeyLedger, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """Run ``method`` for the ledger's principal; ``{"result": ...}`` or ``ApiError``."""
    try:
        call = METHODS.get(method)
        if call is None:
            _refuse(ledger, method, _unknown(method))
        kwargs = _arguments(ledger, method, call, body)
        return {"result": encode(call.func(ledger, **kwargs))}
    except KeyLedgerError as exc:  # audited by the ledger call (or _refuse) that raised it
        raise error_of(exc) from None


def error_of(exc: KeyLedgerError) -> ApiError:
    """The answer to a ``KeyLedgerError``: the name of its class in keyledger.errors (its own,
    or the nearest base there) and its message (keyledger's messages hold no secrets), so the
    client raises the same class."""
    name = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in errors.__all__)
    return ApiError(name, str(exc)[:2000], 400)


def _unknown(method: str) -> InvalidInput:
    why = NOT_SERVED.get(method)
    if why is not None:
        return InvalidInput(f"KeyLedger.{method} is not served remotely: {why}")
    return InvalidInput(f"keyledger serve has no method {method[:80]!r} (KeyLedger.<method> "
                        "targets: see docs/service.md)")


def _arguments(ledger: KeyLedger, method: str, call: Method,
               body: dict[str, Any]) -> dict[str, Any]:
    """The decoded keyword arguments, each of an allowed type, bound to the signature."""
    try:
        kwargs = decode(body)
    except InvalidInput as exc:
        _refuse(ledger, method, exc)
    for name, value in kwargs.items():
        allowed = call.args.get(name)
        if allowed is None and not call.extra:
            _refuse(ledger, method, InvalidInput(
                f"KeyLedger.{method} takes no argument {name[:60]!r}"))
        if allowed is not None and not _is(value, allowed):
            _refuse(ledger, method, InvalidInput(
                f"KeyLedger.{method}: {name} must be {_names(allowed)}, not "
                f"{type(value).__name__}"))
    try:
        inspect.signature(call.func).bind(ledger, **kwargs)
    except TypeError as exc:
        _refuse(ledger, method, InvalidInput(f"KeyLedger.{method}: {exc}"))
    return kwargs


def _is(value: object, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in allowed:
        return False  # True is an int in Python, never on this wire
    return isinstance(value, allowed)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is _NONE else t.__name__ for t in types)


def _refuse(ledger: KeyLedger, method: str, exc: KeyLedgerError) -> NoReturn:
    """Audit a refusal made before the ledger runs (one record), then raise it."""
    with ledger._audited(f"keyledger:{method[:60]}", None) as rec:
        rec.detail = str(exc)[:500]
        raise exc
    raise exc  # (the record never swallows the error; this line tells the type checker)


__all__ = ["METHODS", "NOT_SERVED", "TARGET_PREFIX", "Method", "dispatch", "error_of"]
