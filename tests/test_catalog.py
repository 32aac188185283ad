"""catalog.json, the snapshot every process's crypto calls read key states from: after every
kind of catalog change it must equal a full encoding of the committed catalog (the exporter
re-encodes only the keys whose rows changed)."""

from __future__ import annotations

import json

import keyledger as kl
from keyledger.store.catalog import SNAPSHOT_NAME, key_docs, read_home_policy


def _full_encoding(led: kl.KeyLedger) -> str:
    with led._rt.db.snapshot() as tx:
        grants = tx.execute("SELECT scope, principal, role FROM grants ORDER BY ALL").fetchall()
        doc = {"keys": key_docs(tx.con), "grants": [list(g) for g in grants],
               "home_policy": read_home_policy(tx.con)}
    return json.dumps(doc, separators=(",", ":"))


def test_the_snapshot_matches_the_catalog_after_every_kind_of_change(ledger, home, clock):
    steps = [
        lambda: ledger.create_key("a", spec="AES_256", tags={"team": "pay"}),
        lambda: ledger.create_key("s", spec="EC_P256", owner="team-sign"),
        lambda: ledger.create_key("m", spec="HMAC_SHA256", activate=False),
        lambda: ledger.rotate("a"),
        lambda: ledger.set_alias("a", "payments-current"),
        lambda: ledger.set_tags("s", {"env": "prod", "data": "pci"}),
        lambda: ledger.set_policy("a", rotation_period="30d", usage_limit=1000),
        lambda: ledger.set_policy("*", quorum=1, rotation_by_purpose={"sign": "365d"}),
        lambda: ledger.grant("a", "svc-pay", "user"),
        lambda: ledger.disable("s", reason="paused"),
        lambda: ledger.enable("s"),
        lambda: ledger.mark_compromised("s", "leaked"),
        lambda: ledger.schedule_deletion("m", 7),
        lambda: ledger.revoke("a", "svc-pay", "user"),
    ]
    for i, step in enumerate(steps):
        step()
        clock.advance(minutes=5)
        text = (home / SNAPSHOT_NAME).read_text()
        assert text == _full_encoding(ledger), f"after step {i}"
    doc = json.loads(text)
    a = next(k for k in doc["keys"] if k["name"] == "a")
    assert a["aliases"] == ["payments-current"] and len(a["versions"]) == 2
    assert a["policy"]["usage_limit"] == 1000
    assert {k["name"]: k["state"] for k in doc["keys"]} == {
        "a": "active", "s": "compromised", "m": "pending-deletion"}


def test_a_row_changed_where_this_process_did_not_export_is_encoded_again(home, clock):
    # as when another process changed the key (its export is not in this process's memory)
    with kl.open(home, principal="alice", clock=clock) as led:
        led.create_key("a", spec="AES_256")
        led.create_key("b", spec="AES_256")
        with led._rt.db.write(export=False) as tx:
            tx.execute("UPDATE keys SET owner = 'someone' WHERE name = 'a'")
        led.create_key("c", spec="AES_256")  # the next export sees the new row of "a"
        doc = json.loads((home / SNAPSHOT_NAME).read_text())
        assert {k["name"]: k["owner"] for k in doc["keys"]}["a"] == "someone"
        assert (home / SNAPSHOT_NAME).read_text() == _full_encoding(led)
