"""``keyledger serve``: the ledger behind an authenticated network API (AWS KMS JSON 1.1).

``errors`` is the one error shape on the wire; ``kms`` maps KMS operations onto a
``KeyLedger`` opened for the authenticated principal. The HTTP side (app, SigV4, access keys)
lives beside them.
"""
