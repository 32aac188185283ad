"""How often a call starts DuckDB on the store file (~20 ms of CPU each, plus a checkpoint when
it closes): an open and each call's back-to-back transactions share one start (docs/design.md,
decision 10), but never across a slow HSM step such as an RSA key's generation."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

import keyledger as kl
from keyledger.store.db import Database


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], object]], int]:
    """``starts(call)``: the store starts ``call`` made (the background ingest's are not
    counted: when it runs depends on the clock)."""
    counted: list[int] = []
    real = Database._open_instance

    def counting(self: Database, *args, **kwargs):
        if self._keeper is None and threading.current_thread().name != "keyledger-ingest":
            counted.append(1)  # no keeper: this connection starts the instance
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Database, "_open_instance", counting)

    def run(call: Callable[[], object]) -> int:
        counted.clear()
        call()
        return len(counted)

    return run


def test_an_open_starts_the_store_once(home, starts):
    led: list[kl.KeyLedger] = []
    try:
        assert starts(lambda: led.append(kl.open(home, principal="alice"))) == 1  # provisions
        assert starts(led.pop().close) == 1  # the final ingest
        assert starts(lambda: led.append(kl.open(home, principal="alice"))) == 1
    finally:
        for opened in led:
            opened.close()


def test_a_change_starts_the_store_once_unless_its_hsm_step_is_slow(ledger, starts):
    assert starts(lambda: ledger.create_key("k", spec="AES_256")) == 1
    assert starts(lambda: ledger.rotate("k")) == 1
    assert starts(lambda: ledger.verify_audit()) == 1
    # an RSA key's generation takes up to seconds: the store is released across it
    assert starts(lambda: ledger.create_key("r", spec="RSA_2048")) == 2


def test_a_transaction_on_a_held_store_has_duckdbs_progress_bar_off(ledger):
    # a held store's transactions run on cursors of the kept connection, without keyledger's
    # SET: DuckDB 2.0.1's cursors start with the progress bar off (its connections turn it on;
    # both checked inside a notebook kernel too), and nothing may print into a notebook's output
    with ledger.keep_store_open():
        for tx_of in (ledger._rt.db.read, ledger._rt.db.write):
            with tx_of() as tx:
                assert tx.execute(
                    "SELECT current_setting('enable_progress_bar')").one()[0] is False
    db = ledger._rt.db  # not held, and a caller's SQL on its sandbox: cursors too (store/host.py)
    for tx_of in (db.read, db.write, db.snapshot):
        with tx_of() as tx:
            assert tx.execute("SELECT current_setting('enable_progress_bar')").one()[0] is False
