"""HSM backends: the protocol, the PKCS#11 implementation, the in-memory one and SoftHSM2
provisioning. Only this package imports python-pkcs11."""

from .backend import Capabilities, DecryptFailed, HsmBackend, KeyAttributes, TokenFile, UnwrapFailed

__all__ = ["Capabilities", "DecryptFailed", "HsmBackend", "KeyAttributes", "TokenFile",
           "UnwrapFailed"]
