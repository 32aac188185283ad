"""Restore: turn a backup into a new home's files (never over an existing one); the facade's
``keyledger.restore`` opens it.

The archive is extracted into a staging folder next to the target, every byte authenticated
before the folder is renamed into place; the SoftHSM2 configuration is rewritten to point at
the restored token.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .. import outputs
from ..config import CONFIG_NAME, DB_NAME, find_softhsm_module, write_config
from ..errors import ConfigError, InvalidCiphertext, InvalidInput
from ..hsm.pkcs11_backend import embedded_confs_in_use
from ..hsm.softhsm import softhsm_conf_text
from ..store.catalog import SNAPSHOT_NAME
from ..store.journal import SUFFIX as JOURNAL_SUFFIX
from .archive import MANIFEST_NAME, as_error
from .stream import FORMAT_VERSION, SealedReader, check_passphrase


@dataclass
class Restored:
    """A home restored from a backup, before it is opened (``keyledger.restore`` opens it)."""

    home: Path
    manifest: dict
    sha256: str
    bytes: int


def restore_files(path: str | os.PathLike, home: str | os.PathLike,
                   passphrase: str | bytes) -> Restored:
    if not isinstance(home, str | os.PathLike):
        raise InvalidInput("path and home must be file paths")
    src = outputs.check_source(path, "backup file")
    target = Path(home).expanduser().absolute().resolve()  # through links, as it is written
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} is not empty; restore into a new, empty folder (a restore "
                          "never overwrites a home)")
    _refuse_inside_a_home(target)
    secret = check_passphrase(passphrase)
    _check_process_free()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restoring-", dir=target.parent))
    try:
        with open(src, "rb") as fh:
            reader = SealedReader(fh, secret, str(src))
            manifest = _extract(reader, staging)
            reader.drain()
        _relocate(staging, target, manifest)
        os.chmod(staging, 0o700)
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise as_error(exc, f"restoring into {target}") from None
        raise
    return Restored(target, manifest, reader.sha256, reader.bytes)


def _refuse_inside_a_home(target: Path) -> None:
    """A restore never writes into an existing home (its folders are the home's business)."""
    for folder in target.parents:
        if (folder / CONFIG_NAME).is_file():
            raise InvalidInput(f"{target} is inside the keyledger home {folder}; restore into a "
                               "new, empty folder outside any home")


def _check_process_free() -> None:
    confs = embedded_confs_in_use()
    if confs:
        raise ConfigError(
            f"this process has an embedded home open (SOFTHSM2_CONF={confs[0]}); a process uses "
            "one SoftHSM2 configuration: close that ledger first or restore in another process")


_TOP_FILES = {MANIFEST_NAME, CONFIG_NAME, DB_NAME, f"{DB_NAME}.wal", SNAPSHOT_NAME}


def _allowed(name: str, manifest: dict) -> bool:
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return False
    if name in _TOP_FILES or name == manifest["softhsm2_conf"] or name in manifest["pin_files"]:
        return True
    tokens = manifest["token_dir"]
    if name == tokens or name.startswith(tokens + "/"):
        return True
    return name == "journal" or (len(parts) == 2 and parts[0] == "journal"
                                 and parts[1].endswith(JOURNAL_SUFFIX))


def _extract(reader: SealedReader, staging: Path) -> dict:
    damaged = (f"the backup {reader.name} is damaged (its content is not a keyledger home "
               "archive); nothing was restored")
    manifest: dict | None = None
    try:
        # typeshed's tarfile wants write/tell/seek of any fileobj; a stream ("r|") only reads
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                if manifest is None:
                    if member.name != MANIFEST_NAME or not member.isfile():
                        raise InvalidCiphertext(damaged)
                    fh = tar.extractfile(member)
                    manifest = json.loads(fh.read()) if fh else None
                    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
                        raise InvalidCiphertext(damaged)
                    continue
                if not (member.isfile() or member.isdir()) or not _allowed(member.name,
                                                                           manifest):
                    raise InvalidCiphertext(f"{damaged} (unexpected member {member.name!r})")
                tar.extract(member, staging, filter="data")
    except (tarfile.TarError, json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise InvalidCiphertext(damaged) from None
    if manifest is None:
        raise InvalidCiphertext(damaged)
    for name in (CONFIG_NAME, DB_NAME, manifest["softhsm2_conf"], manifest["token_dir"],
                 *manifest["pin_files"]):
        if not (staging / name).exists():
            raise InvalidCiphertext(f"{damaged} ({name} is missing)")
    return manifest


def _relocate(staging: Path, target: Path, manifest: dict) -> None:
    """Point the restored home's SoftHSM2 config (and, if needed, settings) at ``target``."""
    (staging / manifest["softhsm2_conf"]).write_text(
        softhsm_conf_text(target / manifest["token_dir"]))
    for pin in manifest["pin_files"]:
        os.chmod(staging / pin, 0o600)
    cfg_path = staging / CONFIG_NAME
    try:
        data = tomllib.loads(cfg_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        raise InvalidCiphertext("the restored keyledger.toml is unreadable") from None
    hsm = data.get("hsm", {})
    changed = False
    if not Path(str(hsm.get("module", ""))).exists():
        module = find_softhsm_module()
        if module is None:
            raise ConfigError("SoftHSM2 is not installed here (no libsofthsm2.so found); "
                              "install the softhsm2 package and restore again")
        hsm["module"], changed = module, True
    for key, rel in (("softhsm2_conf", manifest["softhsm2_conf"]),
                     ("pin_file", manifest["pin_files"][0] if manifest["pin_files"] else None)):
        if rel is not None and key in hsm and Path(str(hsm[key])).is_absolute():
            hsm[key], changed = rel, True
    if changed:
        data["hsm"] = hsm
        write_config(staging, data)
