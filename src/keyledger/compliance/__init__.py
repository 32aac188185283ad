"""Compliance engine: rules as data, findings with evidence (to be built)."""

from __future__ import annotations


class ComplianceMixin:
    """Mixed into KeyLedger."""
