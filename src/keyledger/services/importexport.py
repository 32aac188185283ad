"""Key import (BYOK) and wrapped export: the service over ``keyledger.byok``'s implementation."""

from __future__ import annotations

from ..byok import ImportExportMixin
from .context import Context
from .lifecycle import LifecycleService


class ImportExportService(ImportExportMixin):
    """``import_parameters``, ``import_key``, ``export_key``; an import catalogs its key as
    the lifecycle service catalogs a created one."""

    def __init__(self, ctx: Context, lifecycle: LifecycleService) -> None:
        super().__init__(ctx)
        self.lifecycle = lifecycle
