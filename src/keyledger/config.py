"""The home folder: where it is, what it holds, and how the HSM is reached.

A home holds ``keyledger.toml`` (settings), ``keyledger.duckdb`` (catalog and ledger),
``journal/`` (per-process audit journals) and, for the embedded default HSM,
``softhsm2.conf``, ``tokens/`` and the PIN files ``user.pin`` / ``so.pin`` (mode 0600).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

CONFIG_NAME = "keyledger.toml"
DB_NAME = "keyledger.duckdb"
DEFAULT_TOKEN_LABEL = "keyledger"
HSM_BACKENDS = ("pkcs11", "memory")

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


@dataclass(frozen=True)
class HsmConfig:
    """How to reach the HSM. The PIN itself is never stored here, only where to read it."""

    module: str
    token_label: str
    pin_file: Path | None = None
    pin_env: str | None = None
    softhsm2_conf: Path | None = None  # set for the embedded SoftHSM2 token
    embedded: bool = False
    # "pkcs11" (the default: SoftHSM2 or another PKCS#11 module) or "memory" (keyledger.hsm.memory:
    # keys in process memory, for simulation homes and tests only)
    backend: str = "pkcs11"

    def read_pin(self) -> str:
        if self.pin_env:
            pin = os.environ.get(self.pin_env)
            if not pin:
                raise ConfigError(
                    f"the HSM PIN is configured to come from ${self.pin_env}, which is not set; "
                    "export it or configure pin_file in keyledger.toml"
                )
            return pin
        if self.pin_file:
            try:
                return self.pin_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the HSM PIN file {self.pin_file} ({exc.strerror}); "
                    "restore it or point pin_file in keyledger.toml at the right file"
                ) from None
        raise ConfigError("no HSM PIN source configured: set pin_file or pin_env in keyledger.toml")


@dataclass(frozen=True)
class AuditConfig:
    strict: bool = False  # fsync every record before the call returns
    fsync_interval_ms: int = 50  # group-commit window otherwise
    ingest_interval_ms: int = 1000  # how often a process moves journals into DuckDB
    catalog_refresh_ms: int = 100  # how stale a process's view of key states may get


@dataclass(frozen=True)
class Settings:
    home: Path
    hsm: HsmConfig
    audit: AuditConfig = field(default_factory=AuditConfig)
    store_busy_timeout_s: float = 15.0
    # Below the busy timeout, so a writer in another process outlasts the longest query.
    query_timeout_s: float = 10.0

    @property
    def db_path(self) -> Path:
        return self.home / DB_NAME

    @property
    def journal_dir(self) -> Path:
        return self.home / "journal"


def default_home() -> Path:
    return Path(os.environ.get("KEYLEDGER_HOME") or ".keyledger").expanduser().absolute()


def find_softhsm_module() -> str | None:
    env = os.environ.get("SOFTHSM2_MODULE")
    if env and Path(env).exists():
        return env
    for candidate in SOFTHSM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


def write_secret(path: Path, value: str) -> None:
    """Create a file readable only by its owner (0600) holding ``value``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def new_pin() -> str:
    return secrets.token_urlsafe(24)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_config(home: Path, sections: dict[str, dict[str, object]]) -> None:
    lines = ["# keyledger home settings. PINs are never stored here, only where to read them.", ""]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    (home / CONFIG_NAME).write_text("\n".join(lines))


def load_settings(home: Path) -> Settings | None:
    """Settings of an existing home, or None when the home has no config yet."""
    path = home / CONFIG_NAME
    env_module = os.environ.get("KEYLEDGER_PKCS11_MODULE")
    if not path.exists():
        if env_module:
            return Settings(home, _hsm_from_env(env_module))
        return None
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; fix or remove the file") from None
    hsm = data.get("hsm", {})
    backend = hsm.get("backend", "pkcs11")
    if backend not in HSM_BACKENDS:
        raise ConfigError(f"unknown [hsm] backend = {backend!r} in {path}; choose one of "
                          f"{', '.join(map(repr, HSM_BACKENDS))}")
    if backend == "memory":  # named by the home itself: no module, token or PIN
        hsm_cfg = HsmConfig(module="memory", token_label=DEFAULT_TOKEN_LABEL, backend=backend)
    elif env_module:
        hsm_cfg = _hsm_from_env(env_module)
    else:
        try:
            hsm_cfg = HsmConfig(
                module=str(hsm["module"]),
                token_label=str(hsm.get("token_label", DEFAULT_TOKEN_LABEL)),
                pin_file=_resolve(home, hsm.get("pin_file")),
                pin_env=hsm.get("pin_env"),
                softhsm2_conf=_resolve(home, hsm.get("softhsm2_conf")),
                embedded=bool(hsm.get("embedded", False)),
            )
        except KeyError:
            raise ConfigError(f"{path} has no [hsm] module = \"/path/to/module.so\"") from None
    audit = data.get("audit", {})
    try:
        audit_cfg = AuditConfig(**audit)
    except TypeError as exc:
        raise ConfigError(f"unknown setting in [audit] of {path}: {exc}") from None
    store = data.get("store", {})
    return Settings(home, hsm_cfg, audit_cfg, float(store.get("busy_timeout_s", 15)),
                    float(store.get("query_timeout_s", 10)))


def _resolve(home: Path, value: object) -> Path | None:
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else home / p


def _hsm_from_env(module: str) -> HsmConfig:
    pin_file = os.environ.get("KEYLEDGER_PIN_FILE")
    conf = os.environ.get("SOFTHSM2_CONF")
    return HsmConfig(
        module=module,
        token_label=os.environ.get("KEYLEDGER_TOKEN_LABEL", DEFAULT_TOKEN_LABEL),
        pin_file=Path(pin_file) if pin_file else None,
        pin_env=None if pin_file else "KEYLEDGER_PIN",
        softhsm2_conf=Path(conf) if conf else None,
    )


def require_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise ConfigError(
            f"{name} is not installed; install the {package} package (make setup does it)"
        )
    return found


def is_loopback(address: str) -> bool:
    """Whether a listening address or origin host stays on this machine (the dashboard and
    ``keyledger serve`` refuse other addresses without a login or TLS)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
