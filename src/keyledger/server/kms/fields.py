"""Reading a request body's fields as AWS validates them: a missing or mistyped field is a
``ValidationException`` naming the field, never a 500."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

from ..errors import ApiError
from .faults import validation

MAX_PLAINTEXT = 4096  # PlaintextType: Encrypt, Sign, GenerateMac messages
MAX_CIPHERTEXT = 6144  # CiphertextType
MAX_TAGS = 50


class Body:
    """One request's JSON object, read field by field."""

    def __init__(self, data: object) -> None:
        if not isinstance(data, dict):
            raise validation("the request body must be a JSON object")
        self.data: dict[str, Any] = data

    def present(self, name: str) -> bool:
        return self.data.get(name) is not None

    def text(self, name: str, *, required: bool = True, max_len: int = 2048) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise validation(f"{name} is required")
            return None
        if not isinstance(value, str):
            raise validation(f"{name} must be a string, not {_kind(value)}")
        if not 1 <= len(value) <= max_len:
            raise validation(f"{name} must be 1 to {max_len} characters long")
        return value

    def need_text(self, name: str, max_len: int = 2048) -> str:
        value = self.text(name, max_len=max_len)
        assert value is not None
        return value

    def choice(self, name: str, allowed: Iterable[str], default: str | None = None) -> str | None:
        value = self.text(name, required=False, max_len=64)
        if value is None:
            return default
        allowed = tuple(allowed)
        if value not in allowed:
            raise validation(f"{name} must be one of {', '.join(allowed)}, not {value[:64]!r}")
        return value

    def blob(self, name: str, *, required: bool = True,
             max_len: int = MAX_PLAINTEXT) -> bytes | None:
        """A base64 blob (JSON 1.1 carries bytes as base64 text), 1..``max_len`` bytes."""
        value = self.data.get(name)
        if value is None:
            if required:
                raise validation(f"{name} is required")
            return None
        if not isinstance(value, str):
            raise validation(f"{name} must be base64 text, not {_kind(value)}")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise validation(f"{name} is not valid base64") from None
        if not 1 <= len(raw) <= max_len:
            raise validation(f"{name} must be 1 to {max_len} bytes long, not {len(raw)}")
        return raw

    def need_blob(self, name: str, max_len: int = MAX_PLAINTEXT) -> bytes:
        value = self.blob(name, max_len=max_len)
        assert value is not None
        return value

    def integer(self, name: str, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise validation(f"{name} must be a whole number, not {_kind(value)}")
        if not lo <= value <= hi:
            raise validation(f"{name} must be from {lo} to {hi}, not {value}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.data.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise validation(f"{name} must be true or false, not {_kind(value)}")
        return value

    def context(self, name: str) -> dict[str, str] | None:
        """An EncryptionContext: a JSON object of strings to strings (keyledger's context)."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise validation(f"{name} must be a JSON object of strings to strings")
        return value

    def strings(self, name: str, *, required: bool = True) -> list[str]:
        value = self.data.get(name)
        if value is None:
            if required:
                raise validation(f"{name} is required")
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise validation(f"{name} must be a list of strings")
        return value

    def tags(self, name: str = "Tags", *, required: bool = False) -> dict[str, str]:
        """AWS tags ``[{"TagKey", "TagValue"}]``: keys 1..128, values 0..256 characters."""
        value = self.data.get(name)
        if value is None:
            if required:
                raise validation(f"{name} is required")
            return {}
        if not isinstance(value, list) or len(value) > MAX_TAGS:
            raise validation(f"{name} must be a list of at most {MAX_TAGS} "
                             "{TagKey, TagValue} objects")
        out: dict[str, str] = {}
        for tag in value:
            if not isinstance(tag, dict):
                raise validation(f"each of {name} must be a {{TagKey, TagValue}} object")
            key, val = tag.get("TagKey"), tag.get("TagValue")
            if not isinstance(key, str) or not 1 <= len(key) <= 128:
                raise validation("TagKey must be a string of 1 to 128 characters")
            if not isinstance(val, str) or len(val) > 256:
                raise validation("TagValue must be a string of at most 256 characters")
            if key.startswith("aws:"):
                raise ApiError("TagException", "tag keys starting with 'aws:' are reserved", 400)
            out[key] = val
        return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


__all__ = ["MAX_CIPHERTEXT", "MAX_PLAINTEXT", "Body", "b64"]
