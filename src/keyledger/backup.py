"""Backup, restore and restore tests of a home (to be built)."""

from __future__ import annotations


class BackupMixin:
    """Mixed into KeyLedger."""
