"""Grants, quorum approvals and custodian acknowledgements moved to
``keyledger.services.governance``; this name stays importable."""

from .services.governance import (  # noqa: F401
    CUSTODIAN_STATEMENT,
    GUARDED_ACTIONS,
    HOME_SCOPED,
    NEW_KEY,
    REQUEST_PARAMS,
    REQUEST_TTL,
    GovernanceService,
)
