"""keyledger: key lifecycle over a PKCS#11 HSM with a tamper-evident audit ledger in DuckDB.

    import keyledger as kl
    with kl.open() as ledger:
        ledger.create_key("orders", spec="AES_256")
        blob = ledger.encrypt("orders", b"card 4111", context={"tenant": "acme"})
        assert ledger.decrypt(blob, context={"tenant": "acme"}) == b"card 4111"

    ledger = kl.connect("https://kms.example:8200")  # the same API, served by `keyledger serve`

Views over the same ledger are imported explicitly, so ``import keyledger`` stays light:
``keyledger.analytics`` (aggregated DataFrames), ``keyledger.charts`` (Altair),
``keyledger.widgets`` (ipywidgets) and ``keyledger.dashboard`` (Panel).
"""

from .backup import BackupInfo, RestoreTestReport
from .byok import WrappedKey
from .errors import (
    AccessDenied,
    AuditError,
    ConfigError,
    HsmError,
    InvalidCiphertext,
    InvalidInput,
    KeyExists,
    KeyLedgerError,
    KeyNotFound,
    KeyStateError,
    NotRemote,
    PolicyViolation,
    ServiceError,
    StoreBusy,
    StoreError,
    UnsupportedMechanism,
)
from .maintenance import RewrapResult
from .model import SPECS, Key, KeySpec, KeyState, KeyVersion, Purpose
from .remote import connect
from .rotation import DueReport
from .runtime import ReconcileReport
from .service import DataKey, KeyLedger, open, restore
from .store.verify import VerifyReport
from .version import __version__ as __version__

__all__ = [
    "SPECS",
    "AccessDenied",
    "AuditError",
    "BackupInfo",
    "ConfigError",
    "DataKey",
    "DueReport",
    "HsmError",
    "InvalidCiphertext",
    "InvalidInput",
    "Key",
    "KeyExists",
    "KeyLedger",
    "KeyLedgerError",
    "KeyNotFound",
    "KeySpec",
    "KeyState",
    "KeyStateError",
    "KeyVersion",
    "NotRemote",
    "PolicyViolation",
    "Purpose",
    "ReconcileReport",
    "RestoreTestReport",
    "RewrapResult",
    "ServiceError",
    "StoreBusy",
    "StoreError",
    "UnsupportedMechanism",
    "VerifyReport",
    "WrappedKey",
    "connect",
    "open",
    "restore",
]
