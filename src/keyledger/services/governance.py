"""Grants, quorum (M-of-N) approvals and custodian acknowledgements.

The quorum gate runs an approved request through a table, action -> callable (``Runner``),
that the facade fills from the services owning the actions."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..access import WILDCARD, Role, index_grants, parse_role, roles_of
from ..errors import InvalidInput, KeyNotFound, KeyStateError, PolicyViolation
from ..frames import normalize
from ..model import validate_name
from ..runtime import naive
from ..store import grants as grants_repo
from ..store import requests as requests_repo
from .context import Audited, Context, Service
from .lifecycle import SET_POLICY_PARAMS

if TYPE_CHECKING:
    import pandas as pd

# Actions that need M distinct admins when the key's (or the home's) quorum is above 1.
# Each has a runner (name, reason, params) in the quorum gate's table that executes it once
# approved.
# grant/revoke: only granting or revoking admin is guarded (else one admin could make a second
# name an admin and approve with it, or remove the other approvers).
GUARDED_ACTIONS = ("destroy", "set_policy", "trim", "export_key", "import_key", "grant",
                   "revoke")
HOME_SCOPED = ("set_policy", "grant", "revoke")  # with name "*": the home, not a key
REQUEST_TTL = timedelta(hours=72)
# Parameters each request may carry (set_policy: its keyword arguments); checked when asked.
REQUEST_PARAMS: dict[str, tuple[str, ...]] = {
    "set_policy": SET_POLICY_PARAMS, "destroy": (), "trim": ("min_version",),
    "export_key": ("wrapping_key_pem", "version"),
    "import_key": ("spec", "wrapped", "token", "purpose", "owner", "tags"),
    "grant": ("principal", "role"), "revoke": ("principal", "role")}
NEW_KEY = "new:"  # requests.key_id of an import: the key it will create does not exist yet
CUSTODIAN_STATEMENT = (
    "I accept my responsibilities as a key custodian: I will protect the keys I administer, "
    "follow the key-management policy, and report suspected compromise at once (PCI DSS 3.7.8)."
)


# Executes an approved request: (key name or None for the home, reason with the approvals,
# the request's parameters).
Runner = Callable[[str | None, str, dict], object]


class GovernanceService(Service):
    """Grants, requests and approvals; ``runners`` execute the guarded actions of other
    services (destroy, set_policy, trim, export_key, import_key) once approved."""

    def __init__(self, ctx: Context, runners: Mapping[str, Runner]) -> None:
        super().__init__(ctx)
        self.runners: dict[str, Runner] = {**runners, "grant": self._run_grant,
                                           "revoke": self._run_revoke}
        missing = set(GUARDED_ACTIONS) - set(self.runners)
        if missing:
            raise ValueError(f"no runner for the guarded actions {sorted(missing)}")

    # -- grants ----------------------------------------------------------------------------------
    def grant(self, name: str, principal: str, role: str) -> None:
        """Give ``principal`` (or ``*``) a role on key ``name`` or on every key (``*``).

        Granting admin needs ``request("grant", name, reason, principal=..., role="admin")``
        and approvals when the quorum there is above 1."""
        self._grant(name, principal, role, approved=False)

    def _grant(self, name: str, principal: str, role: str, *,
               approved: bool) -> None:
        with self._audited("grant", None if name == WILDCARD else name) as rec:
            scope, label = self._scope(rec, name)
            who = self._principal_arg(principal)
            r = parse_role(role)
            if r is Role.ADMIN and not approved:
                self._require_admin_quorum(scope, f"granting admin on {label}", "grant", who)
            with self._rt.db.write() as tx:
                grants_repo.add(tx, scope=scope, principal=who, role=r.value,
                                granted_by=self.principal, now=naive(self._now()))
            self._rt.catalog.refresh(force=True)
            rec.detail = f"granted {r.value} on {label} to {who}"

    def revoke(self, name: str, principal: str, role: str | None = None) -> int:
        """Remove a role (or all roles) of ``principal`` on ``name``; returns how many.

        Revoking an admin role needs ``request("revoke", name, reason, principal=...)`` and
        approvals when the quorum there is above 1."""
        return self._revoke(name, principal, role, approved=False)

    def _revoke(self, name: str, principal: str, role: str | None, *,
                approved: bool) -> int:
        with self._audited("revoke", None if name == WILDCARD else name) as rec:
            scope, label = self._scope(rec, name)
            who = self._principal_arg(principal)
            r = parse_role(role) if role is not None else None
            removes_admin = r in (None, Role.ADMIN) and \
                Role.ADMIN in self._rt.catalog.grants_now().get((scope, who), ())
            if removes_admin and not approved:
                self._require_admin_quorum(scope, f"revoking admin on {label} from {who}",
                                           "revoke", who)
            with self._rt.db.write() as tx:
                if r in (None, Role.ADMIN):
                    self._keep_one_admin(tx, scope, who)
                removed = grants_repo.remove(tx, scope, who, r.value if r is not None else None)
            self._rt.catalog.refresh(force=True)
            rec.detail = f"revoked {role or 'all roles'} on {label} from {who} ({removed})"
            return removed

    def _require_admin_quorum(self, scope: str, what: str, action: str,
                              who: str) -> None:
        """Who is admin decides who approves: changing it needs the quorum of its scope."""
        key = None if scope == WILDCARD else self._rt.catalog.get_id(scope)
        role = ', role="admin"' if action == "grant" else ""
        self._require_quorum(key, action, what, f", principal={who!r}{role}")

    def grants(self, name: str | None = None) -> pd.DataFrame:
        """Who holds which role where (``key`` is ``*`` for home-wide grants).

        Home-wide admins and auditors see every grant; anyone else only the grants on keys
        it may list, and the home-wide grants to itself or to everyone."""
        with self._audited("list_keys", name) as rec:
            if name is not None and name != WILDCARD:
                validate_name(name)  # a filter too: a name no key can have is refused
            self._record_filter(rec, name)
            self._require_some_role(rec, "list_keys")
            with self._rt.db.read() as tx:
                df = grants_repo.frame(tx)
            df = df[self._grant_rows_visible(df)].drop(columns="scope").reset_index(drop=True)
            df = normalize(df)
            return df if name is None else df[df["key"].isin([name, WILDCARD])]

    def _grant_rows_visible(self, df: pd.DataFrame) -> pd.Series:
        """Which grant rows this principal may see (the list_keys visibility rule)."""
        grants = self._rt.catalog.grants_now()
        if roles_of(grants, self.principal, None) & {Role.ADMIN, Role.AUDITOR}:
            import pandas as pd

            return pd.Series(True, index=df.index)
        listable = {s for s in set(df["scope"]) - {WILDCARD}
                    if roles_of(grants, self.principal, s)}
        own = (df["scope"] == WILDCARD) & df["principal"].isin([self.principal, WILDCARD])
        return df["scope"].isin(listable) | own

    def _require_some_role(self, rec: Audited, action: str) -> None:
        """Deny by default: reading grants or requests needs some role somewhere."""
        if not any(p in (self.principal, WILDCARD) for _, p in self._rt.catalog.grants_now()):
            self._authorize(rec, action, None)

    def _scope(self, rec: Audited, name: str) -> tuple[str, str]:
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
        if grants_repo.other_home_admins(tx, who) == 0:
            raise PolicyViolation("this would leave the home without an admin; grant another "
                                  "principal admin on '*' first")

    # -- quorum ----------------------------------------------------------------------------------
    def request(self, action: str, name: str, reason: str, **params: Any) -> str:
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
            if action in HOME_SCOPED and name == WILDCARD:  # the home's policy or grants
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
                admins = json.dumps(grants_repo.admins(tx, key.key_id if key else None))
                requests_repo.add(tx, request_id=request_id, action=action,
                                  key_id=key.key_id if key else key_ref, reason=reason,
                                  params=stored, requested_by=self.principal, now=now,
                                  expires_at=now + REQUEST_TTL, quorum=quorum, admins=admins)
                requests_repo.approve(tx, request_id, self.principal, now)
            rec.detail = f"request {request_id}: {action} (1 of {quorum} approvals)"
        if quorum <= 1:
            self._execute_request(request_id)
        return request_id

    def _request_params(self, action: str, params: dict[str, Any]) -> str:
        """Refuse unknown parameters when asked (not when approved); store them as JSON."""
        allowed = REQUEST_PARAMS.get(action)
        if allowed is not None and (unknown := sorted(set(params) - set(allowed))):
            raise InvalidInput(f"{action} takes {', '.join(allowed) or 'no parameters'}; "
                               f"not {', '.join(unknown)}")
        if action == "trim":  # checked now: the last approval must not meet a bad value
            low = params.get("min_version")
            if isinstance(low, bool) or not isinstance(low, int):
                raise InvalidInput("a trim request needs min_version: the lowest version to keep, "
                                   f"a whole number, not {low!r}"[:200])
        if action in ("grant", "revoke"):  # checked now, not when the last approval runs it
            self._principal_arg(params.get("principal"))
            if action == "grant" or params.get("role") is not None:
                parse_role(params.get("role"))
        return json.dumps(params, default=_param_json)

    def approve(self, request_id: str) -> dict[str, Any]:
        """Approve a pending request; the approval that meets the quorum executes it (once)."""
        with self._audited("approve", None) as rec:
            if not isinstance(request_id, str) or not request_id:
                raise InvalidInput("request_id must be the id that request() returned")
            now = naive(self._now())
            with self._rt.db.write() as tx:
                row = requests_repo.for_approval(tx, request_id)
                if row is None:
                    raise KeyNotFound(f"no approval request {request_id!r}")
                action, key_id, status, expires, quorum, admins = row
                key = self._rt.catalog.get_id(key_id)
                rec.key = key
                self._authorize(rec, "approve", key)
                if status != "pending":
                    raise KeyStateError(f"request {request_id} is {status}; nothing to approve")
                expired = now >= expires
                if expired:  # recorded, then refused below (a raise here would roll it back)
                    requests_repo.set_status(tx, request_id, "expired")
                else:
                    requests_repo.approve(tx, request_id, self.principal, now)
                counted, dropped = _counted_approvers(tx, request_id, key_id, admins)
                quorum = self._approvals_needed(quorum, key_id)
            if expired:
                raise PolicyViolation(f"request {request_id} expired at "
                                      f"{expires:%Y-%m-%d %H:%M} UTC; file a new request")
            count = len(counted)
            rec.detail = f"request {request_id}: {count} of {quorum} approvals"
            if dropped:
                rec.detail += (f"; not counted: {', '.join(dropped)} (not an admin here when the "
                               "request was filed, or no longer)")
        executed = count >= quorum and self._execute_request(request_id)
        return {"request_id": request_id, "approvals": count, "quorum": quorum,
                "executed": bool(executed)}

    def _run_grant(self, name: str | None, reason: str, params: dict) -> None:
        self._grant(name or WILDCARD, params["principal"], params["role"], approved=True)

    def _run_revoke(self, name: str | None, reason: str, params: dict) -> None:
        self._revoke(name or WILDCARD, params["principal"], params.get("role"), approved=True)

    def requests(self, status: str | None = None) -> pd.DataFrame:
        """Approval requests with their approvers."""
        with self._audited("requests", None) as rec:
            self._require_some_role(rec, "requests")
            with self._rt.db.read() as tx:
                return normalize(requests_repo.frame(tx, status), times=("executed_at",))

    def _approvals_needed(self, quorum_when_filed: int, key_id: str) -> int:
        """The quorum of when the request was filed, or today's if it was raised since."""
        return max(quorum_when_filed, self._quorum(self._rt.catalog.get_id(key_id)))

    def _execute_request(self, request_id: str) -> bool:
        """Claim the request (pending -> executing) in one transaction, so it runs once.

        Only approvals of principals who held admin on the request's scope when it was filed
        and still do now count; short of the quorum, the request stays pending."""
        now = naive(self._now())
        with self._rt.db.write() as tx:
            row = requests_repo.for_execution(tx, request_id)
            if row is None or row[4] != "pending":
                return False
            approvers, _ = _counted_approvers(tx, request_id, row[1], row[6])
            if len(approvers) < self._approvals_needed(row[5], row[1]):
                return False
            requests_repo.set_status(tx, request_id, "executing")
        action, key_id, reason, params = row[:4]
        key = self._rt.catalog.get_id(key_id)
        why = f"{reason} (request {request_id}, approved by {', '.join(approvers)})"
        try:
            name = key.name if key else (key_id.removeprefix(NEW_KEY)
                                         if key_id.startswith(NEW_KEY) else None)
            self.runners[action](name, why, json.loads(params))
        except BaseException:
            with self._rt.db.write() as tx:
                requests_repo.set_status(tx, request_id, "pending")
            raise
        with self._rt.db.write() as tx:
            requests_repo.executed(tx, request_id, self.principal, now)
        return True

    # -- custodians ------------------------------------------------------------------------------
    def acknowledge_custody(self, statement: str = CUSTODIAN_STATEMENT) -> None:
        """Record that this admin accepts the key custodian's responsibilities."""
        with self._audited("acknowledge_custody", None) as rec:
            self._authorize(rec, "acknowledge_custody", None, any_scope=True)
            if not isinstance(statement, str) or not statement.strip():
                raise InvalidInput("the acknowledgement needs the statement being accepted")
            with self._rt.db.write() as tx:
                requests_repo.acknowledge(tx, self.principal, naive(self._now()), statement)


def _key_scope(key_id: str) -> str | None:
    """The key a request is about, or None for a home-wide one (``*``, a key to import)."""
    return None if key_id == WILDCARD or key_id.startswith(NEW_KEY) else key_id


def _counted_approvers(tx: Any, request_id: str, key_id: str,
                       admins_json: str | None) -> tuple[list[str], list[str]]:
    """(approvals that count, approvals that don't): an approval counts while its principal
    holds admin on the request's scope now and held it when the request was filed (requests
    filed before that was recorded: now only)."""
    scope = _key_scope(key_id)
    grants = index_grants(grants_repo.rows(tx))
    at_filing = set(json.loads(admins_json)) if admins_json else None
    counted: list[str] = []
    dropped: list[str] = []
    for who in requests_repo.approvers(tx, request_id):
        was = at_filing is None or who in at_filing or WILDCARD in at_filing
        (counted if was and Role.ADMIN in roles_of(grants, who, scope) else dropped).append(who)
    return counted, dropped


def _param_json(value: object) -> object:
    """Periods travel as "<seconds>s", which parse_period reads back (str(timedelta) it cannot)."""
    if isinstance(value, timedelta):
        return f"{int(value.total_seconds())}s"
    raise InvalidInput(f"cannot keep {value!r} in a request; pass text, numbers or periods")
