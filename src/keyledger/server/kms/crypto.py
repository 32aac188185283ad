"""Data operations: encrypt, decrypt, re-encrypt, data keys, random, signatures, MACs.

Ciphertext blobs are keyledger's own self-describing format (docs/ciphertext.md), so Decrypt
needs no KeyId; EncryptionContext is keyledger's context (bound as AAD). Each operation is one
keyledger call (ReEncrypt between two keys or contexts: a decrypt and an encrypt record).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization

from ... import ciphertext as ct
from ...errors import InvalidCiphertext, InvalidInput
from ...model import Key, Purpose
from ..errors import ApiError
from .call import Call
from .faults import Recorded, unsupported, usage
from .fields import MAX_CIPHERTEXT, MAX_PLAINTEXT, b64
from .mapping import AWS_SPEC, AWS_USAGE, ENCRYPTION_ALGORITHM, MAC_ALGORITHM, SIGNING
from .seam import dry_run, name_of_id, peek, random_bytes, record_refusal

ENCRYPTION_ALGORITHMS = ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "SM2PKE")
SIGNING_ALGORITHMS = ("RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
                      "RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384",
                      "RSASSA_PKCS1_V1_5_SHA_512", "ECDSA_SHA_256", "ECDSA_SHA_384",
                      "ECDSA_SHA_512", "SM2DSA", "ML_DSA_SHAKE_256", "ED25519_SHA_512",
                      "ED25519_PH_SHA_512")
MAC_ALGORITHMS = ("HMAC_SHA_224", "HMAC_SHA_256", "HMAC_SHA_384", "HMAC_SHA_512")
DATA_KEY_BYTES = {"AES_256": 32, "AES_128": 16}


# -- shared checks ---------------------------------------------------------------------------
def _encryption_algorithm(call: Call, field: str = "EncryptionAlgorithm") -> str:
    alg = call.body.choice(field, ENCRYPTION_ALGORITHMS, ENCRYPTION_ALGORITHM)
    if alg != ENCRYPTION_ALGORITHM:
        raise unsupported(f"{field} {alg} needs an asymmetric encryption key, which keyledger "
                          "does not make; use SYMMETRIC_DEFAULT")
    return ENCRYPTION_ALGORITHM


def _no_recipient(call: Call) -> None:
    call.body.strings("GrantTokens", required=False)  # accepted and ignored
    if call.body.present("Recipient"):
        raise unsupported("keyledger has no Nitro Enclaves attestation: leave out Recipient")


def _header(blob: bytes) -> ct.Header | None:
    """The ciphertext's header, or None (the ledger's decrypt then refuses and audits it)."""
    try:
        return ct.parse(blob)[0]
    except (InvalidCiphertext, InvalidInput):
        return None


def _key_for(call: Call, name: str, action: str, purpose: Purpose,
             refuse: Callable[[], object]) -> Key:
    """The key ``name`` names, if the principal may run ``action`` on it and it serves
    ``purpose`` (encrypt: also wrap). Otherwise ``refuse`` (the ledger call itself) raises the
    ledger's own, audited refusal: not found, access denied, wrong purpose."""
    purposes = (Purpose.ENCRYPT, Purpose.WRAP) if purpose is Purpose.ENCRYPT else (purpose,)
    key = peek(call.ledger, name, action)
    if key is None or key.purpose not in purposes:
        refuse()
        raise ApiError("KMSInternalException", "the key changed during the request; retry", 500)
    return key


def _check_expected_key(call: Call, field: str, header: ct.Header | None) -> None:
    """IncorrectKeyException when ``field`` (Decrypt's KeyId, ReEncrypt's SourceKeyId) names
    another key than the ciphertext's header."""
    if not call.body.present(field):
        return
    name = call.name(field)
    key = peek(call.ledger, name, "decrypt") or call.ledger.get_key(name)
    if header is not None and header.key_id != key.key_id:
        error = ApiError("IncorrectKeyException",
                         f"the ciphertext was not encrypted under the key {field} names", 400)
        record_refusal(call.ledger, call.operation, error, key)
        raise Recorded(error.code, error.message, error.status)


def _dry_run_name(call: Call, header: ct.Header | None) -> str:
    name = name_of_id(call.ledger, header.key_id) if header is not None else None
    if name is None:
        raise ApiError("InvalidCiphertextException",
                       "the ciphertext cannot be decrypted with any key here", 400)
    return name


# -- encryption ------------------------------------------------------------------------------
def encrypt(call: Call) -> dict[str, Any]:
    b = call.body
    plaintext = b.need_blob("Plaintext", MAX_PLAINTEXT)
    context = b.context("EncryptionContext")
    alg = _encryption_algorithm(call)
    _no_recipient(call)
    name = call.name()
    if b.boolean("DryRun"):
        raise dry_run(call.ledger, call.operation, name, "encrypt")
    blob = call.ledger.encrypt(name, plaintext, context=context)
    return {"CiphertextBlob": b64(blob), "KeyId": call.arn(ct.parse(blob)[0].key_id),
            "EncryptionAlgorithm": alg}


def decrypt(call: Call) -> dict[str, Any]:
    b = call.body
    blob = b.need_blob("CiphertextBlob", MAX_CIPHERTEXT)
    context = b.context("EncryptionContext")
    alg = _encryption_algorithm(call)
    _no_recipient(call)
    header = _header(blob)
    _check_expected_key(call, "KeyId", header)
    if b.boolean("DryRun"):
        raise dry_run(call.ledger, call.operation, _dry_run_name(call, header), "decrypt")
    plaintext = call.ledger.decrypt(blob, context=context)
    key_id = ct.parse(blob)[0].key_id  # it decrypted: the header is well formed
    return {"KeyId": call.arn(key_id), "Plaintext": b64(plaintext), "EncryptionAlgorithm": alg}


def re_encrypt(call: Call) -> dict[str, Any]:
    """Decrypt and encrypt inside the service; the plaintext never reaches the caller. Same
    key and context: one ``rewrap`` (to the latest version)."""
    b = call.body
    blob = b.need_blob("CiphertextBlob", MAX_CIPHERTEXT)
    source_context = b.context("SourceEncryptionContext")
    dest_context = b.context("DestinationEncryptionContext")
    source_alg = _encryption_algorithm(call, "SourceEncryptionAlgorithm")
    dest_alg = _encryption_algorithm(call, "DestinationEncryptionAlgorithm")
    call.body.strings("GrantTokens", required=False)
    dest = call.name("DestinationKeyId")
    header = _header(blob)
    _check_expected_key(call, "SourceKeyId", header)
    if b.boolean("DryRun"):
        dry_run(call.ledger, call.operation, _dry_run_name(call, header), "decrypt")
        raise dry_run(call.ledger, call.operation, dest, "encrypt")
    # the destination is checked first, so a refused one leaves nothing decrypted
    dest_key = _key_for(call, dest, "encrypt", Purpose.ENCRYPT,
                        lambda: call.ledger.encrypt(dest, b"\0", context=dest_context))
    same = header is not None and dest_key.key_id == header.key_id
    if same and (source_context or {}) == (dest_context or {}):
        out = call.ledger.rewrap(blob, context=source_context)
    else:
        plaintext = call.ledger.decrypt(blob, context=source_context)
        out = call.ledger.encrypt(dest, plaintext, context=dest_context)
    return {"CiphertextBlob": b64(out), "SourceKeyId": call.arn(ct.parse(blob)[0].key_id),
            "KeyId": call.arn(ct.parse(out)[0].key_id),
            "SourceEncryptionAlgorithm": source_alg, "DestinationEncryptionAlgorithm": dest_alg}


def _data_key(call: Call) -> tuple[bytes, bytes, str]:
    """(plaintext, ciphertext blob, key ARN) of a fresh data key (KeySpec or NumberOfBytes)."""
    b = call.body
    context = b.context("EncryptionContext")
    size = b.integer("NumberOfBytes", 1, 1024)
    spec = b.choice("KeySpec", tuple(DATA_KEY_BYTES))
    if (size is None) == (spec is None):
        raise ApiError("ValidationException",
                       "send exactly one of KeySpec (AES_256, AES_128) and NumberOfBytes", 400)
    _no_recipient(call)
    name = call.name()
    if b.boolean("DryRun"):
        raise dry_run(call.ledger, call.operation, name, "generate_data_key")
    n = size if size is not None else DATA_KEY_BYTES[spec or "AES_256"]
    if n == 32:
        dk = call.ledger.generate_data_key(name, context=context)
        plaintext, blob = dk.plaintext, dk.wrapped
    else:  # keyledger's data keys are 256-bit: another size is os.urandom, encrypted
        plaintext = os.urandom(n)
        blob = call.ledger.encrypt(name, plaintext, context=context)
    return plaintext, blob, call.arn(ct.parse(blob)[0].key_id)


def generate_data_key(call: Call) -> dict[str, Any]:
    plaintext, blob, arn = _data_key(call)
    return {"CiphertextBlob": b64(blob), "Plaintext": b64(plaintext), "KeyId": arn}


def generate_data_key_without_plaintext(call: Call) -> dict[str, Any]:
    _, blob, arn = _data_key(call)
    return {"CiphertextBlob": b64(blob), "KeyId": arn}


def generate_random(call: Call) -> dict[str, Any]:
    n = call.body.integer("NumberOfBytes", 1, 1024)
    if n is None:
        raise ApiError("ValidationException", "NumberOfBytes is required (1 to 1024)", 400)
    if call.body.present("CustomKeyStoreId"):
        raise unsupported("keyledger has no custom key stores: leave out CustomKeyStoreId")
    _no_recipient(call)
    return {"Plaintext": b64(random_bytes(call.ledger, n))}


# -- signatures ------------------------------------------------------------------------------
def _message(call: Call) -> bytes:
    message = call.body.need_blob("Message", MAX_PLAINTEXT)
    kind = call.body.choice("MessageType", ("RAW", "DIGEST", "EXTERNAL_MU"), "RAW")
    if kind != "RAW":
        raise unsupported("keyledger hashes the message itself: send the message with "
                          "MessageType RAW (at most 4096 bytes)")
    return message


def _signing_algorithm(call: Call, key: Key) -> str:
    alg = call.body.choice("SigningAlgorithm", SIGNING_ALGORITHMS)
    if alg is None:
        raise ApiError("ValidationException", "SigningAlgorithm is required", 400)
    expected = SIGNING[key.spec.name]
    if alg != expected:
        raise usage(f"this {AWS_SPEC[key.spec.name]} key signs with {expected} only, not {alg}")
    return alg


def sign(call: Call) -> dict[str, Any]:
    message = _message(call)
    call.body.strings("GrantTokens", required=False)
    name = call.name()
    key = _key_for(call, name, "sign", Purpose.SIGN, lambda: call.ledger.sign(name, message))
    alg = _signing_algorithm(call, key)
    if call.body.boolean("DryRun"):
        raise dry_run(call.ledger, call.operation, name, "sign")
    signature = call.ledger.sign(name, message)
    return {"KeyId": call.arn(key.key_id), "Signature": b64(signature), "SigningAlgorithm": alg}


def verify(call: Call) -> dict[str, Any]:
    message = _message(call)
    signature = call.body.need_blob("Signature", MAX_CIPHERTEXT)
    call.body.strings("GrantTokens", required=False)
    name = call.name()
    key = _key_for(call, name, "verify", Purpose.SIGN,
                   lambda: call.ledger.verify(name, message, signature))
    alg = _signing_algorithm(call, key)
    if call.body.boolean("DryRun"):
        raise dry_run(call.ledger, call.operation, name, "verify")
    if not call.ledger.verify(name, message, signature):  # audited: ok, "did not verify"
        raise Recorded("KMSInvalidSignatureException",
                       "the signature does not verify with this key and message", 400)
    return {"KeyId": call.arn(key.key_id), "SignatureValid": True, "SigningAlgorithm": alg}


def get_public_key(call: Call) -> dict[str, Any]:
    call.body.strings("GrantTokens", required=False)
    name = call.name()
    pem = call.ledger.public_key_pem(name)
    key = peek(call.ledger, name, "public_key_pem")
    if key is None:
        raise ApiError("KMSInternalException", "the key changed during the request; retry", 500)
    der = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spec = AWS_SPEC[key.spec.name]
    return {"KeyId": call.arn(key.key_id), "PublicKey": b64(der), "CustomerMasterKeySpec": spec,
            "KeySpec": spec, "KeyUsage": AWS_USAGE[key.purpose],
            "SigningAlgorithms": [SIGNING[key.spec.name]]}


# -- MACs ------------------------------------------------------------------------------------
def _mac_algorithm(call: Call) -> str:
    alg = call.body.choice("MacAlgorithm", MAC_ALGORITHMS)
    if alg is None:
        raise ApiError("ValidationException", "MacAlgorithm is required", 400)
    if alg != MAC_ALGORITHM:
        raise usage(f"keyledger's HMAC keys compute {MAC_ALGORITHM} only, not {alg}")
    return alg


def generate_mac(call: Call) -> dict[str, Any]:
    message = call.body.need_blob("Message", MAX_PLAINTEXT)
    call.body.strings("GrantTokens", required=False)
    alg = _mac_algorithm(call)
    name = call.name()
    key = _key_for(call, name, "mac", Purpose.MAC, lambda: call.ledger.mac(name, message))
    if call.body.boolean("DryRun"):
        raise dry_run(call.ledger, call.operation, name, "mac")
    mac = call.ledger.mac(name, message)
    return {"Mac": b64(mac), "MacAlgorithm": alg, "KeyId": call.arn(key.key_id)}


def verify_mac(call: Call) -> dict[str, Any]:
    message = call.body.need_blob("Message", MAX_PLAINTEXT)
    mac = call.body.need_blob("Mac", MAX_CIPHERTEXT)
    call.body.strings("GrantTokens", required=False)
    alg = _mac_algorithm(call)
    name = call.name()
    key = _key_for(call, name, "verify_mac", Purpose.MAC,
                   lambda: call.ledger.verify_mac(name, message, mac))
    if call.body.boolean("DryRun"):
        raise dry_run(call.ledger, call.operation, name, "verify_mac")
    if not call.ledger.verify_mac(name, message, mac):  # audited: ok, "did not verify"
        raise Recorded("KMSInvalidMacException",
                       "the MAC does not verify with this key and message", 400)
    return {"KeyId": call.arn(key.key_id), "MacValid": True, "MacAlgorithm": alg}


OPERATIONS = {
    "Encrypt": encrypt, "Decrypt": decrypt, "ReEncrypt": re_encrypt,
    "GenerateDataKey": generate_data_key,
    "GenerateDataKeyWithoutPlaintext": generate_data_key_without_plaintext,
    "GenerateRandom": generate_random, "Sign": sign, "Verify": verify,
    "GetPublicKey": get_public_key, "GenerateMac": generate_mac, "VerifyMac": verify_mac,
}

__all__ = ["OPERATIONS"]
