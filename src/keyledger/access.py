"""Roles, grants and what each action requires (deny by default).

Roles are granted per key (scope = key id) or globally (scope ``*``); a grant to principal ``*``
applies to everyone (and is reported by compliance as a wildcard grant).

    admin    manage keys (create, rotate, state changes, deletion, grants, approvals);
             no crypto use unless also granted ``user``
    user     crypto use (encrypt, decrypt, sign, verify, MAC, data keys) on granted keys
    auditor  read catalog, audit and compliance; nothing else
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from enum import StrEnum

from .errors import AccessDenied, InvalidInput


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"
    AUDITOR = "auditor"


A, U, R = Role.ADMIN, Role.USER, Role.AUDITOR
ANY = frozenset({A, U, R})

# action -> roles that allow it. Global actions (no key) look at global grants only.
REQUIRED: dict[str, frozenset[Role]] = {
    **{a: frozenset({A}) for a in (
        "create_key", "rotate", "enable", "disable", "deactivate", "mark_compromised",
        "schedule_deletion", "cancel_deletion", "destroy", "set_alias", "set_tags", "set_policy",
        "grant", "revoke", "request", "approve", "key_attributes", "reconcile",
        "acknowledge_custody", "run_due", "trim", "backup", "restore_test", "export_key",
        "import_parameters", "import_key", "accept_finding")},
    "accept_unproven": frozenset({A}),
    "remove_alias": frozenset({A}),
    "move_alias": frozenset({A}),
    # access keys of `keyledger serve` (services/accesskeys.py): home-wide only
    **{a: frozenset({A}) for a in ("create_access_key", "disable_access_key",
                                    "enable_access_key", "delete_access_key")},
    "list_access_keys": frozenset({A, R}),
    **{a: frozenset({U}) for a in (
        "encrypt", "decrypt", "rewrap", "generate_data_key", "envelope_encrypt",
        "envelope_decrypt", "sign", "verify", "mac", "verify_mac", "rewrap_many",
        "encrypt_many", "decrypt_many")},
    **{a: frozenset({A, R}) for a in ("audit", "verify_audit", "export_audit",
                                       "version_usage", "compliance", "compliance_report",
                                       "query")},
    **{a: ANY for a in ("get_key", "list_keys", "public_key_pem", "capabilities", "requests")},
}

WILDCARD = "*"
Grants = dict[tuple[str, str], frozenset[Role]]


def parse_role(role: object) -> Role:
    if isinstance(role, str):
        with contextlib.suppress(ValueError):
            return Role(role)
    raise InvalidInput(
        f"unknown role {role!r}; choose one of: {', '.join(r.value for r in Role)}"
    )


def index_grants(rows: Iterable[tuple[str, str, str]]) -> Grants:
    """(scope, principal, role) rows -> {(scope, principal): roles} for O(1) checks."""
    out: dict[tuple[str, str], set[Role]] = {}
    for scope, principal, role in rows:
        out.setdefault((scope, principal), set()).add(Role(role))
    return {k: frozenset(v) for k, v in out.items()}


def roles_of(grants: Grants, principal: str, key_id: str | None) -> frozenset[Role]:
    empty: frozenset[Role] = frozenset()
    roles = grants.get((WILDCARD, principal), empty) | grants.get((WILDCARD, WILDCARD), empty)
    if key_id is not None:
        roles = roles | grants.get((key_id, principal), empty) | grants.get((key_id, WILDCARD),
                                                                              empty)
    return roles


def check(grants: Grants, principal: str, action: str, key_id: str | None,
          key_name: str | None) -> None:
    """Raise AccessDenied naming the missing permission, or return."""
    need = REQUIRED[action]
    if roles_of(grants, principal, key_id) & need:
        return
    roles = " or ".join(sorted(r.value for r in need))
    target = f"key {key_name!r}" if key_name else "this home"
    least = next(r for r in (Role.AUDITOR, Role.USER, Role.ADMIN) if r in need)
    how = f"an admin can run `keyledger grant {key_name or '*'} {principal} {least.value}`"
    raise AccessDenied(
        f"{principal!r} may not {action.replace('_', ' ')} on {target}: it needs the {roles} "
        f"role there; {how}"
    )
