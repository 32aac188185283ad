"""Schema of the DuckDB store, with a version number and forward-only migrations."""

from __future__ import annotations

from ..errors import StoreError
from .db import Connection

MIGRATIONS: list[str] = [
    # 1: catalog, transitions, intents, audit ledger, checkpoints, usage counters. The hashes
    # (64 hex digits, random) are stored uncompressed: trying to compress them costs ingest
    # more time than everything else together and saves only half their size.
    """
    CREATE TABLE meta (name VARCHAR PRIMARY KEY, value VARCHAR);
    CREATE TABLE keys (
        key_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, spec VARCHAR NOT NULL,
        purpose VARCHAR NOT NULL, state VARCHAR NOT NULL, prior_state VARCHAR,
        owner VARCHAR, created_at TIMESTAMP NOT NULL, rotated_at TIMESTAMP NOT NULL,
        rotation_period_s BIGINT, exportable BOOLEAN NOT NULL, latest_version INTEGER NOT NULL,
        min_decryption_version INTEGER NOT NULL DEFAULT 1,
        min_encryption_version INTEGER NOT NULL DEFAULT 1,
        deletion_due TIMESTAMP, tags VARCHAR NOT NULL DEFAULT '{}',
        policy VARCHAR NOT NULL DEFAULT '{}');
    CREATE TABLE versions (
        key_id VARCHAR NOT NULL, version INTEGER NOT NULL, handle VARCHAR NOT NULL,
        state VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, destroyed_at TIMESTAMP,
        PRIMARY KEY (key_id, version));
    CREATE TABLE aliases (alias VARCHAR PRIMARY KEY, key_id VARCHAR NOT NULL);
    CREATE TABLE transitions (
        time TIMESTAMP NOT NULL, key_id VARCHAR NOT NULL, version INTEGER,
        action VARCHAR NOT NULL, from_state VARCHAR, to_state VARCHAR NOT NULL,
        actor VARCHAR NOT NULL, reason VARCHAR);
    CREATE TABLE intents (
        intent_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, key_id VARCHAR NOT NULL,
        version INTEGER, handles VARCHAR NOT NULL, started_at TIMESTAMP NOT NULL,
        pid INTEGER NOT NULL, actor VARCHAR NOT NULL);
    CREATE TABLE audit_log (
        seq BIGINT NOT NULL, journal VARCHAR NOT NULL, jseq BIGINT NOT NULL,
        time TIMESTAMP NOT NULL, principal VARCHAR NOT NULL, action VARCHAR NOT NULL,
        key VARCHAR, key_id VARCHAR, version BIGINT, outcome VARCHAR NOT NULL,
        error VARCHAR, detail VARCHAR, context VARCHAR, pid INTEGER NOT NULL,
        prev VARCHAR USING COMPRESSION uncompressed NOT NULL,
        hash VARCHAR USING COMPRESSION uncompressed NOT NULL);
    CREATE TABLE journal_offsets (journal VARCHAR PRIMARY KEY, file_offset BIGINT NOT NULL,
        tip_jseq BIGINT NOT NULL, tip_hash VARCHAR NOT NULL);
    CREATE TABLE checkpoints (
        cp_seq BIGINT NOT NULL, time TIMESTAMP NOT NULL, last_seq BIGINT NOT NULL,
        n_records BIGINT NOT NULL, tips_digest VARCHAR NOT NULL, prev_hash VARCHAR NOT NULL,
        hash VARCHAR NOT NULL, signature VARCHAR NOT NULL);
    CREATE TABLE usage (
        key_id VARCHAR NOT NULL, version BIGINT NOT NULL, action VARCHAR NOT NULL,
        count BIGINT NOT NULL, last_time TIMESTAMP NOT NULL,
        PRIMARY KEY (key_id, version, action));
    CREATE TABLE verifications (time TIMESTAMP NOT NULL, ok BOOLEAN NOT NULL,
        records BIGINT NOT NULL, first_bad_seq BIGINT, problem VARCHAR);
    """,
    # 2: access control, quorum requests and approvals, custodian acknowledgements
    """
    CREATE TABLE grants (scope VARCHAR NOT NULL, principal VARCHAR NOT NULL,
        role VARCHAR NOT NULL, granted_by VARCHAR NOT NULL, granted_at TIMESTAMP NOT NULL,
        PRIMARY KEY (scope, principal, role));
    CREATE TABLE requests (request_id VARCHAR PRIMARY KEY, action VARCHAR NOT NULL,
        key_id VARCHAR NOT NULL, reason VARCHAR NOT NULL, params VARCHAR NOT NULL DEFAULT '{}',
        requested_by VARCHAR NOT NULL, requested_at TIMESTAMP NOT NULL,
        expires_at TIMESTAMP NOT NULL, quorum INTEGER NOT NULL, status VARCHAR NOT NULL,
        executed_at TIMESTAMP, executed_by VARCHAR);
    CREATE TABLE approvals (request_id VARCHAR NOT NULL, principal VARCHAR NOT NULL,
        time TIMESTAMP NOT NULL, PRIMARY KEY (request_id, principal));
    CREATE TABLE acknowledgements (principal VARCHAR NOT NULL, time TIMESTAMP NOT NULL,
        statement VARCHAR NOT NULL);
    """,
    # 3: journal seals (docs/audit.md "Seals"): per journal the newest seal whose HSM MAC
    # verified at ingest (it proves every record up to seal_jseq) and the first seal that did
    # not verify; verification checks them again in the HSM.
    """
    ALTER TABLE journal_offsets ADD COLUMN seal_jseq BIGINT;
    ALTER TABLE journal_offsets ADD COLUMN seal_hash VARCHAR;
    ALTER TABLE journal_offsets ADD COLUMN seal_mac VARCHAR;
    ALTER TABLE journal_offsets ADD COLUMN bad_seal_jseq BIGINT;
    """,
    # 4: who held admin on a request's scope when it was filed (JSON list): only their
    # approvals count, so an admin made after the request cannot help pass it
    """
    ALTER TABLE requests ADD COLUMN admins VARCHAR;
    """,
    # 5: BYOK import tokens, held exports and the backups/restores record, which byok.py and
    # backup.py used to create on first use: IF NOT EXISTS, since older homes may have them
    """
    CREATE TABLE IF NOT EXISTS import_tokens (token VARCHAR PRIMARY KEY, name VARCHAR NOT NULL,
        handle VARCHAR NOT NULL, oaep_hash VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL,
        expires_at TIMESTAMP NOT NULL, created_by VARCHAR NOT NULL, used_at TIMESTAMP,
        used_by VARCHAR, key_id VARCHAR, destroyed_at TIMESTAMP);
    CREATE TABLE IF NOT EXISTS key_exports (export_id VARCHAR PRIMARY KEY,
        key_id VARCHAR NOT NULL, version INTEGER NOT NULL, wrapping_key_sha256 VARCHAR NOT NULL,
        payload VARCHAR NOT NULL, approval VARCHAR, created_at TIMESTAMP NOT NULL,
        created_by VARCHAR NOT NULL, delivered_at TIMESTAMP, delivered_to VARCHAR);
    CREATE TABLE IF NOT EXISTS backups (time TIMESTAMP, kind VARCHAR, path VARCHAR,
        sha256 VARCHAR, bytes BIGINT, principal VARCHAR, ok BOOLEAN, detail VARCHAR);
    """,
    # 6: the compliance engine's history (store/compliance.py): evaluations, finding episodes,
    # per-run counts for trends, accepted exceptions. Homes made before this created them on
    # first use, with the same columns: IF NOT EXISTS keeps those.
    """
    CREATE TABLE IF NOT EXISTS compliance_runs (
        run_id BIGINT NOT NULL, time TIMESTAMP NOT NULL, principal VARCHAR,
        frameworks VARCHAR NOT NULL, rules INTEGER NOT NULL, findings INTEGER NOT NULL,
        accepted INTEGER NOT NULL, opened INTEGER NOT NULL, resolved INTEGER NOT NULL,
        keys INTEGER, seconds DOUBLE, timings VARCHAR);
    CREATE TABLE IF NOT EXISTS compliance_findings (
        fingerprint VARCHAR NOT NULL, rule_id VARCHAR NOT NULL, framework VARCHAR NOT NULL,
        control VARCHAR, severity VARCHAR NOT NULL, title VARCHAR, key VARCHAR, version BIGINT,
        principal VARCHAR, evidence VARCHAR, first_seen TIMESTAMP NOT NULL,
        last_seen TIMESTAMP NOT NULL, resolved_at TIMESTAMP, first_run BIGINT NOT NULL,
        last_run BIGINT NOT NULL, resolved_run BIGINT);
    CREATE TABLE IF NOT EXISTS compliance_run_counts (
        run_id BIGINT NOT NULL, framework VARCHAR NOT NULL, severity VARCHAR NOT NULL,
        open INTEGER NOT NULL, opened INTEGER NOT NULL, resolved INTEGER NOT NULL,
        accepted INTEGER NOT NULL, mean_open_days DOUBLE, max_open_days DOUBLE);
    CREATE TABLE IF NOT EXISTS compliance_exceptions (
        exception_id VARCHAR NOT NULL, rule_id VARCHAR NOT NULL, framework VARCHAR,
        key VARCHAR, reason VARCHAR NOT NULL, accepted_by VARCHAR NOT NULL,
        accepted_at TIMESTAMP NOT NULL, until TIMESTAMP NOT NULL);
    """,
    # 7: access keys of `keyledger serve` (store/access_keys.py): the secret only sealed under
    # an HSM key, bound to the id and principal (docs/service.md)
    """
    CREATE TABLE access_keys (access_key_id VARCHAR PRIMARY KEY, principal VARCHAR NOT NULL,
        secret_sealed VARCHAR NOT NULL, state VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL,
        created_by VARCHAR NOT NULL, changed_at TIMESTAMP, changed_by VARCHAR,
        last_used_at TIMESTAMP);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(con: Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION``; returns the version found before."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    found = int(row[0]) if row and row[0] is not None else 0
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {found}, newer than this keyledger ({SCHEMA_VERSION});"
            " upgrade keyledger"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version - 1].split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
    return found
