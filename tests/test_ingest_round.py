"""What one audit ingest round does to the store (bench/ingest_round.py measures its CPU).

A round runs in every process with a home open, every ``ingest_interval_ms`` and before every
read; most find nothing new, because another process (or an earlier read) ingested it.
"""

from __future__ import annotations

import pytest

from keyledger.store import db


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement run in a store transaction from now on."""
    seen: list[str] = []
    execute = db.Tx.execute

    def recording(self: db.Tx, sql: str, params: object = None) -> db.Result:
        seen.append(" ".join(sql.split()))
        return execute(self, sql, params)

    monkeypatch.setattr(db.Tx, "execute", recording)
    return seen


def test_a_round_with_nothing_new_reads_the_bookkeeping_only(ledger, statements, monkeypatch):
    """Journals already ingested (this process's stat check is stale, as after another
    process's ingest): the round reads journal_offsets and stops, with no ledger check, no
    checkpoint and no HSM call."""
    rt = ledger._rt
    rt.stop_background_ingest()
    ledger.create_key("k", spec="AES_256")
    ledger.encrypt("k", b"x")
    ledger.flush_audit()
    head = rt.audit_head()
    hsm_calls: list[str] = []
    for name in ("get_data", "put_data", "sign", "verify_mac"):
        real = getattr(rt.backend, name)
        monkeypatch.setattr(rt.backend, name,
                            lambda *a, _n=name, _f=real, **k: hsm_calls.append(_n) or _f(*a, **k))
    statements.clear()

    result = rt.ingest(force=True)

    assert (result.records, result.journals, result.checkpoint) == (0, 0, None)
    assert len(statements) == 1 and "FROM journal_offsets" in statements[0], statements
    assert hsm_calls == []
    assert rt.audit_head() == head
    assert ledger.verify_audit().ok


def test_a_round_with_records_checkpoints_them_without_rereading_the_ledger(ledger,
                                                                            statements):
    """Records of two keys and two actions in one round: each reaches the ledger once, the
    usage counters count them exactly, and the signed checkpoint the verifier checks covers
    them, written from what the round read (no count or digest query over the ledger)."""
    rt = ledger._rt
    rt.stop_background_ingest()
    a = ledger.create_key("a", spec="AES_256")
    b = ledger.create_key("b", spec="AES_256")
    blob = ledger.encrypt("a", b"x")
    ledger.flush_audit()
    statements.clear()
    for _ in range(3):
        ledger.encrypt("a", b"x")
    ledger.decrypt(blob)
    ledger.encrypt("b", b"y")

    result = rt.ingest()

    assert result.records == 5 and result.checkpoint is not None
    assert not [s for s in statements if "count(*)" in s or "sha256" in s], statements
    assert rt.audit_head()[0] == result.checkpoint  # the HSM-held head moved with it
    usage = ledger.version_usage().set_index("key")
    assert (usage.loc["a", "encryptions"], usage.loc["a", "decryptions"]) == (4, 1)
    assert (usage.loc["b", "encryptions"], usage.loc["b", "decryptions"]) == (1, 0)
    report = ledger.verify_audit()
    assert report.ok, report
    assert {a.key_id, b.key_id} <= set(ledger.audit()["key_id"].dropna())
