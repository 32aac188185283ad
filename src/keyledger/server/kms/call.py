"""One KMS request as the handlers see it: the ledger, the body, the service's ARN config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import KmsConfig
from .fields import Body
from .ids import resolve

if TYPE_CHECKING:
    from ...service import KeyLedger


@dataclass
class Call:
    ledger: KeyLedger
    body: Body
    config: KmsConfig
    operation: str

    def name(self, field: str = "KeyId") -> str:
        """The keyledger name the (required) KeyId-like field ``field`` refers to."""
        return resolve(self.ledger, self.config, self.body.need_text(field))

    def arn(self, key_id: str) -> str:
        return self.config.key_arn(key_id)


__all__ = ["Call"]
