"""Where the key service says it lives: the region and account its ARNs name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KmsConfig:
    """The region and account in key and alias ARNs (``arn:aws:kms:<region>:<account>:...``).

    AWS clients only compare them with the ARNs they were given, so any values work as long as
    the service keeps them; the server passes its own, tests use the defaults."""

    region: str = "us-east-1"
    account: str = "111122223333"
    partition: str = "aws"

    def prefix(self) -> str:
        return f"arn:{self.partition}:kms:{self.region}:{self.account}:"

    def key_arn(self, key_id: str) -> str:
        return f"{self.prefix()}key/{key_id}"

    def alias_arn(self, alias: str) -> str:
        """``alias`` without its ``alias/`` prefix (a keyledger name or alias)."""
        return f"{self.prefix()}alias/{alias}"


__all__ = ["KmsConfig"]
