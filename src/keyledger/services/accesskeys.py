"""Access keys of ``keyledger serve`` (AWS style: an id and a secret per principal).

The secret is sealed with AES-256-GCM under a non-extractable HSM key made on first use (its
handle kept in meta ``access_key_seal``), with the id and principal as associated data: the
store alone reveals no secret, and a row moved to another principal no longer unseals.
``AccessKeyService`` is the admin side (create, list, disable, enable, delete; audited);
``AccessKeyDirectory`` is what the server asks per request (not audited: the request is).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidInput, KeyExists, KeyNotFound
from ..frames import normalize
from ..hsm.backend import DecryptFailed
from ..model import SPECS, validate_name
from ..runtime import HomeRuntime, naive
from ..store import access_keys as repo
from ..store import meta
from ..store.db import Tx
from .context import Service

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("keyledger")
SEAL_META = "access_key_seal"
STAMP_FILE = "access_keys.stamp"  # rewritten after each change: servers reload their table
UNAUTHENTICATED = "(unauthenticated)"  # the principal of refused requests (never a valid name)
ID_PREFIX = "KLAK"
_ID_RE = re.compile(r"[A-Z0-9]{16,128}")
_SECRET_RE = re.compile(r"[\x21-\x7e]{16,128}")
_NONCE = 12


@dataclass(frozen=True)
class AccessKeySecret:
    """A new access key: shown once. ``repr`` never shows the secret."""

    access_key_id: str
    principal: str
    secret_access_key: str = field(repr=False)

    def as_aws(self) -> dict[str, str]:
        """The pair as AWS tools name it."""
        return {"AccessKeyId": self.access_key_id, "SecretAccessKey": self.secret_access_key}


def validate_access_key_id(value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidInput("an access key id is 16 to 128 capital letters and digits "
                           "(like AWS's, e.g. AKIAIOSFODNN7EXAMPLE)")
    return value


def validate_secret(value: object) -> str:
    if not isinstance(value, str) or not _SECRET_RE.fullmatch(value):
        raise InvalidInput("a secret access key is 16 to 128 printable ASCII characters "
                           "without spaces (AWS's are 40)")
    return value


def _aad(access_key_id: str, principal: str) -> bytes:
    return f"keyledger-access-key\0{access_key_id}\0{principal}".encode()


def _seal_handle(rt: HomeRuntime, tx: Tx) -> bytes:
    """The HSM key sealing secrets, made with the first access key."""
    def make() -> str:
        handle = secrets.token_bytes(16)
        rt.backend.generate(SPECS["AES_256"], handle, f"keyledger-access-keys:{rt.home}",
                            exportable=False)
        return handle.hex()
    return bytes.fromhex(meta.get_or_make(tx, SEAL_META, make))


def seal(rt: HomeRuntime, tx: Tx, access_key_id: str, principal: str, secret: str) -> str:
    nonce = os.urandom(_NONCE)
    sealed = rt.backend.encrypt_gcm(_seal_handle(rt, tx), nonce,
                                    _aad(access_key_id, principal), secret.encode())
    return (nonce + sealed).hex()


def unseal(rt: HomeRuntime, handle: bytes, row: repo.AccessKeyRow) -> str | None:
    """The secret, or None when the row does not unseal (changed outside keyledger)."""
    try:
        data = bytes.fromhex(row.secret_sealed)
        plain = rt.backend.decrypt_gcm(handle, data[:_NONCE], _aad(row.access_key_id,
                                                                   row.principal), data[_NONCE:])
        return plain.decode()
    except (ValueError, DecryptFailed):
        log.warning("access key %s does not unseal: its store row was changed outside keyledger",
                    row.access_key_id)
        return None


def _touch_stamp(home: Path) -> None:
    (home / STAMP_FILE).write_text(secrets.token_hex(8))


class AccessKeyService(Service):
    """Creating and managing access keys: home-wide admins only; each call audited."""

    def create_access_key(self, principal: str, *, key_id: str | None = None,
                          secret: str | None = None) -> AccessKeySecret:
        with self._audited("create_access_key", None) as rec:
            self._authorize(rec, "create_access_key", None)
            who = validate_name(principal, "principal")
            if (key_id is None) != (secret is None):
                raise InvalidInput("give both key_id and secret (registering an existing pair) "
                                   "or neither (a new pair)")
            kid = validate_access_key_id(key_id) if key_id is not None else _new_id()
            sec = validate_secret(secret) if secret is not None else _new_secret()
            rec.detail = f"access key {kid} for principal {who}"
            with self._rt.db.write(export=False) as tx:
                if repo.get(tx, kid) is not None:
                    raise KeyExists(f"access key {kid} already exists; choose another id")
                repo.add(tx, access_key_id=kid, principal=who,
                         secret_sealed=seal(self._rt, tx, kid, who, sec),
                         created_by=self.principal, now=naive(self._now()))
                tx.after_commit.append(lambda: _touch_stamp(self.home))
        return AccessKeySecret(kid, who, sec)

    def access_keys(self) -> pd.DataFrame:
        with self._audited("list_access_keys", None) as rec:
            self._authorize(rec, "list_access_keys", None)
            with self._rt.db.read() as tx:
                return normalize(repo.frame(tx), times=("created_at", "changed_at",
                                                          "last_used_at"))

    def set_access_key_state(self, access_key_id: str, state: str) -> None:
        action = "disable_access_key" if state == repo.DISABLED else "enable_access_key"
        with self._audited(action, None) as rec:
            self._authorize(rec, action, None)
            kid = validate_access_key_id(access_key_id)
            with self._rt.db.write(export=False) as tx:
                row = self._existing(tx, kid)
                rec.detail = f"access key {kid} of principal {row.principal}"
                repo.set_state(tx, kid, state, by=self.principal, now=naive(self._now()))
                tx.after_commit.append(lambda: _touch_stamp(self.home))

    def delete_access_key(self, access_key_id: str) -> None:
        with self._audited("delete_access_key", None) as rec:
            self._authorize(rec, "delete_access_key", None)
            kid = validate_access_key_id(access_key_id)
            with self._rt.db.write(export=False) as tx:
                row = self._existing(tx, kid)
                rec.detail = f"access key {kid} of principal {row.principal}"
                repo.delete(tx, kid)
                tx.after_commit.append(lambda: _touch_stamp(self.home))

    @staticmethod
    def _existing(tx: Tx, kid: str) -> repo.AccessKeyRow:
        row = repo.get(tx, kid)
        if row is None:
            raise KeyNotFound(f"no access key {kid}; `keyledger access-key list` shows them")
        return row

    def record_refused(self, action: str, error: str, detail: str, *, outcome: str = "denied",
                       unauthenticated: bool = False) -> None:
        """One audit record for a request refused before any operation ran (bad signature,
        malformed body, ...): by this ledger's principal, or ``(unauthenticated)``."""
        try:
            _check_refusal(action, error, detail, outcome, unauthenticated)
        except InvalidInput:
            with self._audited("record_refused", None):  # the misuse itself, once
                raise
        ctx = self.ctx
        who = UNAUTHENTICATED if unauthenticated else self.principal
        ctx.rt.journal.append(ctx.time_us(), who, action, None, None, None, outcome, error,
                              detail[:500], None)


REFUSED_ACTIONS = ("authenticate", "request")
_ERROR_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")


def _check_refusal(action: object, error: object, detail: object, outcome: object,
                   unauthenticated: object) -> None:
    if action not in REFUSED_ACTIONS:
        raise InvalidInput(f"action must be one of {', '.join(REFUSED_ACTIONS)}")
    if not isinstance(error, str) or not _ERROR_RE.fullmatch(error):
        raise InvalidInput("error must be an error name such as InvalidSignatureException")
    if not isinstance(detail, str):
        raise InvalidInput(f"detail must be text, not {type(detail).__name__}")
    if outcome not in ("denied", "failed"):
        raise InvalidInput("outcome must be 'denied' or 'failed'")
    if not isinstance(unauthenticated, bool):
        raise InvalidInput("unauthenticated must be True or False")


def _new_id() -> str:
    return ID_PREFIX + base64.b32encode(secrets.token_bytes(10)).decode()


def _new_secret() -> str:
    return base64.b64encode(secrets.token_bytes(30)).decode()


class AccessKeyDirectory:
    """The server's view of the access keys: reloaded when the stamp file changes (another
    process created, disabled or deleted one). A secret is unsealed in the HSM on its key's
    first request after a (re)load and kept until the next reload: unsealing the same row
    again gives the same answer, and an HSM call per request halved the service's
    throughput (every PKCS#11 call of the process is serialised)."""

    def __init__(self, rt: HomeRuntime) -> None:
        self._rt = rt
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None | bool = False  # False: never loaded
        self._rows: dict[str, repo.AccessKeyRow] = {}
        self._handle: bytes | None = None
        self._secrets: dict[str, str] = {}  # access key id -> unsealed secret, of self._rows
        self._used: dict[str, datetime] = {}

    def _stamp_now(self) -> tuple[int, int, int] | None:
        try:
            st = (self._rt.home / STAMP_FILE).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        stamp = self._stamp_now()
        if stamp == self._stamp:
            return
        with self._rt.db.read() as tx:
            rows = {r.access_key_id: r for r in repo.all_rows(tx)}
            handle = meta.get(tx, SEAL_META)
        self._rows, self._stamp, self._secrets = rows, stamp, {}
        self._handle = bytes.fromhex(handle) if handle else None

    def credentials(self, access_key_id: str) -> tuple[str, str] | None:
        """(principal, secret) of an active access key, else None."""
        with self._lock:
            self._refresh()
            row = self._rows.get(access_key_id)
            handle, secret = self._handle, self._secrets.get(access_key_id)
        if row is None or row.state != repo.ACTIVE or handle is None:
            return None
        if secret is None:
            secret = unseal(self._rt, handle, row)
            if secret is None:
                return None
            with self._lock:
                if self._rows.get(access_key_id) is row:  # not reloaded meanwhile
                    self._secrets[access_key_id] = secret
        return row.principal, secret

    def note_used(self, access_key_id: str, when: datetime) -> None:
        with self._lock:
            self._used[access_key_id] = when

    def flush_used(self) -> None:
        """Write the last-use times noted since the previous flush (one short transaction)."""
        with self._lock:
            used, self._used = self._used, {}
        if used:
            with self._rt.db.write(export=False) as tx:
                repo.touch(tx, {k: naive(v) for k, v in used.items()})
