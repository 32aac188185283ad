"""The compliance engine moved to ``keyledger.store.compliance`` (the store owns its SQL); this
name stays importable for scripts and the benchmark."""

from ..store.compliance import *  # noqa: F403
from ..store.compliance import __all__, naive  # noqa: F401
