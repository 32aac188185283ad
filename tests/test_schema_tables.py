"""The tables byok and backup use come from the migrations, in new and in older homes alike."""

from __future__ import annotations

import duckdb

from keyledger.store.schema import MIGRATIONS, SCHEMA_VERSION, migrate

TABLES = {"import_tokens", "key_exports", "backups"}


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def test_a_new_store_has_the_byok_and_backup_tables(tmp_path):
    with duckdb.connect(str(tmp_path / "new.duckdb")) as con:
        assert migrate(con) == 0
        assert _tables(con) >= TABLES
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_an_older_store_that_made_them_on_the_fly_keeps_its_rows(tmp_path):
    """Before the migration, byok.py and backup.py created these tables on first use."""
    with duckdb.connect(str(tmp_path / "old.duckdb")) as con:
        con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, script in enumerate(MIGRATIONS[:4], start=1):
            for statement in script.split(";"):
                if statement.strip():
                    con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?)", [version])
        con.execute("CREATE TABLE backups (time TIMESTAMP, kind VARCHAR, path VARCHAR, "
                    "sha256 VARCHAR, bytes BIGINT, principal VARCHAR, ok BOOLEAN, detail VARCHAR)")
        con.execute("INSERT INTO backups VALUES (now(), 'backup', '/b.klb', 'ab', 1, 'alice', "
                    "true, NULL)")
        assert migrate(con) == 4
        assert _tables(con) >= TABLES
        assert con.execute("SELECT kind, principal FROM backups").fetchall() == [("backup", "alice")]
