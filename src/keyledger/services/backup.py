"""Backups and restore tests: the service over ``keyledger.backup``'s implementation."""

from __future__ import annotations

from ..backup import BackupMixin


class BackupService(BackupMixin):
    """``backup``, ``restore_test`` and ``backups``."""
