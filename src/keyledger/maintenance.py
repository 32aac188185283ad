"""Due work, bulk rewrap and trimming moved to ``keyledger.services.maintenance``; this name
stays importable."""

from .services.maintenance import LEASE_SECONDS, MaintenanceService, RewrapResult  # noqa: F401
