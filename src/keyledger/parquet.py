"""Parquet Modular Encryption with keyledger as the KMS (docs/parquet.md).

pyarrow encrypts a Parquet file's footer and columns with random data keys and asks a
``KmsClient`` to wrap them with *master keys*, named by string. Here a master key is a keyledger
key (its name or alias), and each wrap or unwrap is one ``ledger.encrypt`` / ``ledger.decrypt``
call: authorised (the principal needs ``user`` on the key), checked against the key's state and
audited once, with the master key named in the record. The wrapped key pyarrow stores in the
file is the base64 text of keyledger's self-describing ciphertext, which names the key version,
so files keep reading after ``rotate``.

Every wrap binds the encryption context ``{"purpose": "parquet-modular-encryption",
"master_key_id": <the master key identifier the file names>}``: an unwrap succeeds only when
the file's key material still names the master key that wrapped it, and the audit records say
which calls were Parquet's.

pyarrow caches KMS clients and key-encryption keys inside a ``CryptoFactory``; on reading it
never expires them (pyarrow 26), so a disabled key would keep reading through a long-lived
factory. ``crypto_factory`` therefore empties those caches whenever it hands out new file
properties, unless asked to keep them (``cache_keys=True``).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from .errors import InvalidCiphertext, InvalidInput, KeyLedgerError

PURPOSE = "parquet-modular-encryption"


class Ledger(Protocol):
    """What the KMS client needs of ``kl.open()``'s ``KeyLedger`` or ``kl.connect()``'s
    ``RemoteLedger``: their public, audited ``encrypt`` and ``decrypt``."""

    def encrypt(self, name: str, plaintext: bytes, *,
                context: Mapping[str, str] | None = None) -> bytes: ...

    def decrypt(self, ciphertext: bytes, *,
                context: Mapping[str, str] | None = None) -> bytes: ...


def wrap_context(master_key_id: str) -> dict[str, str]:
    """The encryption context every Parquet key wrap binds (and every unwrap must repeat)."""
    return {"purpose": PURPOSE, "master_key_id": master_key_id}


def _reraise(exc: KeyLedgerError, what: str) -> KeyLedgerError:
    """The same error class, its message prefixed with the Parquet step that failed (pyarrow
    hands the KMS client's exception itself back to the reader or writer)."""
    try:
        return type(exc)(f"{what}: {exc}")
    except TypeError:  # a subclass that wants more than a message: keep the original
        return exc


class KeyLedgerKmsClient(pe.KmsClient):
    """pyarrow's ``KmsClient`` over a ledger: wrap = ``encrypt``, unwrap = ``decrypt``."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        """Encrypt a data (or key-encryption) key under the keyledger key named by pyarrow."""
        try:
            wrapped = self.ledger.encrypt(master_key_identifier, key_bytes,
                                          context=wrap_context(master_key_identifier))
        except KeyLedgerError as exc:
            raise _reraise(exc, f"wrapping a Parquet key with master key "
                                f"{master_key_identifier!r}") from None
        return base64.b64encode(wrapped).decode("ascii")

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        """Decrypt a wrapped key; the key version comes from keyledger's ciphertext header."""
        what = f"unwrapping a Parquet key of master key {master_key_identifier!r}"
        try:
            blob = base64.b64decode(wrapped_key, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidCiphertext(f"{what}: the file's wrapped key is not base64 text; "
                                    "was it written with keyledger?") from None
        try:
            return self.ledger.decrypt(blob, context=wrap_context(master_key_identifier))
        except InvalidCiphertext as exc:
            raise InvalidCiphertext(
                f"{what}: {exc} (the file was written by another keyledger home, its key "
                "material was altered, or it names another master key than the one that "
                "wrapped it)") from None
        except KeyLedgerError as exc:
            raise _reraise(exc, what) from None


class KeyLedgerCryptoFactory(pe.CryptoFactory):
    """A ``CryptoFactory`` whose KMS is a ledger. Unless ``cache_keys``, each call that makes
    file properties first empties pyarrow's caches (KMS clients, key-encryption keys), so a
    key disabled, destroyed or revoked since stops the next read or write."""

    __slots__ = ("_cache_keys", "_ledger")

    def __init__(self, ledger: Ledger, *, cache_keys: bool = False) -> None:
        super().__init__(lambda _config: KeyLedgerKmsClient(ledger))
        self._ledger = ledger
        self._cache_keys = cache_keys

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    def _fresh(self) -> None:
        if not self._cache_keys:
            self.remove_cache_entries_for_all_tokens()

    def file_encryption_properties(self, *args: Any, **kwargs: Any) -> Any:
        self._fresh()
        return super().file_encryption_properties(*args, **kwargs)

    def file_decryption_properties(self, *args: Any, **kwargs: Any) -> Any:
        self._fresh()
        return super().file_decryption_properties(*args, **kwargs)

    def rotate_master_keys(self, *args: Any, **kwargs: Any) -> Any:
        self._fresh()
        return super().rotate_master_keys(*args, **kwargs)


def crypto_factory(ledger: Ledger, *, cache_keys: bool = False) -> pe.CryptoFactory:
    """pyarrow's ``CryptoFactory`` with keyledger as the KMS: master key identifiers are
    keyledger key names (or aliases). Works with ``kl.open()`` and ``kl.connect()``.

    ``cache_keys=False`` (the default) starts every ``file_encryption_properties`` /
    ``file_decryption_properties`` call with empty caches: each file written or read asks
    keyledger again (one audited call per master key with double wrapping). ``True`` keeps
    pyarrow's caching: fewer calls, but a factory that already unwrapped a file's key keeps
    reading it after the key is disabled, until ``remove_cache_entries_for_all_tokens()``.
    ``pyarrow.dataset`` calls the factory from C++, past the reset: use a new factory per
    scan (docs/parquet.md)."""
    if not callable(getattr(ledger, "encrypt", None)) or not callable(
            getattr(ledger, "decrypt", None)):
        raise InvalidInput("crypto_factory takes a ledger: kl.open(...) or kl.connect(...)")
    return KeyLedgerCryptoFactory(ledger, cache_keys=cache_keys)


def kms_connection() -> pe.KmsConnectionConfig:
    """The connection config to pass with a keyledger factory: it names keyledger as the
    file's KMS instance (recorded in the key material); the ledger itself is the connection."""
    return pe.KmsConnectionConfig(kms_instance_id="keyledger", kms_instance_url="keyledger")


def _column_keys(columns: Mapping[str, str]) -> dict[str, list[str]]:
    """``{column: master key}`` (what a data person writes) -> pyarrow's ``{key: [columns]}``."""
    if not isinstance(columns, Mapping) or not columns:
        raise InvalidInput("columns maps each column to encrypt to its master key, "
                           "e.g. {'ssn': 'pii-key'}")
    by_key: dict[str, list[str]] = {}
    for column, key in columns.items():
        for label, text in (("column", column), ("master key", key)):
            if not isinstance(text, str) or not text.strip() or any(c in text for c in ":;,"):
                raise InvalidInput(f"{label} {text!r}: a non-empty name without ':', ';' or ','")
        by_key.setdefault(key, []).append(column)
    return by_key


def encryption_config(footer_key: str, columns: Mapping[str, str], *,
                      double_wrapping: bool = True, plaintext_footer: bool = False,
                      external_key_material: bool = False, data_key_length_bits: int = 256,
                      **options: Any) -> pe.EncryptionConfiguration:
    """An ``EncryptionConfiguration``: the footer under ``footer_key``, each column of
    ``columns`` (``{column: master key}``) under its key. ``double_wrapping`` (pyarrow's
    default) makes one keyledger call per master key and file; ``external_key_material``
    writes the wrapped keys beside the file (``_KEY_MATERIAL_FOR_<file>.json``), which
    ``rotate_key_material`` can re-wrap in place. Data keys are 256-bit (pyarrow's default is
    128). Other ``options`` go to pyarrow as is."""
    if not isinstance(footer_key, str) or not footer_key.strip():
        raise InvalidInput("footer_key names the keyledger key of the file's footer")
    return pe.EncryptionConfiguration(
        footer_key, column_keys=_column_keys(columns), double_wrapping=double_wrapping,
        plaintext_footer=plaintext_footer, internal_key_material=not external_key_material,
        data_key_length_bits=data_key_length_bits, **options)


def decryption_config(**options: Any) -> pe.DecryptionConfiguration:
    """A ``DecryptionConfiguration`` (pyarrow's own; ``options`` as pyarrow takes them)."""
    return pe.DecryptionConfiguration(**options)


def write_table(table: pa.Table, path: str | os.PathLike, ledger: Ledger, *, footer_key: str,
                columns: Mapping[str, str], double_wrapping: bool = True,
                plaintext_footer: bool = False, external_key_material: bool = False,
                **write_options: Any) -> None:
    """Write ``table`` to ``path`` with its footer under ``footer_key`` and each column of
    ``columns`` (``{column: master key}``) under its key; ``write_options`` go to
    ``pyarrow.parquet.write_table``."""
    present = set(table.column_names)  # a nested column is named by its path, "address.zip"
    missing = sorted(c for c in columns if str(c).split(".")[0] not in present) \
        if isinstance(columns, Mapping) else []
    if missing:
        raise InvalidInput(f"columns to encrypt not in the table: {', '.join(missing)}")
    config = encryption_config(footer_key, columns, double_wrapping=double_wrapping,
                               plaintext_footer=plaintext_footer,
                               external_key_material=external_key_material)
    props = crypto_factory(ledger).file_encryption_properties(
        kms_connection(), config, parquet_file_path=_path(path) if external_key_material else None)
    pq.write_table(table, _path(path), encryption_properties=props, **write_options)


def read_table(path: str | os.PathLike, ledger: Ledger, *,
               columns: Sequence[str] | None = None, **read_options: Any) -> pa.Table:
    """Read an encrypted Parquet file (or a plain one); each key it needs is unwrapped by one
    audited keyledger call. ``columns`` limits what is read (and so which keys are asked)."""
    props = crypto_factory(ledger).file_decryption_properties(
        kms_connection(), decryption_config(), parquet_file_path=_path(path))
    return pq.read_table(_path(path), columns=columns, decryption_properties=props,
                         **read_options)


def rotate_key_material(path: str | os.PathLike, ledger: Ledger, *,
                        double_wrapping: bool = True) -> None:
    """Re-wrap the keys of a file written with ``external_key_material=True`` under each
    master key's latest version (after ``ledger.rotate``), without rewriting the data: the
    Parquet analogue of ``rewrap_many``. Files with key material inside cannot be re-wrapped
    in place; they keep reading as long as their key version is usable."""
    file = Path(_path(path))
    if not file.is_file():
        raise InvalidInput(f"no Parquet file at {file}")
    if not key_material_file(file).is_file():
        raise InvalidInput(
            f"{file.name} keeps its key material inside the file (written without "
            "external_key_material=True), which cannot be re-wrapped in place: it reads while "
            "its key version is usable; to move it to the latest version, rewrite it "
            "(read_table, then write_table)")
    crypto_factory(ledger).rotate_master_keys(kms_connection(), str(file),
                                              double_wrapping=double_wrapping)


def key_material_file(path: str | os.PathLike) -> Path:
    """Where pyarrow keeps a file's external key material (beside it; keep the two together)."""
    file = Path(_path(path))
    return file.with_name(f"_KEY_MATERIAL_FOR_{file.name}.json")


def _path(path: str | os.PathLike) -> str:
    if not isinstance(path, str | os.PathLike):
        raise InvalidInput(f"path must be a file path, not {type(path).__name__}")
    return os.fspath(path)
