"""DuckDB store: schema, catalog, per-process journals and the audit ledger."""
