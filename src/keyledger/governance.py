"""Grants, quorum (M-of-N) approvals and custodian acknowledgements, as KeyLedger methods."""

from __future__ import annotations

import inspect
import json
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd

from .access import WILDCARD, Role, parse_role
from .errors import InvalidInput, KeyNotFound, KeyStateError, PolicyViolation
from .model import validate_name
from .runtime import naive

if TYPE_CHECKING:
    from .service import KeyLedger, _Audited

# Actions that need M distinct admins when the key's (or the home's) quorum is above 1.
# Each has a ``_run_<action>(name, reason, params)`` method that executes it once approved.
GUARDED_ACTIONS = ("destroy", "set_policy", "trim", "export_key", "import_key")
REQUEST_TTL = timedelta(hours=72)
# Parameters each request may carry (set_policy: its keyword arguments); checked when asked.
REQUEST_PARAMS: dict[str, tuple[str, ...]] = {
    "destroy": (), "trim": ("min_version",), "export_key": ("wrapping_key_pem", "version"),
    "import_key": ("spec", "wrapped", "token", "purpose", "owner", "tags")}
NEW_KEY = "new:"  # requests.key_id of an import: the key it will create does not exist yet
CUSTODIAN_STATEMENT = (
    "I accept my responsibilities as a key custodian: I will protect the keys I administer, "
    "follow the key-management policy, and report suspected compromise at once (PCI DSS 3.7.8)."
)


def utc_times(df: pd.DataFrame) -> pd.DataFrame:
    """The store keeps naive UTC times: every frame handed out has tz-aware UTC columns."""
    for col in df.columns:
        if pd.api.types.is_datetime64_dtype(df[col]) and df[col].dt.tz is None:
            df[col] = df[col].dt.tz_localize("UTC")
    return df


class GovernanceMixin:
    """Mixed into KeyLedger; relies on its _audited/_key/_rt/_now/principal."""

    # -- grants ----------------------------------------------------------------------------------
    def grant(self: KeyLedger, name: str, principal: str, role: str) -> None:
        """Give ``principal`` (or ``*``) a role on key ``name`` or on every key (``*``)."""
        with self._audited("grant", None if name == WILDCARD else name) as rec:
            scope, label = self._scope(rec, name)
            who = self._principal_arg(principal)
            r = parse_role(role)
            with self._rt.db.write() as tx:
                tx.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           [scope, who, r.value, self.principal, naive(self._now())])
            self._rt.catalog.refresh(force=True)
            rec.detail = f"granted {r.value} on {label} to {who}"

    def revoke(self: KeyLedger, name: str, principal: str, role: str | None = None) -> int:
        """Remove a role (or all roles) of ``principal`` on ``name``; returns how many."""
        with self._audited("revoke", None if name == WILDCARD else name) as rec:
            scope, label = self._scope(rec, name)
            who = self._principal_arg(principal)
            args = [scope, who]
            sql = "DELETE FROM grants WHERE scope = ? AND principal = ?"
            if role is not None:
                sql += " AND role = ?"
                args.append(parse_role(role).value)
            with self._rt.db.write() as tx:
                before = tx.execute("SELECT count(*) FROM grants").fetchone()[0]
                if role is None or parse_role(role) is Role.ADMIN:
                    self._keep_one_admin(tx, scope, who)
                tx.execute(sql, args)
                removed = before - tx.execute("SELECT count(*) FROM grants").fetchone()[0]
            self._rt.catalog.refresh(force=True)
            rec.detail = f"revoked {role or 'all roles'} on {label} from {who} ({removed})"
            return removed

    def grants(self: KeyLedger, name: str | None = None) -> pd.DataFrame:
        """Who holds which role where (``key`` is ``*`` for home-wide grants)."""
        with self._audited("list_keys", name) as rec:
            self._require_some_role(rec, "list_keys")
            with self._rt.db.read() as tx:
                df = tx.execute(
                    """SELECT coalesce(k.name, '*') AS key, g.principal, g.role, g.granted_by,
                              g.granted_at FROM grants g LEFT JOIN keys k ON k.key_id = g.scope
                       ORDER BY 1, 2, 3""").df()
            df = utc_times(df)
            return df if name is None else df[df["key"].isin([name, WILDCARD])]

    def _require_some_role(self: KeyLedger, rec: _Audited, action: str) -> None:
        """Deny by default: reading grants or requests needs some role somewhere."""
        if not any(p in (self.principal, WILDCARD) for _, p in self._rt.catalog.grants_now()):
            self._authorize(rec, action, None)

    def _scope(self: KeyLedger, rec: _Audited, name: str) -> tuple[str, str]:
        if name == WILDCARD:
            self._authorize(rec, "grant", None)
            return WILDCARD, "every key"
        key = self._key(rec, name)
        self._authorize(rec, "grant", key)
        return key.key_id, f"key {key.name!r}"

    @staticmethod
    def _principal_arg(principal: object) -> str:
        if principal == WILDCARD:
            return WILDCARD
        return validate_name(principal, "principal")

    @staticmethod
    def _keep_one_admin(tx: Any, scope: str, who: str) -> None:
        if scope != WILDCARD:
            return
        others = tx.execute("SELECT count(*) FROM grants WHERE scope = '*' AND role = 'admin' "
                            "AND principal <> ?", [who]).fetchone()[0]
        if others == 0:
            raise PolicyViolation("this would leave the home without an admin; grant another "
                                  "principal admin on '*' first")

    # -- quorum ----------------------------------------------------------------------------------
    def request(self: KeyLedger, action: str, name: str, reason: str, **params: Any) -> str:
        """Ask for a quorum-guarded action; the requester's own approval counts once.

        Returns the request id; the action runs when enough distinct admins ``approve`` it.
        """
        with self._audited("request", name) as rec:
            if action not in GUARDED_ACTIONS:
                raise InvalidInput(f"no approval is needed or possible for {action!r}; "
                                   f"requests exist for: {', '.join(GUARDED_ACTIONS)}")
            if not isinstance(reason, str) or not reason.strip():
                raise InvalidInput("say why (reason=...): approvers read it")
            key_ref = WILDCARD
            if action == "set_policy" and name == WILDCARD:  # the home's quorum
                key = None
                self._authorize(rec, "request", None)
            elif action == "import_key":  # the key does not exist yet: a home-wide request
                key, key_ref = None, NEW_KEY + validate_name(name)
                self._authorize(rec, "request", None)
            else:
                key = self._key(rec, name)
                self._authorize(rec, "request", key)
            stored = self._request_params(action, params)
            now = naive(self._now())
            request_id = uuid.uuid4().hex[:12]
            quorum = self._quorum(key)
            with self._rt.db.write() as tx:
                tx.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', "
                           "NULL, NULL)",
                           [request_id, action, key.key_id if key else key_ref, reason, stored,
                            self.principal, now, now + REQUEST_TTL, quorum])
                tx.execute("INSERT INTO approvals VALUES (?, ?, ?)",
                           [request_id, self.principal, now])
            rec.detail = f"request {request_id}: {action} (1 of {quorum} approvals)"
        if quorum <= 1:
            self._execute_request(request_id)
        return request_id

    def _request_params(self: KeyLedger, action: str, params: dict[str, Any]) -> str:
        """Refuse unknown parameters when asked (not when approved); store them as JSON."""
        if action == "set_policy":
            allowed: tuple[str, ...] | None = tuple(
                p for p in inspect.signature(self.set_policy).parameters if p != "name")
        else:
            allowed = REQUEST_PARAMS.get(action)
        unknown = sorted(set(params) - set(allowed)) if allowed is not None else []
        if unknown:
            raise InvalidInput(f"{action} takes {', '.join(allowed) or 'no parameters'}; "
                               f"not {', '.join(unknown)}")
        return json.dumps(params, default=_param_json)

    def approve(self: KeyLedger, request_id: str) -> dict[str, Any]:
        """Approve a pending request; the approval that meets the quorum executes it (once)."""
        with self._audited("approve", None) as rec:
            if not isinstance(request_id, str) or not request_id:
                raise InvalidInput("request_id must be the id that request() returned")
            now = naive(self._now())
            with self._rt.db.write() as tx:
                row = tx.execute("SELECT action, key_id, status, expires_at, quorum FROM requests"
                                 " WHERE request_id = ?", [request_id]).fetchone()
                if row is None:
                    raise KeyNotFound(f"no approval request {request_id!r}")
                action, key_id, status, expires, quorum = row
                key = self._rt.catalog.get_id(key_id)
                rec.key = key
                self._authorize(rec, "approve", key)
                if status != "pending":
                    raise KeyStateError(f"request {request_id} is {status}; nothing to approve")
                expired = now >= expires
                if expired:  # recorded, then refused below (a raise here would roll it back)
                    tx.execute("UPDATE requests SET status = 'expired' WHERE request_id = ?",
                               [request_id])
                else:
                    tx.execute("INSERT INTO approvals VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                               [request_id, self.principal, now])
                count = tx.execute("SELECT count(*) FROM approvals WHERE request_id = ?",
                                   [request_id]).fetchone()[0]
            if expired:
                raise PolicyViolation(f"request {request_id} expired at "
                                      f"{expires:%Y-%m-%d %H:%M} UTC; file a new request")
            rec.detail = f"request {request_id}: {count} of {quorum} approvals"
        executed = count >= quorum and self._execute_request(request_id)
        return {"request_id": request_id, "approvals": count, "quorum": quorum,
                "executed": bool(executed)}

    def _run_destroy(self: KeyLedger, name: str, reason: str, params: dict) -> None:
        self._destroy(name, reason, approved=True)

    def _run_set_policy(self: KeyLedger, name: str, reason: str, params: dict) -> None:
        self._set_policy(name or WILDCARD, approved=True, **params)

    def _run_trim(self: KeyLedger, name: str, reason: str, params: dict) -> None:
        self._trim(name, int(params["min_version"]), approved=True)

    def requests(self: KeyLedger, status: str | None = None) -> pd.DataFrame:
        """Approval requests with their approvers."""
        with self._audited("requests", None) as rec:
            self._require_some_role(rec, "requests")
            sql = """SELECT r.request_id, r.action, coalesce(k.name, CASE WHEN r.key_id LIKE
                        'new:%' THEN r.key_id[5:] ELSE '*' END) AS key, r.reason,
                        r.requested_by,
                        r.requested_at, r.expires_at, r.quorum, r.status, r.executed_at,
                        r.executed_by, list(a.principal ORDER BY a.time) AS approvers
                     FROM requests r LEFT JOIN keys k USING (key_id)
                     LEFT JOIN approvals a USING (request_id)"""
            args: list[Any] = []
            if status is not None:
                sql += " WHERE r.status = ?"
                args.append(status)
            sql += " GROUP BY ALL ORDER BY r.requested_at"
            with self._rt.db.read() as tx:
                return utc_times(tx.execute(sql, args).df())

    def _execute_request(self: KeyLedger, request_id: str) -> bool:
        """Claim the request (pending -> executing) in one transaction, so it runs once."""
        now = naive(self._now())
        with self._rt.db.write() as tx:
            row = tx.execute("SELECT action, key_id, reason, params, status FROM requests "
                             "WHERE request_id = ?", [request_id]).fetchone()
            if row is None or row[4] != "pending":
                return False
            approvers = [r[0] for r in tx.execute(
                "SELECT principal FROM approvals WHERE request_id = ? ORDER BY time",
                [request_id]).fetchall()]
            tx.execute("UPDATE requests SET status = 'executing' WHERE request_id = ?",
                       [request_id])
        action, key_id, reason, params, _ = row
        key = self._rt.catalog.get_id(key_id)
        why = f"{reason} (request {request_id}, approved by {', '.join(approvers)})"
        try:
            name = key.name if key else (key_id.removeprefix(NEW_KEY)
                                         if key_id.startswith(NEW_KEY) else None)
            getattr(self, f"_run_{action}")(name, why, json.loads(params))
        except BaseException:
            with self._rt.db.write() as tx:
                tx.execute("UPDATE requests SET status = 'pending' WHERE request_id = ?",
                           [request_id])
            raise
        with self._rt.db.write() as tx:
            tx.execute("UPDATE requests SET status = 'executed', executed_at = ?, "
                       "executed_by = ? WHERE request_id = ?", [now, self.principal, request_id])
        return True

    # -- custodians ------------------------------------------------------------------------------
    def acknowledge_custody(self: KeyLedger, statement: str = CUSTODIAN_STATEMENT) -> None:
        """Record that this admin accepts the key custodian's responsibilities."""
        with self._audited("acknowledge_custody", None) as rec:
            self._authorize(rec, "acknowledge_custody", None, any_scope=True)
            if not isinstance(statement, str) or not statement.strip():
                raise InvalidInput("the acknowledgement needs the statement being accepted")
            with self._rt.db.write() as tx:
                tx.execute("INSERT INTO acknowledgements VALUES (?, ?, ?)",
                           [self.principal, naive(self._now()), statement])


def _param_json(value: object) -> object:
    """Periods travel as "<seconds>s", which parse_period reads back (str(timedelta) it cannot)."""
    if isinstance(value, timedelta):
        return f"{int(value.total_seconds())}s"
    raise InvalidInput(f"cannot keep {value!r} in a request; pass text, numbers or periods")
