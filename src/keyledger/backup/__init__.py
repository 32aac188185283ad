"""Backup, restore and restore tests of an embedded (SoftHSM2) home.

A backup is one file: a tar archive of the home (DuckDB store, SoftHSM2 token directory,
settings, catalog snapshot, journals not yet ingested and the PIN files), encrypted in chunks
with AES-256-GCM under a key derived from a passphrase with scrypt. The byte layout is in
``docs/backup.md``. ``KeyLedger.backup`` writes one, ``keyledger.restore`` turns one into
a new home, and ``KeyLedger.restore_test`` proves one restores (in a subprocess), recording each
of them in the ``backups`` table of the store for compliance evidence.

One job per module: ``stream`` (the sealed AES-GCM stream), ``archive`` (what goes into the
tar and how it is taken consistently), ``restore`` (archive -> a new home's files), ``restore_test`` (the
child process, run as ``python -m keyledger.backup.restore_test``), ``reports`` (results and
the ``backups`` table) and ``mixin`` (the audited ``KeyLedger`` methods).
"""

from .archive import INTENT_WAIT_S, MANIFEST_NAME, archive_names
from .mixin import RESTORE_TEST_SAMPLE, BackupMixin
from .reports import BackupInfo, RestoreTestReport, record_event
from .stream import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    HEADER_LEN,
    KDF_SCRYPT,
    MAGIC,
    MIN_PASSPHRASE,
    SCRYPT_LOG2_N,
    SCRYPT_P,
    SCRYPT_R,
    TAG_LEN,
)

__all__ = [
    "CHUNK_SIZE", "FORMAT_VERSION", "HEADER_LEN", "INTENT_WAIT_S", "KDF_SCRYPT", "MAGIC",
    "MANIFEST_NAME", "MIN_PASSPHRASE", "RESTORE_TEST_SAMPLE", "SCRYPT_LOG2_N", "SCRYPT_P",
    "SCRYPT_R", "TAG_LEN", "BackupInfo", "BackupMixin", "RestoreTestReport", "archive_names",
    "record_event",
]
