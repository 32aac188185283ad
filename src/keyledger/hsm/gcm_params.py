"""AES-GCM mechanism parameters for the hot path, handed to python-pkcs11 as raw bytes.

python-pkcs11 turns a ``GCMParams`` object into the C ``CK_GCM_PARAMS`` struct on every call,
after comparing the mechanism with a chain of others, each comparison an attribute lookup on the
``Mechanism`` enum (~9,000 instructions of a ~150,000-instruction encrypt; issue 18). Raw bytes
are its documented escape hatch for mechanism parameters ("provide parameters ... in raw binary
form"), checked before that chain: the C mechanism then points at the bytes as they are.

``CK_GCM_PARAMS`` (PKCS#11 v2.40 and v3.0) holds *pointers* to the nonce and the AAD, so this
module keeps two buffers whose addresses never change (each pinned by a ctypes view, so it can
never be resized) and copies a call's nonce and AAD into them; the struct's bytes then depend on
the AAD's length only, and are made once per length. The HSM copies the nonce and AAD when the
operation starts (C_EncryptInit / C_DecryptInit), so the buffers serve the next call at once.
Use under the backend's ``_CALL_LOCK`` only: the buffers are the process's, shared by every
thread and backend.
"""

from __future__ import annotations

import ctypes

import pkcs11

NONCE_LEN = 12
AAD_MAX = 1024  # longer AAD (a large encryption context) takes pkcs11.GCMParams instead
_TAG_BITS = 128


class _CkGcmParams(ctypes.Structure):
    _fields_ = [("pIv", ctypes.c_void_p), ("ulIvLen", ctypes.c_ulong),
                ("ulIvBits", ctypes.c_ulong), ("pAAD", ctypes.c_void_p),
                ("ulAADLen", ctypes.c_ulong), ("ulTagBits", ctypes.c_ulong)]


_NONCE = bytearray(NONCE_LEN)  # a call's nonce goes here: _NONCE[:] = nonce
_AAD = bytearray(AAD_MAX)  # and its AAD here: _AAD[:len(aad)] = aad
_PINS = ((ctypes.c_char * NONCE_LEN).from_buffer(_NONCE),
         (ctypes.c_char * AAD_MAX).from_buffer(_AAD))
_NONCE_ADDR, _AAD_ADDR = (ctypes.addressof(pin) for pin in _PINS)

# AAD length (up to AAD_MAX) -> the CK_GCM_PARAMS bytes pointing at _NONCE and at that much
# of AAD, made by a call with that length first
_STRUCTS: dict[int, bytes] = {}


def param(nonce: bytes, aad: bytes) -> bytes | pkcs11.GCMParams:
    """The GCM mechanism parameter of one call: the raw ``CK_GCM_PARAMS`` over ``_NONCE`` and
    ``_AAD``, after copying ``nonce`` and ``aad`` into them, or a ``pkcs11.GCMParams`` for what
    does not fit them. Call under the backend's ``_CALL_LOCK``, right before the HSM call."""
    n = len(aad)
    raw = _STRUCTS.get(n)
    if raw is None and n <= AAD_MAX:  # this length's first call
        raw = _STRUCTS[n] = bytes(_CkGcmParams(
            _NONCE_ADDR, NONCE_LEN, NONCE_LEN * 8, _AAD_ADDR, n, _TAG_BITS))
    if raw is None or len(nonce) != NONCE_LEN:
        return pkcs11.GCMParams(nonce, aad, _TAG_BITS)
    _NONCE[:] = nonce
    _AAD[:n] = aad
    return raw

