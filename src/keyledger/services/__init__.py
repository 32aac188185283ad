"""The services behind the ``KeyLedger`` facade. Each gets a ``Context`` (principal, trusted
clock, audit and authorisation helpers, the process's runtime) and the store's repositories;
none imports the facade (``keyledger.service``)."""
