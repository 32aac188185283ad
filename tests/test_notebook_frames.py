"""DataFrames as a notebook user meets them (issue: notebooks, item 6).

- Every time column is tz-aware UTC, in grants(), requests(), version_usage() and
  analytics.version_usage() as in audit() and list_keys(), so comparing times across frames
  never raises ``TypeError``.
- ``audit(limit=N, newest_first=True)`` is the tail of the ledger without loading it whole.
(DuckDB's progress bar, which it turns on only inside a Jupyter kernel, is checked in a kernel:
tests/test_notebook_setup.py.)
"""

from __future__ import annotations

from datetime import UTC

import pandas as pd

import keyledger.analytics as ka

TIME_COLUMNS = {
    "grants": ("granted_at",),
    "requests": ("requested_at", "expires_at", "executed_at"),
    "version_usage": ("last_decrypt",),
    "ledger.version_usage": ("created_at", "last_decrypt", "last_used"),
}


def _populated(ledger, clock):
    """A key used, rotated, granted and with a pending quorum request."""
    ledger.create_key("orders", spec="AES_256")
    blob = ledger.encrypt("orders", b"x", context={"t": "a"})
    clock.advance(hours=1)
    ledger.decrypt(blob, context={"t": "a"})
    ledger.grant("orders", "svc-orders", "user")
    ledger.set_policy("orders", quorum=2)
    ledger.schedule_deletion("orders", days=7)
    clock.advance(days=8)
    ledger.request("destroy", "orders", "retired service")
    return {"grants": ledger.grants(), "requests": ledger.requests(),
            "version_usage": ka.version_usage(ledger),
            "ledger.version_usage": ledger.version_usage()}


def test_every_time_column_is_utc_aware(ledger, clock) -> None:
    frames = _populated(ledger, clock)
    for name, columns in TIME_COLUMNS.items():
        df = frames[name]
        assert len(df), name
        for col in columns:
            assert isinstance(df[col].dtype, pd.DatetimeTZDtype), (name, col, df[col].dtype)
            assert str(df[col].dt.tz) == "UTC", (name, col)


def test_times_compare_across_frames_without_type_errors(ledger, clock) -> None:
    frames = _populated(ledger, clock)
    audit = ledger.audit()
    first = audit["time"].min()
    assert (frames["grants"]["granted_at"] >= first).all()
    assert (frames["requests"]["requested_at"] > first).all()
    assert (frames["version_usage"]["last_decrypt"].dropna() > first).all()
    assert (frames["ledger.version_usage"]["created_at"] >= first).all()
    assert frames["requests"]["expires_at"].iloc[0] > clock.now.replace(tzinfo=UTC)


def test_audit_limit_newest_first_is_the_tail_of_the_ledger(ledger, clock) -> None:
    _populated(ledger, clock)
    before = ledger.audit()  # the full load (this read is the next record)
    newest = ledger.audit(limit=5, newest_first=True)
    assert len(newest) == 5
    # the newest record is the full load's own 'audit' record; the four after it are its tail
    assert newest.iloc[0]["action"] == "audit"
    assert list(newest["seq"].iloc[1:]) == list(before["seq"].tail(4).iloc[::-1])
    assert list(newest["action"].iloc[1:]) == list(before["action"].tail(4).iloc[::-1])

