"""What client and server agree on for keyledger's own API (``KeyLedger.<method>`` targets),
beyond the wire format: the target prefix and the methods that are not served, with why."""

from __future__ import annotations

TARGET_PREFIX = "KeyLedger."
CONTENT_TYPE = "application/x-amz-json-1.1"

# each public KeyLedger method the server does not serve, and why (the client says it too)
NOT_SERVED: dict[str, str] = {
    "backup": "it writes the archive to a path on the server; run `keyledger backup` on the "
              "server's host",
    "restore_test": "it reads an archive from a path on the server; run `keyledger "
                    "restore-test` on the server's host",
    "export_audit": "it writes files on the server; use audit() or query() and write the "
                    "frame where you are",
    "compliance_report": "it writes a file on the server; run `keyledger compliance report` "
                         "on the server's host, or use compliance() and findings()",
    "keep_store_open": "the server keeps its store open itself (keyledger serve "
                       "--keep-store-open)",
    "reconcile": "the server reconciles its home when it opens it; run `keyledger reconcile` "
                 "on the server's host",
    "record_refused": "the server audits refused requests itself",
}

# each public KeyLedger method the client runs itself over served calls, and how: the data
# stays on the client's side, only a data key travels (as AWS's SDKs do with KMS)
CLIENT_SIDE: dict[str, str] = {
    "envelope_encrypt_stream": "a data key from generate_data_key on the server (audited there), "
                               "the chunks sealed in the client",
    "envelope_decrypt_stream": "the wrapped data key opened by decrypt on the server (audited "
                               "there), the chunks opened in the client",
}

# the public KeyLedger methods the server serves (server/native.py's table has each one)
SERVED: tuple[str, ...] = (
    "create_key", "get_key", "list_keys", "rotate", "enable", "disable", "deactivate",
    "mark_compromised", "schedule_deletion", "cancel_deletion", "destroy", "set_alias",
    "remove_alias", "move_alias", "set_tags", "set_policy",
    "encrypt", "decrypt", "rewrap", "generate_data_key", "envelope_encrypt", "envelope_decrypt",
    "encrypt_many", "decrypt_many",
    "sign", "verify", "mac", "verify_mac", "public_key_pem",
    "capabilities", "key_attributes",
    "flush_audit", "audit", "query", "verify_audit", "accept_unproven",
    "grant", "revoke", "grants", "request", "approve", "requests", "acknowledge_custody",
    "run_due", "version_usage", "rewrap_many", "trim",
    "export_key", "import_parameters", "import_key",
    "backups",
    "compliance", "compliance_trend", "findings", "compliance_rules", "accept_finding",
    "compliance_exceptions",
    "create_access_key", "access_keys", "disable_access_key", "enable_access_key",
    "delete_access_key",
)

__all__ = ["CLIENT_SIDE", "CONTENT_TYPE", "NOT_SERVED", "SERVED", "TARGET_PREFIX"]
