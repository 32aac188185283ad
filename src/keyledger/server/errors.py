"""The error a request gets on the wire: AWS's JSON 1.1 shape, ``{"__type", "message"}``."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    """A refusal an AWS client understands: ``code`` is the AWS exception name (e.g.
    ``NotFoundException``), ``status`` the HTTP status, ``message`` words a person can act on
    (never a secret, a traceback or raw bytes)."""

    code: str
    message: str
    status: int = 400

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def body(self) -> bytes:
        """The response body AWS SDKs parse (botocore reads ``__type`` and ``message``)."""
        return json.dumps({"__type": self.code, "message": self.message}).encode()


__all__ = ["ApiError"]
