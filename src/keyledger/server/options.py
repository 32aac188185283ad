"""What ``keyledger serve`` is started with, and the checks made before anything is opened.

Kept apart from ``app`` so the CLI can build its parser without importing the ASGI stack.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..config import is_loopback
from ..errors import ConfigError

DEFAULT_PORT = 8200
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "111122223333"


@dataclass(frozen=True)
class ServeOptions:
    home: Path | None
    principal: str | None = None
    address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    region: str = DEFAULT_REGION
    account: str = DEFAULT_ACCOUNT
    keep_store_open: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{_url_host(self.address)}:{self.port}"


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def check_options(options: ServeOptions) -> None:
    """Refuse a configuration that would expose keys or fail later, before opening anything."""
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    if options.tls_cert is None and not is_loopback(options.address):
        raise ConfigError(
            f"refusing to serve on {options.address} without TLS: requests and the keys' "
            "plaintexts would cross the network in clear; give --tls-cert and --tls-key, or "
            "listen on 127.0.0.1")
    if options.tls_cert is not None and options.tls_key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {options.tls_cert} and key "
                              f"{options.tls_key}: {exc.strerror or exc}") from None
    if not 0 <= options.port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535, not {options.port}")
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", options.region):
        raise ConfigError(f"--region must look like an AWS region, e.g. us-east-1, not "
                          f"{options.region[:40]!r}")
    if not re.fullmatch(r"\d{12}", options.account):
        raise ConfigError(f"--account must be 12 digits, not {options.account[:40]!r}")


__all__ = ["DEFAULT_ACCOUNT", "DEFAULT_PORT", "DEFAULT_REGION", "ServeOptions", "check_options",
           "is_loopback"]
