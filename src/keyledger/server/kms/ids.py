"""The four KeyId forms AWS clients send, resolved to a keyledger key name.

* key id: keyledger's ``key_id`` (a UUID), e.g. ``1234abcd-12ab-34cd-56ef-1234567890ab``
* key ARN: ``arn:aws:kms:<region>:<account>:key/<key id>``
* alias name: ``alias/<name>`` for every keyledger key name and alias
* alias ARN: ``arn:aws:kms:<region>:<account>:alias/<name>``

A bare keyledger name (no ``alias/``) is accepted too. A form that names nothing here is
passed on as a name, so the ledger's own call refuses it (``KeyNotFound``, audited with the
name's hash); an ARN of another region or account is refused here (NotFoundException).
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from ..errors import ApiError
from .config import KmsConfig
from .faults import not_found, validation
from .seam import name_of_id

if TYPE_CHECKING:
    from ...service import KeyLedger

ALIAS_PREFIX = "alias/"
_ALIAS_NAME = re.compile(r"alias/[a-zA-Z0-9/_-]+")
_ARN = re.compile(r"arn:([a-z-]+):kms:([a-z0-9-]*):([0-9]*):(key|alias)/(.+)", re.S)


def is_key_id(text: str) -> bool:
    """Whether ``text`` has the shape of a keyledger key id (a canonical UUID)."""
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def resolve(ledger: KeyLedger, config: KmsConfig, key_id: str) -> str:
    """The keyledger name ``key_id`` (any of the four forms) refers to."""
    if key_id.startswith("arn:"):
        kind, rest = _split_arn(config, key_id)
        if kind == "alias":
            return rest
        return _by_id(ledger, rest)
    if key_id.startswith(ALIAS_PREFIX):
        name = key_id[len(ALIAS_PREFIX):]
        if not name:
            raise validation("KeyId 'alias/' names no alias")
        return name
    return _by_id(ledger, key_id) if is_key_id(key_id) else key_id


def _by_id(ledger: KeyLedger, key_id: str) -> str:
    return name_of_id(ledger, key_id.lower()) or key_id


def _split_arn(config: KmsConfig, arn: str) -> tuple[str, str]:
    m = _ARN.fullmatch(arn)
    if m is None:
        raise validation("KeyId is not a KMS key or alias ARN "
                         "(arn:aws:kms:<region>:<account>:key/<id> or .../alias/<name>)")
    partition, region, account, kind, rest = m.groups()
    if (partition, region, account) != (config.partition, config.region, config.account):
        raise not_found(f"this key service holds keys of {config.prefix()}..., not of "
                        f"arn:{partition}:kms:{region}:{account}:...")
    return kind, rest


def alias_name(value: str) -> str:
    """The keyledger alias of an AWS AliasName (``alias/<name>``), checked as AWS does."""
    if len(value) > 256 or not _ALIAS_NAME.fullmatch(value):
        raise ApiError("InvalidAliasNameException",
                       "AliasName must be 'alias/' followed by letters, digits, '/', '_' or "
                       "'-' (at most 256 characters)", 400)
    if value.startswith("alias/aws/"):
        raise ApiError("InvalidAliasNameException",
                       "alias names starting with 'alias/aws/' are reserved for AWS", 400)
    return value[len(ALIAS_PREFIX):]


__all__ = ["ALIAS_PREFIX", "alias_name", "is_key_id", "resolve"]
