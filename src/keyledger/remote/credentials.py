"""Where ``kl.connect`` finds an access key: its arguments, the environment, or a private file.

Order: ``access_key_id``/``secret_access_key`` given to ``connect``; else
``KEYLEDGER_ACCESS_KEY_ID``/``KEYLEDGER_SECRET_ACCESS_KEY``; else ``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``; else the ``[default]`` section of ``$KEYLEDGER_CREDENTIALS`` or
``~/.keyledger/credentials`` (INI, like AWS's)::

    [default]
    access_key_id = KL...
    secret_access_key = ...

The file holds a secret: it must be a regular file readable by its owner only (mode 0600 or
stricter), else it is refused rather than used.
"""

from __future__ import annotations

import configparser
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

SECTION = "default"
ENV_PAIRS = (("KEYLEDGER_ACCESS_KEY_ID", "KEYLEDGER_SECRET_ACCESS_KEY"),
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


@dataclass(frozen=True)
class AccessKey:
    """An access key id and its secret (never shown in a repr)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    source: str = "arguments"


def credentials_path() -> Path:
    """``$KEYLEDGER_CREDENTIALS``, else ``~/.keyledger/credentials``."""
    env = os.environ.get("KEYLEDGER_CREDENTIALS")
    return Path(env).expanduser() if env else Path.home() / ".keyledger" / "credentials"


def resolve(access_key_id: str | None = None, secret_access_key: str | None = None
            ) -> AccessKey:
    """The access key to sign with (see the module's docstring), or ``ConfigError``."""
    if access_key_id is not None or secret_access_key is not None:
        if not access_key_id or not secret_access_key:
            raise ConfigError("give both access_key_id and secret_access_key, or neither "
                              "(then they come from the environment or the credentials file)")
        return AccessKey(access_key_id, secret_access_key)
    for id_var, secret_var in ENV_PAIRS:
        key_id, secret = os.environ.get(id_var), os.environ.get(secret_var)
        if key_id and secret:
            return AccessKey(key_id, secret, f"${id_var}")
        if key_id or secret:
            raise ConfigError(f"set both {id_var} and {secret_var}, or neither")
    path = credentials_path()
    if not path.exists():
        raise ConfigError(
            "no access key for keyledger serve: pass access_key_id and secret_access_key, set "
            "KEYLEDGER_ACCESS_KEY_ID and KEYLEDGER_SECRET_ACCESS_KEY, or write them to "
            f"{path} (mode 0600); an admin makes one with `keyledger access-key create`")
    return read_file(path)


def read_file(path: Path) -> AccessKey:
    """The ``[default]`` access key of a credentials file that only its owner can read."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); it holds "
                f"a secret: `chmod 600 {path}` (and rotate the access key if others read it)")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error:
        raise ConfigError(f"{path} is not an INI file with a [{SECTION}] section") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"{path} has no [{SECTION}] section")
    sec = parser[SECTION]
    key_id = sec.get("access_key_id") or sec.get("aws_access_key_id")
    secret = sec.get("secret_access_key") or sec.get("aws_secret_access_key")
    if not key_id or not secret:
        raise ConfigError(f"[{SECTION}] of {path} needs access_key_id and secret_access_key")
    return AccessKey(key_id.strip(), secret.strip(), str(path))


__all__ = ["AccessKey", "credentials_path", "read_file", "resolve"]
