"""Provisioning of the embedded SoftHSM2 token inside a home (never the system token dir)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..config import (
    DEFAULT_TOKEN_LABEL,
    HsmConfig,
    find_softhsm_module,
    new_pin,
    require_tool,
    write_config,
    write_secret,
)
from ..errors import ConfigError
from .backend import TokenFile


def softhsm_conf_text(token_dir: Path) -> str:
    return (
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )


def token_dir(conf: Path) -> Path:
    """The token directory a SoftHSM2 configuration file names."""
    try:
        for line in conf.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip() == "directories.tokendir":
                return Path(v.strip())
    except OSError as exc:
        raise ConfigError(f"cannot read {conf} ({exc.strerror})") from None
    raise ConfigError(f"{conf} names no directories.tokendir")


def read_token_dir(root: Path) -> list[TokenFile]:
    """Every file and folder under ``root`` (names relative to it), read in full: a token
    directory is small. Files another process removes meanwhile are left out."""
    out: list[TokenFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath).relative_to(root).as_posix()
        st = os.stat(dirpath)
        out.append((base, None, st.st_mode, st.st_mtime))
        for fname in sorted(filenames):
            p = Path(dirpath) / fname
            try:
                st = p.stat()
                out.append((Path(base, fname).as_posix(), p.read_bytes(), st.st_mode,
                            st.st_mtime))
            except FileNotFoundError:  # removed by another process since the listing
                continue
    return out


def provision_embedded(home: Path) -> HsmConfig:
    """Create a private SoftHSM2 config, token dir, token and 0600 PIN files in ``home``."""
    module = find_softhsm_module()
    if module is None:
        raise ConfigError(
            "SoftHSM2 is not installed (no libsofthsm2.so found); run `make setup` or install "
            "the softhsm2 package, or set KEYLEDGER_PKCS11_MODULE to another PKCS#11 module"
        )
    util = require_tool("softhsm2-util", "softhsm2")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    token_dir = home / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    conf = home / "softhsm2.conf"
    conf.write_text(softhsm_conf_text(token_dir))
    user_pin, so_pin = new_pin(), new_pin()
    write_secret(home / "user.pin", user_pin)
    write_secret(home / "so.pin", so_pin)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    result = subprocess.run(
        [util, "--init-token", "--free", "--label", DEFAULT_TOKEN_LABEL, "--pin", user_pin,
         "--so-pin", so_pin],
        env=env, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise ConfigError(
            f"softhsm2-util could not initialise the embedded token in {token_dir} "
            f"(exit {result.returncode}); check the folder is writable"
        )
    write_config(
        home,
        {
            "hsm": {
                "embedded": True,
                "module": module,
                "token_label": DEFAULT_TOKEN_LABEL,
                "pin_file": "user.pin",
                "softhsm2_conf": "softhsm2.conf",
            },
            "audit": {"strict": False, "fsync_interval_ms": 50},
        },
    )
    return HsmConfig(module, DEFAULT_TOKEN_LABEL, home / "user.pin", None, conf, True)
