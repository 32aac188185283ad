"""Compliance evaluation, findings, exceptions and reports: the service over
``keyledger.compliance``'s implementation."""

from __future__ import annotations

from ..compliance import ComplianceMixin


class ComplianceService(ComplianceMixin):
    """``compliance``, ``findings``, ``accept_finding``, ``compliance_report``, ...; ``evaluate``
    for due work, which evaluates as part of its run."""
