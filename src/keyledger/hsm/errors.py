"""The one seam where python-pkcs11 exceptions become keyledger errors with a sentence to act on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pkcs11.exceptions as px

from ..errors import ConfigError, HsmError, KeyLedgerError, KeyStateError, UnsupportedMechanism

_MESSAGES: dict[type[Exception], tuple[type[KeyLedgerError], str]] = {
    px.PinIncorrect: (ConfigError, "the HSM rejected the PIN; check the PIN source in keyledger.toml"),
    px.PinLocked: (ConfigError, "the HSM user PIN is locked; unlock it with the SO PIN"),
    px.PinExpired: (ConfigError, "the HSM user PIN has expired; set a new one with the SO PIN"),
    px.NoSuchToken: (ConfigError, "no token with the configured label; check token_label"),
    px.TokenNotPresent: (ConfigError, "the HSM token is not present; reconnect it"),
    px.UserPinNotInitialized: (ConfigError, "the token's user PIN is not initialised"),
    px.MechanismInvalid: (UnsupportedMechanism, "the HSM does not support this mechanism"),
    px.MechanismParamInvalid: (
        UnsupportedMechanism, "the HSM rejected the mechanism parameters for this operation"),
    px.KeyUnextractable: (KeyStateError, "the key is not extractable; it cannot leave the HSM"),
    px.ObjectHandleInvalid: (
        KeyStateError, "the key material is gone from the HSM; run `keyledger init` to reconcile"),
    px.KeyHandleInvalid: (
        KeyStateError, "the key material is gone from the HSM; run `keyledger init` to reconcile"),
    px.DeviceMemory: (HsmError, "the HSM is out of memory; destroy unused keys or objects"),
    px.DeviceRemoved: (HsmError, "the HSM device was removed; reconnect it and retry"),
    px.SessionClosed: (HsmError, "the HSM session closed unexpectedly; retry"),
    px.SessionHandleInvalid: (HsmError, "the HSM session closed unexpectedly; retry"),
    px.TokenWriteProtected: (HsmError, "the HSM token is write-protected"),
    px.DataLenRange: (HsmError, "the data length is outside what the HSM accepts for this key"),
    px.KeySizeRange: (UnsupportedMechanism, "the HSM does not support this key size"),
}


def translate(exc: Exception, doing: str) -> KeyLedgerError:
    for cls in type(exc).__mro__:
        if cls in _MESSAGES:
            kind, text = _MESSAGES[cls]
            return kind(f"{doing}: {text}")
    name = type(exc).__name__
    return HsmError(
        f"{doing}: the HSM reported {name}; SoftHSM2 logs details to syslog. "
        "Retry; if it persists check the module and token with `pkcs11-tool --list-slots`"
    )


@contextlib.contextmanager
def mapped(doing: str) -> Iterator[None]:
    """Run a block; any PKCS#11 exception leaves it as a KeyLedgerError."""
    try:
        yield
    except px.PKCS11Error as exc:
        raise translate(exc, doing) from None
