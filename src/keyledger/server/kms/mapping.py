"""How keyledger's specs, purposes, states and algorithms read in AWS KMS terms (pure).

keyledger signs RSA keys with RSA-PSS-SHA256 (salt = digest length, as AWS), EC P-256 with
ECDSA-SHA256, EC P-384 with ECDSA-SHA384 and Ed25519 with pure Ed25519; MACs are HMAC-SHA256;
encryption is AES-256-GCM in keyledger's own ciphertext format (``SYMMETRIC_DEFAULT``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ...model import Key, KeyState, Purpose
from .config import KmsConfig

# AWS KeySpec -> keyledger spec (what CreateKey can make)
KEY_SPECS: dict[str, str] = {
    "SYMMETRIC_DEFAULT": "AES_256",
    "RSA_2048": "RSA_2048",
    "RSA_3072": "RSA_3072",
    "RSA_4096": "RSA_4096",
    "ECC_NIST_P256": "EC_P256",
    "ECC_NIST_P384": "EC_P384",
    "ECC_NIST_EDWARDS25519": "ED25519",
    "HMAC_256": "HMAC_SHA256",
}
# keyledger spec -> AWS KeySpec (AES_128 has no AWS spec: it is symmetric encryption too)
AWS_SPEC: dict[str, str] = {v: k for k, v in KEY_SPECS.items()} | {"AES_128": "SYMMETRIC_DEFAULT"}

# AWS KeyUsage -> the keyledger purposes it may name
USAGES: dict[str, tuple[Purpose, ...]] = {
    "ENCRYPT_DECRYPT": (Purpose.ENCRYPT, Purpose.WRAP),
    "SIGN_VERIFY": (Purpose.SIGN,),
    "GENERATE_VERIFY_MAC": (Purpose.MAC,),
}
AWS_USAGE: dict[Purpose, str] = {Purpose.ENCRYPT: "ENCRYPT_DECRYPT", Purpose.WRAP: "ENCRYPT_DECRYPT",
                                 Purpose.SIGN: "SIGN_VERIFY", Purpose.MAC: "GENERATE_VERIFY_MAC"}
# the default KeyUsage of each AWS KeySpec when CreateKey names none
DEFAULT_USAGE: dict[str, str] = {"SYMMETRIC_DEFAULT": "ENCRYPT_DECRYPT",
                                 "HMAC_256": "GENERATE_VERIFY_MAC"}

# keyledger spec -> the one signing algorithm keyledger makes with it
SIGNING: dict[str, str] = {
    "RSA_2048": "RSASSA_PSS_SHA_256",
    "RSA_3072": "RSASSA_PSS_SHA_256",
    "RSA_4096": "RSASSA_PSS_SHA_256",
    "EC_P256": "ECDSA_SHA_256",
    "EC_P384": "ECDSA_SHA_384",
    "ED25519": "ED25519_SHA_512",
}
MAC_ALGORITHM = "HMAC_SHA_256"
ENCRYPTION_ALGORITHM = "SYMMETRIC_DEFAULT"

# keyledger state -> AWS KeyState. AWS has no deactivated or compromised key: both refuse
# new protection, so they read Disabled (decrypt and verify still work; docs/kms-api.md).
STATES: dict[KeyState, str] = {
    KeyState.ACTIVE: "Enabled",
    KeyState.SUSPENDED: "Disabled",
    KeyState.PRE_ACTIVATION: "Disabled",
    KeyState.DEACTIVATED: "Disabled",
    KeyState.COMPROMISED: "Disabled",
    KeyState.PENDING_DELETION: "PendingDeletion",
    KeyState.DESTROYED: "Unavailable",
}


def epoch(when: datetime | None) -> float | None:
    """A JSON 1.1 timestamp: seconds since the epoch (catalog times are UTC)."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def algorithms(key: Key) -> dict[str, list[str]]:
    """The algorithm lists of KeyMetadata and GetPublicKey for ``key``'s usage."""
    if key.purpose in (Purpose.ENCRYPT, Purpose.WRAP):
        return {"EncryptionAlgorithms": [ENCRYPTION_ALGORITHM]}
    if key.purpose is Purpose.SIGN:
        return {"SigningAlgorithms": [SIGNING[key.spec.name]]}
    return {"MacAlgorithms": [MAC_ALGORITHM]}


def key_metadata(key: Key, config: KmsConfig) -> dict[str, Any]:
    """DescribeKey's ``KeyMetadata`` (and CreateKey's) for a keyledger key."""
    spec = AWS_SPEC[key.spec.name]
    meta: dict[str, Any] = {
        "AWSAccountId": config.account,
        "KeyId": key.key_id,
        "Arn": config.key_arn(key.key_id),
        "CreationDate": epoch(key.created_at),
        "Enabled": key.state is KeyState.ACTIVE,
        "Description": "",
        "KeyUsage": AWS_USAGE[key.purpose],
        "KeyState": STATES[key.state],
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": spec,
        "KeySpec": spec,
        "MultiRegion": False,
        **algorithms(key),
    }
    if key.deletion_due is not None and key.state is KeyState.PENDING_DELETION:
        meta["DeletionDate"] = epoch(key.deletion_due)
    return meta


__all__ = ["AWS_SPEC", "AWS_USAGE", "DEFAULT_USAGE", "ENCRYPTION_ALGORITHM", "KEY_SPECS",
           "MAC_ALGORITHM", "SIGNING", "STATES", "USAGES", "algorithms", "epoch",
           "key_metadata"]
