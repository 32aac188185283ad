"""Key import (BYOK) and wrapped export of exportable keys (to be built)."""

from __future__ import annotations


class ImportExportMixin:
    """Mixed into KeyLedger."""
