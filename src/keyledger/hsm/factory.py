"""Which HSM backend a home uses: ``[hsm] backend`` in its keyledger.toml picks one.

``pkcs11`` (the default) reaches SoftHSM2 or another PKCS#11 module and shares one login per
process and token; ``memory`` (``keyledger.hsm.memory``) keeps keys in this process, for
simulation homes and tests only.
"""

from __future__ import annotations

from ..config import Settings
from . import memory, pkcs11_backend
from .backend import HsmBackend


def open_backend(settings: Settings, *, simulate: bool) -> HsmBackend:
    """The backend for ``settings``' home; ``simulate``: the home, if new, is a simulation."""
    if settings.hsm.backend == memory.MEMORY:
        return memory.connect(settings.home, new_home=not settings.db_path.exists(),
                              simulate=simulate)
    return pkcs11_backend.connect(settings.hsm)


def release_backend(backend: HsmBackend) -> None:
    """Give back what ``open_backend`` returned (the last user of a PKCS#11 login closes it)."""
    if isinstance(backend, pkcs11_backend.Pkcs11Backend):
        pkcs11_backend.release(backend)
