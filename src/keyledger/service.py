"""KeyLedger: the one way in, a facade over the services. Every public call is authorised,
executed and audited once (by the service it delegates to)."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import outputs
from .access import WILDCARD
from .backup import RESTORE_TEST_SAMPLE, BackupInfo, RestoreTestReport
from .backup.restore import restore_files
from .byok import WrappedKey
from .config import default_home
from .errors import InvalidInput, KeyStateError
from .hsm.backend import Capabilities
from .model import Key, validate_name
from .rotation import DueReport
from .runtime import HomeRuntime, ReconcileReport
from .services.accesskeys import AccessKeySecret, AccessKeyService
from .services.audit import AUDIT_LIMIT, AuditService
from .services.backup import BackupService
from .services.batch import BatchService
from .services.compliance import ComplianceService
from .services.context import Audited, Context
from .services.crypto import CryptoService, DataKey
from .services.envelopes import CHUNK_SIZE
from .services.governance import CUSTODIAN_STATEMENT, GovernanceService, Runner
from .services.home import HomeService
from .services.importexport import ImportExportService
from .services.lifecycle import MAX_DELETION_DAYS, MIN_DELETION_DAYS, LifecycleService
from .services.maintenance import MaintenanceService, RewrapResult
from .store.verify import VerifyReport

if TYPE_CHECKING:
    import pandas as pd

    from .display import AuditFrame

_Audited = Audited  # the name docs and older scripts use
__all__ = ["MAX_DELETION_DAYS", "MIN_DELETION_DAYS", "DataKey", "KeyLedger", "open", "restore"]


class KeyLedger:
    """Manage keys held in an HSM, with every call recorded in a tamper-evident ledger.

    Open with ``keyledger.open()``. Safe to share between threads; several processes may open
    the same home at once.
    """

    def __init__(self, home: Path, *, principal: str,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.home = home
        self.principal = principal
        self.last_reconcile: ReconcileReport = ReconcileReport()
        try:
            # the whole open (the runtime's setup, the first admin, reconcile) runs back to
            # back on one start of the store instead of one per transaction
            with contextlib.ExitStack() as held:
                self._rt = HomeRuntime.acquire(home, simulate=clock is not None, held=held)
                self._ctx = ctx = Context(home, principal, self._rt)
                self._build_services(ctx)
                self.last_reconcile = self._home.open(clock)
        except BaseException:
            if hasattr(self, "_ctx"):  # (also when closing the held store failed)
                self.close()
            raise

    def _build_services(self, ctx: Context) -> None:
        """The services, each with the context and the peers it builds on, and the quorum
        gate's table: which service executes an approved request of each action."""
        self._lifecycle = LifecycleService(ctx)
        self._crypto = crypto = CryptoService(ctx, self._lifecycle)
        # The single-value hot calls go to the service's methods directly, one Python call
        # less each (issue 18): these instance attributes shadow the methods of the same name
        # below, which keep the public signatures and docstrings (the service's are the same).
        # Not in a subclass, whose own overrides of them must stay in charge.
        if type(self) is KeyLedger:
            vars(self).update(encrypt=crypto.encrypt, decrypt=crypto.decrypt,
                              generate_data_key=crypto.generate_data_key)
        self._batch = BatchService(ctx, self._lifecycle)
        self._home = HomeService(ctx)
        self._audit = AuditService(ctx)
        self._compliance = ComplianceService(ctx)
        self._maintenance = MaintenanceService(ctx, self._lifecycle, self._batch,
                                               self._compliance)
        self._io = ImportExportService(ctx, self._lifecycle)
        self._backup = BackupService(ctx)
        self._access_keys = AccessKeyService(ctx)
        lifecycle, maintenance = self._lifecycle, self._maintenance
        runners: dict[str, Runner] = {
            "destroy": lambda name, why, params: lifecycle.destroy_key(name, why, approved=True),
            "set_policy": lambda name, why, params: lifecycle.apply_policy(
                name or WILDCARD, approved=True, **params),
            "trim": lambda name, why, params: maintenance.trim_versions(
                name, params.get("min_version"), approved=True),
            "export_key": self._io.run_export_key,
            "import_key": self._io.run_import_key,
        }
        self._governance = GovernanceService(ctx, runners)

    @property
    def simulation(self) -> bool:
        """True in a home created as a simulation (``kl.open(new_home, clock=...)``): times may
        come from a simulated clock, and views and reports say so."""
        return self._rt.simulation

    @property
    def _clock(self) -> Callable[[], datetime] | None:
        """This ledger's injected clock (simulation homes), else None: trusted time."""
        return self._ctx.clock

    def now(self) -> datetime:
        """This ledger's time: trusted time, or in a simulation home its injected clock's time
        (what views and reports count days from)."""
        return self._ctx.now()

    def _audited(self, action: str, name: object, context: bytes | None = None) -> Audited:
        """One audit record for a call made on this ledger's behalf (``backup.restore``)."""
        return self._ctx.audited(action, name, context)

    def __repr__(self) -> str:
        return f"<KeyLedger home={str(self.home)!r} principal={self.principal!r}>"

    def __enter__(self) -> KeyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush the audit journal into the store and release the HSM session."""
        if not self._ctx.closed:
            self._ctx.closed = True
            self._rt.release()

    @contextlib.contextmanager
    def keep_store_open(self) -> Iterator[KeyLedger]:
        """Keep the DuckDB store open across the calls in this block, for bulk admin work.

        Each call that writes the store then costs ~1 ms of store time instead of ~24 ms
        (opening and closing the file), e.g. creating or granting hundreds of keys. The file
        stays locked until the block ends: other processes' key operations go on (they only
        journal), but their reads and admin calls wait, and fail with ``StoreBusy`` after
        ``store_busy_timeout_s``. Keep blocks for scripts that run while nothing else needs
        the store. Not audited: it changes no key, grant or record.
        """
        if self._ctx.closed:
            raise KeyStateError("this KeyLedger is closed; open the home again")
        with self._rt.db.hold():
            yield self

    # -- lifecycle -----------------------------------------------------------------------------------
    def create_key(self, name: str, *, spec: str, purpose: str | None = None,
                   owner: str | None = None, tags: Mapping[str, str] | None = None,
                   rotation_period: timedelta | str | None = None,
                   exportable: bool = False, activate: bool = True) -> Key:
        """Generate version 1 in the HSM (sensitive; non-extractable unless ``exportable``)."""
        return self._lifecycle.create_key(
            name, spec=spec, purpose=purpose, owner=owner, tags=tags,
            rotation_period=rotation_period, exportable=exportable, activate=activate)

    def get_key(self, name: str) -> Key:
        """The key's current metadata: a copy, so changing it changes nothing else."""
        return self._lifecycle.get_key(name)

    def list_keys(self) -> pd.DataFrame:
        """One row per key: name, spec, purpose, state, latest_version, owner, created_at, ..."""
        return self._lifecycle.list_keys()

    def rotate(self, name: str, *, reason: str = "rotation") -> Key:
        """Add a new version; older versions keep decrypting and verifying."""
        return self._lifecycle.rotate(name, reason=reason)

    def enable(self, name: str, *, reason: str = "enabled") -> Key:
        return self._lifecycle.enable(name, reason=reason)

    def disable(self, name: str, *, reason: str = "disabled") -> Key:
        """Suspend all use of the key until it is enabled again."""
        return self._lifecycle.disable(name, reason=reason)

    def deactivate(self, name: str, *, reason: str = "deactivated") -> Key:
        """Stop applying protection; existing data stays decryptable and verifiable."""
        return self._lifecycle.deactivate(name, reason=reason)

    def mark_compromised(self, name: str, reason: str) -> Key:
        """Record a suspected compromise: no more protection; decrypt/verify stay possible."""
        return self._lifecycle.mark_compromised(name, reason)

    def schedule_deletion(self, name: str, days: int = 30, *, reason: str = "scheduled") -> Key:
        """Block all use now and allow ``destroy`` after ``days`` (7..30)."""
        return self._lifecycle.schedule_deletion(name, days, reason=reason)

    def cancel_deletion(self, name: str, *, reason: str = "deletion cancelled") -> Key:
        """Restore the state the key had before deletion was scheduled."""
        return self._lifecycle.cancel_deletion(name, reason=reason)

    def destroy(self, name: str, *, reason: str = "destroyed") -> Key:
        """Remove every version's material from the HSM once the waiting period has passed.

        The catalog keeps the key's metadata as ``destroyed``. When the key's quorum is above 1,
        use ``request("destroy", name, reason)`` and have other admins ``approve`` it.
        """
        return self._lifecycle.destroy(name, reason=reason)

    def set_alias(self, name: str, alias: str) -> Key:
        return self._lifecycle.set_alias(name, alias)

    def remove_alias(self, alias: str) -> Key:
        """Remove an alias (a key's own name cannot be removed); returns the key it named."""
        return self._lifecycle.remove_alias(alias)

    def move_alias(self, alias: str, name: str) -> Key:
        """Point an existing alias at key ``name`` instead (admin on both keys)."""
        return self._lifecycle.move_alias(alias, name)

    def set_tags(self, name: str, tags: Mapping[str, str]) -> Key:
        return self._lifecycle.set_tags(name, tags)

    def set_policy(self, name: str, *, rotation_period: timedelta | str | None = None,
                   min_decryption_version: int | None = None,
                   min_encryption_version: int | None = None, owner: str | None = None,
                   quorum: int | None = None, creator_is_user: bool | None = None,
                   usage_limit: int | None = None, auto_rotate: bool | None = None,
                   rotation_by_purpose: Mapping[str, timedelta | str] | None = None,
                   rotation_by_tag: Mapping[str, timedelta | str] | None = None) -> Key | None:
        """Change a key's policy, or with ``name="*"`` the home's.

        Per key: rotation_period, min_decryption_version, min_encryption_version, owner,
        quorum, usage_limit (encryptions per version, 1 to 2**63-1, enforced in each call:
        see docs/rotation.md), auto_rotate (rotate at the limit instead of refusing).
        Home (``"*"``): quorum, creator_is_user, usage_limit, rotation_by_purpose
        (e.g. ``{"encrypt": "30d"}``), rotation_by_tag (e.g. ``{"env=prod": "30d"}``).
        A key's own rotation_period beats a tag rule, which beats the home's purpose rule.

        Weakening changes (longer rotation period, lower minimum versions, lower quorum) need
        ``request("set_policy", name, reason, **changes)`` when the quorum is above 1.
        """
        return self._lifecycle.set_policy(
            name, rotation_period=rotation_period, min_decryption_version=min_decryption_version,
            min_encryption_version=min_encryption_version, owner=owner, quorum=quorum,
            creator_is_user=creator_is_user, usage_limit=usage_limit, auto_rotate=auto_rotate,
            rotation_by_purpose=rotation_by_purpose, rotation_by_tag=rotation_by_tag)

    # -- crypto --------------------------------------------------------------------------------------
    def encrypt(self, name: str, plaintext: bytes, *,
                context: Mapping[str, str] | None = None) -> bytes:
        """AES-GCM in the HSM; returns a self-describing ciphertext (see docs/ciphertext.md)."""
        return self._crypto.encrypt(name, plaintext, context=context)

    def decrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt any keyledger ciphertext; the key and version come from its header."""
        return self._crypto.decrypt(ciphertext, context=context)

    def encrypt_many(self, name: str, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any:
        """Encrypt a column (list of bytes, pandas Series or Arrow binary array) under ``name``:
        the same kind back, nulls null, one audit record (docs/batch.md); ``errors="return"``
        gives a ``BatchResult`` with per-item errors instead of raising."""
        return self._batch.encrypt_many(name, values, context=context, errors=errors)

    def decrypt_many(self, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any:
        """Decrypt a column of ciphertexts of one key (any versions): the same kind back, nulls
        null, one audit record (docs/batch.md)."""
        return self._batch.decrypt_many(values, context=context, errors=errors)

    def rewrap(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Re-encrypt under the key's latest version without exposing plaintext to the caller."""
        return self._crypto.rewrap(ciphertext, context=context)

    def generate_data_key(self, name: str, *,
                          context: Mapping[str, str] | None = None) -> DataKey:
        """A fresh 256-bit data key, and the same key encrypted under ``name`` to store."""
        return self._crypto.generate_data_key(name, context=context)

    def envelope_encrypt(self, name: str, data: bytes, *,
                         context: Mapping[str, str] | None = None) -> bytes:
        """Encrypt large data locally under a fresh data key; the wrapped key travels with it.
        ``data`` may be bytes, a bytearray or a memoryview (read in place, not copied)."""
        return self._crypto.envelope_encrypt(name, data, context=context)

    def envelope_decrypt(self, blob: bytes, *,
                         context: Mapping[str, str] | None = None) -> bytes:
        """The data of an envelope (bytes, bytearray or memoryview; read in place)."""
        return self._crypto.envelope_decrypt(blob, context=context)

    def envelope_encrypt_stream(self, name: str, source: Any, sink: Any, *,
                                context: Mapping[str, str] | None = None,
                                chunk_size: int = CHUNK_SIZE, overwrite: bool = False,
                                progress: bool = True) -> int:
        """Envelope-encrypt a file larger than memory, chunk by chunk: ``source`` a binary
        file-like or a path, ``sink`` a binary file-like or a new path (written through a
        temporary file; ``overwrite`` to replace one). Returns the plaintext bytes read."""
        return self._crypto.envelope_encrypt_stream(
            name, source, sink, context=context, chunk_size=chunk_size, overwrite=overwrite,
            progress=progress)

    def envelope_decrypt_stream(self, source: Any, sink: Any, *,
                                context: Mapping[str, str] | None = None,
                                overwrite: bool = False, progress: bool = True) -> int:
        """Decrypt a streamed envelope chunk by chunk; every chunk is authenticated before it
        is written. A file-like ``sink`` may hold the chunks before a failing one: discard it
        on error (a path ``sink`` is written only when the whole stream is authentic)."""
        return self._crypto.envelope_decrypt_stream(
            source, sink, context=context, overwrite=overwrite, progress=progress)

    def sign(self, name: str, message: bytes) -> bytes:
        """RSA-PSS-SHA256, ECDSA (DER) or Ed25519 signature with the latest version."""
        return self._crypto.sign(name, message)

    def verify(self, name: str, message: bytes, signature: bytes, *,
               version: int | None = None) -> bool:
        """True if any live version (or the given one) of the key made the signature."""
        return self._crypto.verify(name, message, signature, version=version)

    def mac(self, name: str, message: bytes) -> bytes:
        """HMAC-SHA256 computed in the HSM with the latest version."""
        return self._crypto.mac(name, message)

    def verify_mac(self, name: str, message: bytes, tag: bytes, *,
                   version: int | None = None) -> bool:
        return self._crypto.verify_mac(name, message, tag, version=version)

    def public_key_pem(self, name: str, *, version: int | None = None) -> str:
        return self._crypto.public_key_pem(name, version=version)

    # -- HSM and home --------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """What the HSM module supports (e.g. SoftHSM 2.6.1 lacks RSA-OAEP-SHA256)."""
        return self._home.capabilities()

    def reconcile(self, *, full: bool = True) -> ReconcileReport:
        """Repair interrupted operations and (``full``) check every version's HSM material."""
        return self._home.reconcile(full=full)

    def key_attributes(self, name: str, *, version: int | None = None):
        """CKA_SENSITIVE / CKA_EXTRACTABLE of a version as the HSM reports them."""
        return self._home.key_attributes(name, version=version)

    # -- audit ---------------------------------------------------------------------------------------
    def flush_audit(self) -> int:
        """Move pending journal records of every process into the store now; returns how many."""
        return self._audit.flush_audit()

    def audit(self, *, key: str | None = None, principal: str | None = None,
              action: str | None = None, outcome: str | None = None,
              since: datetime | None = None, until: datetime | None = None,
              limit: int | None = AUDIT_LIMIT, offset: int = 0, newest_first: bool = False
              ) -> AuditFrame:
        """The newest ``limit`` (default 1,000) matching audit records, oldest first (so
        ``.tail()`` is the newest), or newest first with ``newest_first=True``: time,
        principal, action, key, version, outcome, error, detail, ... ``offset`` skips that
        many newest records (the next page back); ``limit=None`` returns every match. Only
        the page is read: the query sorts newest first with a LIMIT, never loading the log.

        ``key`` also matches the records of refused calls that name no key, which keep only
        the name's hash (``sha256:...``, docs/audit.md)."""
        return self._audit.audit(
            key=key, principal=principal, action=action, outcome=outcome, since=since,
            until=until, limit=limit, offset=offset, newest_first=newest_first)

    def query(self, sql: str, params: Sequence[object] | Mapping[str, object] | None = None, *,
              label: str | None = None, timeout_s: float | None = None) -> pd.DataFrame:
        """Run one read-only SQL query over the store and return a DataFrame (admin or auditor).

        Tables: keys, versions, transitions, audit_log, grants, requests, approvals, usage,
        compliance_findings, ... (docs/audit.md). The query runs in a transaction that is always
        rolled back, with file access disabled; the frame follows keyledger's conventions
        (``keyledger.frames``: UTC times, ``string``/``Int64``/``boolean``). ``label`` names the
        query in its audit record (default: its first 200 characters). A query still running
        after ``timeout_s`` (default: ``[store] query_timeout_s`` of keyledger.toml, 10 s) is
        stopped with ``InvalidInput``: while it runs, other processes cannot write the store.
        """
        return self._audit.query(sql, params, label=label, timeout_s=timeout_s)

    def verify_audit(self) -> VerifyReport:
        """Check the chain, the checkpoints, the HSM-held head, the journals and their seals;
        name the first bad record. Not ok while any record is unproven (not accepted)."""
        return self._audit.verify_audit()

    def accept_unproven(self, journal: str, through_jseq: int, reason: str) -> None:
        """Accept, after investigating, the unproven records of ``journal`` up to
        ``through_jseq`` (see ``verify_audit()``): verification then lists them as accepted
        instead of failing. Needs the admin role; the acceptance is itself an audit record."""
        return self._audit.accept_unproven(journal, through_jseq, reason)

    def export_audit(self, path: str | os.PathLike, format: str = "parquet", *,
                     overwrite: bool = False) -> Path:
        """JSONL file, or Parquet partitioned by day (Hive layout: day=YYYY-MM-DD/).

        ``path`` must lie outside the home and not exist yet (``overwrite=True`` replaces a
        file, or a folder holding a previous Parquet export); see ``keyledger.outputs``.
        """
        return self._audit.export_audit(path, format, overwrite=overwrite)

    # -- grants and quorum ---------------------------------------------------------------------------
    def grant(self, name: str, principal: str, role: str) -> None:
        """Give ``principal`` (or ``*``) a role on key ``name`` or on every key (``*``).

        Granting admin needs ``request("grant", name, reason, principal=..., role="admin")``
        and approvals when the quorum there is above 1."""
        return self._governance.grant(name, principal, role)

    def revoke(self, name: str, principal: str, role: str | None = None) -> int:
        """Remove a role (or all roles) of ``principal`` on ``name``; returns how many.

        Revoking an admin role needs ``request("revoke", name, reason, principal=...)`` and
        approvals when the quorum there is above 1."""
        return self._governance.revoke(name, principal, role)

    def grants(self, name: str | None = None) -> pd.DataFrame:
        """Who holds which role where (``key`` is ``*`` for home-wide grants).

        Home-wide admins and auditors see every grant; anyone else only the grants on keys
        it may list, and the home-wide grants to itself or to everyone."""
        return self._governance.grants(name)

    def request(self, action: str, name: str, reason: str, **params: Any) -> str:
        """Ask for a quorum-guarded action; the requester's own approval counts once.

        Returns the request id; the action runs when enough distinct admins ``approve`` it.
        """
        return self._governance.request(action, name, reason, **params)

    def approve(self, request_id: str) -> dict[str, Any]:
        """Approve a pending request; the approval that meets the quorum executes it (once)."""
        return self._governance.approve(request_id)

    def requests(self, status: str | None = None) -> pd.DataFrame:
        """Approval requests with their approvers."""
        return self._governance.requests(status)

    def acknowledge_custody(self, statement: str = CUSTODIAN_STATEMENT) -> None:
        """Record that this admin accepts the key custodian's responsibilities."""
        return self._governance.acknowledge_custody(statement)

    # -- maintenance ---------------------------------------------------------------------------------
    def run_due(self, now: datetime | None = None, *,
                compliance: bool = True) -> DueReport:
        """Rotate keys whose period or usage limit is reached, destroy keys whose deletion window
        passed (when no quorum is needed), deactivate keys past their originator-usage period,
        then evaluate compliance (``compliance=False`` skips that evaluation, e.g. for a job that
        runs more often than the findings need refreshing).

        Safe from cron and from several processes at once: one process holds a lease, and each
        action re-checks under the store lock, so nothing runs twice. ``now`` (default: the
        ledger's clock) is the moment due-ness is judged at.
        """
        return self._maintenance.run_due(now, compliance=compliance)

    def version_usage(self, name: str | None = None) -> pd.DataFrame:
        """Per key version: state, encryptions, decryptions and when each last happened.

        Answers "is anything still decrypting with v1?" before raising min_decryption_version
        or trimming old versions.
        """
        return self._maintenance.version_usage(name)

    def rewrap_many(self, ciphertexts: Iterable[bytes] | pd.Series | str | os.PathLike,
                    *, context: Mapping[str, str] | None = None, dry_run: bool = False,
                    column: str = "ciphertext", out: str | os.PathLike | None = None,
                    progress: bool = True) -> RewrapResult:
        """Move many ciphertexts to their keys' latest versions; one bad item never stops the batch.

        ``ciphertexts``: an iterable of bytes, a pandas Series, or a Parquet file (``column``;
        with ``out`` the rewrapped file is written there). ``dry_run`` counts ciphertexts per key
        version from their headers, touching no key. Audited as one ``rewrap_many`` record
        per chunk of up to 4,096 items and key (its counts in ``detail``), a ``rewrap`` record
        per item the batch path leaves to a single call (every failed item is one), and one
        ``rewrap_many`` record for the whole call (docs/rotation.md).
        """
        return self._maintenance.rewrap_many(
            ciphertexts, context=context, dry_run=dry_run, column=column, out=out,
            progress=progress)

    def trim(self, name: str, min_version: int) -> Any:
        """Destroy the HSM material of every version below ``min_version`` (raising the key's
        minimum decryption version to it). Irreversible: data under those versions is lost, so
        check ``version_usage`` first. Quorum-guarded like destroy."""
        return self._maintenance.trim(name, min_version)

    # -- import and export ---------------------------------------------------------------------------
    def export_key(self, name: str, wrapping_key_pem: str | bytes, *,
                   version: int | None = None) -> WrappedKey:
        """The material of an exportable key's latest (or given) version, wrapped for the holder
        of the RSA private key matching ``wrapping_key_pem`` (see docs/byok.md to unwrap).

        Keys created with ``exportable=False`` (the default) never leave the HSM. When the key's
        quorum is above 1, run ``request("export_key", name, reason, wrapping_key_pem=pem)``;
        once approved, ``export_key`` with the same public key returns the approved export.
        """
        return self._io.export_key(name, wrapping_key_pem, version=version)

    def import_parameters(self, name: str) -> dict[str, Any]:
        """Start importing your own key material as new key ``name``.

        Returns ``public_key_pem`` (a fresh RSA-3072 key held in the HSM, for wrapping) and its
        ``public_key_sha256`` (SHA-256 of the DER SubjectPublicKeyInfo), ``token`` (pass it to
        ``import_key``), ``expires_at`` (24 h), ``oaep_hash`` and ``specs`` (what can be
        imported). The token is bound to ``name`` and good for one successful import.
        """
        return self._io.import_parameters(name)

    def import_key(self, name: str, *, spec: str, wrapped: bytes, token: str,
                   purpose: str | None = None, owner: str | None = None,
                   tags: Mapping[str, str] | None = None) -> Key:
        """Create key ``name`` (version 1) from material wrapped with ``import_parameters``.

        The material is unwrapped inside the HSM into a sensitive, non-extractable AES key; it
        never exists in clear outside the HSM after your wrapping. Imported keys are not rotated
        automatically (``auto_rotate`` is off: ``rotate`` would replace your material with
        HSM-generated material); import a new key to change material.
        """
        return self._io.import_key(
            name, spec=spec, wrapped=wrapped, token=token, purpose=purpose, owner=owner,
            tags=tags)

    # -- backup --------------------------------------------------------------------------------------
    def backup(self, path: str | os.PathLike, *, passphrase: str | bytes,
               overwrite: bool = False) -> BackupInfo:
        """Write an encrypted, consistent snapshot of this (embedded SoftHSM2) home to ``path``.

        The archive holds the store, the token, the settings, pending journals and the PIN
        files, sealed with AES-256-GCM under a key derived from ``passphrase`` (scrypt). Keep
        the passphrase apart from the backups: with both, anyone can use every key. Other
        processes keep working; their store writes wait while the snapshot is taken.
        ``path`` must lie outside the home and not exist yet (``overwrite=True`` replaces an
        existing file, once the new backup is complete).
        """
        return self._backup.backup(path, passphrase=passphrase, overwrite=overwrite)

    def restore_test(self, path: str | os.PathLike, *, passphrase: str | bytes,
                     timeout: float = 600.0, sample: int = RESTORE_TEST_SAMPLE
                     ) -> RestoreTestReport:
        """Restore ``path`` into a temporary home in a subprocess and check it works.

        Checks the restored audit ledger verifies and a random sample of key versions is
        present and usable in the restored token. Records the result (ok or not) in this home's
        ``backups`` table as kind ``restore_test``; the temporary home is deleted.
        """
        return self._backup.restore_test(path, passphrase=passphrase, timeout=timeout, sample=sample)

    def backups(self) -> pd.DataFrame:
        """Backups, restores and restore tests recorded in this home (oldest first)."""
        return self._backup.backups()

    # -- compliance ----------------------------------------------------------------------------------
    def compliance(self, frameworks: str | list[str] | None = None,
                   now: datetime | None = None, *, include_accepted: bool = False
                   ) -> pd.DataFrame:
        """Evaluate the rules of ``frameworks`` (all by default) and return the findings.

        One row per finding: rule_id, framework, control, severity, title, key, version,
        principal, evidence (JSON text with values and audit ``seq`` ids), remediation,
        first_seen (when this finding was first seen open) and status (``new`` in this
        evaluation, ``open`` since an earlier one; ``accepted`` rows, hidden unless
        ``include_accepted``, are covered by an unexpired ``accept_finding`` exception).
        Every evaluation is stored, so ``compliance_trend()`` can chart it. ``now`` (default:
        the ledger's clock) is the moment the rules are judged at.
        """
        return self._compliance.compliance(frameworks, now, include_accepted=include_accepted)

    def compliance_trend(self, frameworks: str | list[str] | None = None
                         ) -> pd.DataFrame:
        """Per stored evaluation, framework and severity: open, opened (new), resolved and
        accepted findings, and the mean/max days the open ones have been open."""
        return self._compliance.compliance_trend(frameworks)

    def findings(self, frameworks: str | list[str] | None = None, *,
                 include_accepted: bool = False) -> pd.DataFrame:
        """The open findings as of the last stored evaluation, without evaluating again.

        Same columns as ``compliance()`` (``status`` is ``open``, ``new`` when first seen in
        the last run, or ``accepted``) plus ``last_seen``; cheap enough for a dashboard to
        poll. ``run_due`` and ``compliance`` keep the stored evaluation fresh.
        """
        return self._compliance.findings(frameworks, include_accepted=include_accepted)

    def compliance_rules(self) -> pd.DataFrame:
        """The loaded rules: id, framework, control, severity, title, parameters and source."""
        return self._compliance.compliance_rules()

    def accept_finding(self, rule_id: str, key: str | None, reason: str,
                       until: datetime | timedelta | str) -> dict[str, Any]:
        """Document an accepted exception (e.g. a HIPAA addressable decision) until it expires.

        Findings of ``rule_id`` on ``key`` (``None``: the home-wide findings of that rule) are
        hidden from ``compliance()`` until ``until`` (a datetime, or a period such as ``"90d"``
        from now; at most a year), and listed with the reason in reports. Needs the admin role.
        """
        return self._compliance.accept_finding(rule_id, key, reason, until)

    def compliance_exceptions(self) -> pd.DataFrame:
        """Every accepted exception, with ``active`` true until it expires."""
        return self._compliance.compliance_exceptions()

    def compliance_report(self, path: str | os.PathLike, format: str = "html", *,
                          frameworks: str | list[str] | None = None,
                          now: datetime | None = None, overwrite: bool = False) -> Path:
        """Evaluate and write a self-contained report (``html`` with an inline SVG chart, or
        ``md``) for an auditor: scope, summary by framework and severity, every finding with
        its evidence and remediation, and the accepted exceptions with their expiry.

        ``path`` must lie outside the home and not exist yet (``overwrite=True`` replaces an
        existing file); the report is written privately (0600) and atomically."""
        return self._compliance.compliance_report(
            path, format, frameworks=frameworks, now=now, overwrite=overwrite)

    # -- access keys of `keyledger serve` ------------------------------------------------------------
    def create_access_key(self, principal: str, *, key_id: str | None = None,
                          secret: str | None = None) -> AccessKeySecret:
        """An access key (AWS style) with which ``principal`` signs requests to ``keyledger
        serve``; new, or an existing pair registered (``key_id`` and ``secret``). The secret is
        returned once and kept only sealed under an HSM key. Home-wide admins only."""
        return self._access_keys.create_access_key(principal, key_id=key_id, secret=secret)

    def access_keys(self) -> pd.DataFrame:
        """Every access key (never its secret): id, principal, state, created, last used."""
        return self._access_keys.access_keys()

    def disable_access_key(self, access_key_id: str) -> None:
        """Refuse the key's requests from now on (a running server reloads at once)."""
        return self._access_keys.set_access_key_state(access_key_id, "disabled")

    def enable_access_key(self, access_key_id: str) -> None:
        return self._access_keys.set_access_key_state(access_key_id, "active")

    def delete_access_key(self, access_key_id: str) -> None:
        return self._access_keys.delete_access_key(access_key_id)

    def record_refused(self, action: str, error: str, detail: str, *, outcome: str = "denied",
                       unauthenticated: bool = False) -> None:
        """Audit a service request refused before any operation ran (for ``keyledger serve``)."""
        return self._access_keys.record_refused(action, error, detail, outcome=outcome,
                                                unauthenticated=unauthenticated)


def open(home: str | os.PathLike | None = None, *, principal: str | None = None,
         clock: Callable[[], datetime] | None = None) -> KeyLedger:
    """Open (and on first use provision) a keyledger home.

    ``home`` defaults to ``$KEYLEDGER_HOME`` or ``./.keyledger``; ``principal`` to the OS user.
    ``clock``: leave it out for real use (trusted time, the system clock). Passing one when the
    home is created makes it a simulation home, labelled as such everywhere; an existing real
    home refuses a clock (``ConfigError``).
    """
    if home is not None and not isinstance(home, str | os.PathLike):
        raise InvalidInput(f"home must be a folder path, not {type(home).__name__}")
    if clock is not None and not callable(clock):
        raise InvalidInput("clock must be a function returning a timezone-aware datetime")
    path = Path(home).expanduser().absolute() if home is not None else default_home()
    outputs.refuse_unusable(path)
    who = principal if principal is not None else getpass.getuser()
    validate_name(who, "principal")
    return KeyLedger(path, principal=who, clock=clock)


def restore(path: str | os.PathLike, home: str | os.PathLike, *, passphrase: str | bytes,
            principal: str | None = None, clock: Callable[[], datetime] | None = None
            ) -> KeyLedger:
    """Restore a backup into a new, empty ``home`` and open it.

    The home's SoftHSM2 configuration is rewritten to point at the restored token. A wrong
    passphrase or a damaged/altered archive raises ``InvalidCiphertext`` and leaves nothing
    behind. The restore is recorded in the restored home's ``backups`` table (kind
    ``restore``) and audit ledger. One process uses one SoftHSM2 configuration: close any other
    embedded home first (or restore from a separate process).
    """
    if principal is not None:
        validate_name(principal, "principal")
    restored = restore_files(path, home, passphrase)
    try:
        led = open(restored.home, principal=principal, clock=clock)
    except BaseException:
        shutil.rmtree(restored.home, ignore_errors=True)
        raise
    try:
        src = outputs.check_source(path, "backup file")
        led._backup.record_restore(src, restored, str(led.last_reconcile))
    except BaseException:
        led.close()
        raise
    return led
