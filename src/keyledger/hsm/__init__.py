"""HSM backends: the protocol, the PKCS#11 implementation and SoftHSM2 provisioning."""

from .backend import Capabilities, DecryptFailed, HsmBackend, KeyAttributes

__all__ = ["Capabilities", "DecryptFailed", "HsmBackend", "KeyAttributes"]
