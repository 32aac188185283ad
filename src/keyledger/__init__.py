"""keyledger: key lifecycle over a PKCS#11 HSM with a tamper-evident audit ledger."""
__version__ = "0.1.0"
