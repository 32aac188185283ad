"""Key management operations: create, describe, list, aliases, tags, states, deletion,
rotation. Each maps onto one or two public ``KeyLedger`` calls, which authorise and audit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from ...model import SPECS, Key, KeyState, Purpose
from ...services.lifecycle import MAX_DELETION_DAYS, MIN_DELETION_DAYS
from ..errors import ApiError
from .call import Call
from .faults import unsupported, validation
from .fields import MAX_TAGS
from .ids import ALIAS_PREFIX, alias_name
from .mapping import DEFAULT_USAGE, KEY_SPECS, USAGES, epoch, key_metadata

T = TypeVar("T")
AWS_KEY_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384",
                 "ECC_NIST_P521", "ECC_SECG_P256K1", "SYMMETRIC_DEFAULT", "HMAC_224", "HMAC_256",
                 "HMAC_384", "HMAC_512", "SM2", "ML_DSA_44", "ML_DSA_65", "ML_DSA_87",
                 "ECC_NIST_EDWARDS25519", "ML_KEM_512", "ML_KEM_768", "ML_KEM_1024")
AWS_KEY_USAGES = ("SIGN_VERIFY", "ENCRYPT_DECRYPT", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT",
                  "ENCAPSULATE_DECAPSULATE")
ORIGINS = ("AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE")
NAME_PREFIX = "kms-"  # keyledger names of keys made by CreateKey (AWS keys have no name)


# -- create and read -------------------------------------------------------------------------
def create_key(call: Call) -> dict[str, Any]:
    """A new keyledger key named ``kms-<12 hex digits>``; Policy and Description are accepted
    but not kept (keyledger's grants decide who may use a key)."""
    b = call.body
    b.text("Policy", required=False, max_len=131072)
    b.text("Description", required=False, max_len=8192)
    b.boolean("BypassPolicyLockoutSafetyCheck")
    if b.present("CustomKeyStoreId") or b.present("XksKeyId"):
        raise unsupported("keyledger has no custom key stores: leave out CustomKeyStoreId "
                          "and XksKeyId")
    origin = b.choice("Origin", ORIGINS, "AWS_KMS")
    if origin == "EXTERNAL":
        raise unsupported("keyledger creates a key from imported material in one step: call "
                          "GetParametersForImport with KeyId alias/<new name>, then "
                          "ImportKeyMaterial (docs/kms-api.md)")
    if origin != "AWS_KMS":
        raise unsupported(f"Origin {origin} is not available; keys are made in keyledger's HSM")
    if b.boolean("MultiRegion"):
        raise unsupported("keyledger has no multi-Region keys")
    spec, purpose = _spec_and_purpose(call)
    tags = b.tags()
    key = call.ledger.create_key(f"{NAME_PREFIX}{uuid.uuid4().hex[:12]}", spec=spec,
                                 purpose=purpose.value, tags=tags or None)
    return {"KeyMetadata": key_metadata(key, call.config)}


def _spec_and_purpose(call: Call) -> tuple[str, Purpose]:
    b = call.body
    spec = b.choice("KeySpec", AWS_KEY_SPECS)
    legacy = b.choice("CustomerMasterKeySpec", AWS_KEY_SPECS)
    if spec and legacy and spec != legacy:
        raise validation("KeySpec and CustomerMasterKeySpec differ: send only KeySpec")
    aws_spec = spec or legacy or "SYMMETRIC_DEFAULT"
    if aws_spec not in KEY_SPECS:
        raise unsupported(f"keyledger cannot make {aws_spec} keys; it makes "
                          f"{', '.join(KEY_SPECS)}")
    usage = b.choice("KeyUsage", AWS_KEY_USAGES, DEFAULT_USAGE.get(aws_spec, "SIGN_VERIFY"))
    assert usage is not None
    kspec = SPECS[KEY_SPECS[aws_spec]]
    fitting = [p for p in USAGES.get(usage, ()) if p in kspec.purposes]
    if not fitting:
        if aws_spec.startswith("RSA") and usage == "ENCRYPT_DECRYPT":
            raise unsupported("keyledger's RSA keys sign and verify only; use a "
                              "SYMMETRIC_DEFAULT key to encrypt")
        raise validation(f"KeyUsage {usage} is not valid for KeySpec {aws_spec}")
    return kspec.name, fitting[0]


def describe_key(call: Call) -> dict[str, Any]:
    call.body.strings("GrantTokens", required=False)
    key = call.ledger.get_key(call.name())
    return {"KeyMetadata": key_metadata(key, call.config)}


def _page(call: Call, items: Sequence[T], default_limit: int = 100) -> tuple[Sequence[T], dict]:
    """One page of ``items`` (Limit 1..1000, Marker = where the previous page ended)."""
    limit = call.body.integer("Limit", 1, 1000, default_limit) or default_limit
    marker = call.body.text("Marker", required=False, max_len=1024)
    start = 0
    if marker is not None:
        if not marker.isdigit() or int(marker) > len(items):
            raise ApiError("InvalidMarkerException",
                           "Marker is not one this service returned; start without it", 400)
        start = int(marker)
    end = start + limit
    more = end < len(items)
    return items[start:end], ({"NextMarker": str(end), "Truncated": True} if more
                              else {"Truncated": False})


def _live_keys(call: Call) -> list[dict[str, Any]]:
    """The keys the principal may see, as ``list_keys`` rows, without destroyed ones (AWS
    forgets a deleted key)."""
    frame = call.ledger.list_keys()
    rows = frame.to_dict("records")
    return [r for r in rows if r["state"] != KeyState.DESTROYED.value]


def list_keys(call: Call) -> dict[str, Any]:
    rows = _live_keys(call)
    page, more = _page(call, rows)
    return {"Keys": [{"KeyId": r["key_id"], "KeyArn": call.arn(r["key_id"])} for r in page],
            **more}


def list_aliases(call: Call) -> dict[str, Any]:
    """Every key's name and aliases, each as ``alias/<name>`` (optionally of one key)."""
    only = call.ledger.get_key(call.name()).key_id if call.body.present("KeyId") else None
    entries = []
    for r in _live_keys(call):
        if only is not None and r["key_id"] != only:
            continue
        for name in (r["name"], *r["aliases"]):
            entries.append({"AliasName": f"{ALIAS_PREFIX}{name}",
                            "AliasArn": call.config.alias_arn(name),
                            "TargetKeyId": r["key_id"]})
    page, more = _page(call, entries, 50)
    return {"Aliases": list(page), **more}


# -- aliases and tags ------------------------------------------------------------------------
def create_alias(call: Call) -> dict[str, Any]:
    alias = alias_name(call.body.need_text("AliasName", 256))
    call.ledger.set_alias(call.name("TargetKeyId"), alias)
    return {}


def update_alias(call: Call) -> dict[str, Any]:
    """``move_alias``: the alias names TargetKeyId's key from now on (a key name is no alias)."""
    alias = alias_name(call.body.need_text("AliasName", 256))
    call.ledger.move_alias(alias, call.name("TargetKeyId"))
    return {}


def delete_alias(call: Call) -> dict[str, Any]:
    """``remove_alias``; a key's own name cannot be deleted (ValidationException)."""
    call.ledger.remove_alias(alias_name(call.body.need_text("AliasName", 256)))
    return {}


def tag_resource(call: Call) -> dict[str, Any]:
    new = call.body.tags(required=True)
    name = call.name()
    tags = {**call.ledger.get_key(name).tags, **new}
    if len(tags) > MAX_TAGS:
        raise ApiError("LimitExceededException",
                       f"a key may have at most {MAX_TAGS} tags; remove some first", 400)
    call.ledger.set_tags(name, tags)
    return {}


def untag_resource(call: Call) -> dict[str, Any]:
    drop = set(call.body.strings("TagKeys"))
    name = call.name()
    tags = {k: v for k, v in call.ledger.get_key(name).tags.items() if k not in drop}
    call.ledger.set_tags(name, tags)
    return {}


def list_resource_tags(call: Call) -> dict[str, Any]:
    key = call.ledger.get_key(call.name())
    tags = [{"TagKey": k, "TagValue": v} for k, v in sorted(key.tags.items())]
    page, more = _page(call, tags, 50)
    return {"Tags": list(page), **more}


# -- states and deletion ---------------------------------------------------------------------
def enable_key(call: Call) -> dict[str, Any]:
    call.ledger.enable(call.name(), reason="EnableKey (KMS API)")
    return {}


def disable_key(call: Call) -> dict[str, Any]:
    call.ledger.disable(call.name(), reason="DisableKey (KMS API)")
    return {}


def schedule_key_deletion(call: Call) -> dict[str, Any]:
    days = call.body.integer("PendingWindowInDays", MIN_DELETION_DAYS, MAX_DELETION_DAYS,
                             MAX_DELETION_DAYS) or MAX_DELETION_DAYS
    key = call.ledger.schedule_deletion(call.name(), days, reason="ScheduleKeyDeletion")
    return {"KeyId": call.arn(key.key_id), "DeletionDate": epoch(key.deletion_due),
            "KeyState": "PendingDeletion", "PendingWindowInDays": days}


def cancel_key_deletion(call: Call) -> dict[str, Any]:
    key = call.ledger.cancel_deletion(call.name(), reason="CancelKeyDeletion (KMS API)")
    return {"KeyId": call.arn(key.key_id)}


# -- rotation --------------------------------------------------------------------------------
def enable_key_rotation(call: Call) -> dict[str, Any]:
    """Rotation on (``auto_rotate``), and with RotationPeriodInDays the key's period."""
    days = call.body.integer("RotationPeriodInDays", 90, 2560)
    call.ledger.set_policy(call.name(), auto_rotate=True,
                           rotation_period=f"{days}d" if days is not None else None)
    return {}


def disable_key_rotation(call: Call) -> dict[str, Any]:
    """``auto_rotate`` off: no rotation by period or usage (a weakening: quorum applies)."""
    call.ledger.set_policy(call.name(), auto_rotate=False)
    return {}


def get_key_rotation_status(call: Call) -> dict[str, Any]:
    key = call.ledger.get_key(call.name())
    enabled = bool(key.policy.get("auto_rotate", True))
    out: dict[str, Any] = {"KeyRotationEnabled": enabled, "KeyId": key.key_id}
    if key.rotation_period is not None:
        out["RotationPeriodInDays"] = int(key.rotation_period.total_seconds() // 86400)
    if enabled and key.next_rotation_due is not None:
        out["NextRotationDate"] = epoch(key.next_rotation_due)
    return out


def rotate_key_on_demand(call: Call) -> dict[str, Any]:
    key = call.ledger.rotate(call.name(), reason="RotateKeyOnDemand (KMS API)")
    return {"KeyId": key.key_id}


def list_key_rotations(call: Call) -> dict[str, Any]:
    """Every version after the first, oldest first (keyledger does not keep whether a
    rotation was automatic, so RotationType is left out)."""
    call.body.choice("IncludeKeyMaterial", ("ALL_KEY_MATERIAL", "ROTATIONS_ONLY"))
    key: Key = call.ledger.get_key(call.name())
    rotations = [{"KeyId": key.key_id, "RotationDate": epoch(v.created_at)}
                 for n, v in sorted(key.versions.items()) if n > 1]
    page, more = _page(call, rotations, 100)
    return {"Rotations": list(page), **more}


OPERATIONS = {
    "CreateKey": create_key, "DescribeKey": describe_key, "ListKeys": list_keys,
    "ListAliases": list_aliases, "CreateAlias": create_alias, "UpdateAlias": update_alias,
    "DeleteAlias": delete_alias, "TagResource": tag_resource, "UntagResource": untag_resource,
    "ListResourceTags": list_resource_tags, "EnableKey": enable_key, "DisableKey": disable_key,
    "ScheduleKeyDeletion": schedule_key_deletion, "CancelKeyDeletion": cancel_key_deletion,
    "EnableKeyRotation": enable_key_rotation, "DisableKeyRotation": disable_key_rotation,
    "GetKeyRotationStatus": get_key_rotation_status, "RotateKeyOnDemand": rotate_key_on_demand,
    "ListKeyRotations": list_key_rotations,
}

__all__ = ["OPERATIONS"]
