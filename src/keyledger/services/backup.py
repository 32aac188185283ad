"""Backups and restore tests: the service over ``keyledger.backup``'s implementation."""

from __future__ import annotations

from ..backup import BackupMixin
from .context import Service


class BackupService(Service, BackupMixin):
    """``backup``, ``restore_test`` and ``backups``."""
