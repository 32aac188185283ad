"""KeyActions' form: a reason belongs to one action, the confirm step shows what will run,
values are refused before anything is armed, and details are fresh after an action.

Real homes (SoftHSM2 + DuckDB); the widgets are driven by clicking their buttons."""

from __future__ import annotations

import ipywidgets as W
import pytest

import keyledger as kl
from keyledger.widgets import KeyActions, KeyInventory


def _text(widget: W.HTML) -> str:
    return widget.value.replace("&#x27;", "'").replace("&quot;", '"')


@pytest.fixture
def keys(ledger: kl.KeyLedger) -> kl.KeyLedger:
    ledger.create_key("orders", spec="AES_256", owner="payments")
    ledger.create_key("sig", spec="EC_P256", owner="identity")
    return ledger


def _reasons(ledger: kl.KeyLedger, action: str, key: str) -> list[str]:
    """The reasons recorded with the key's state changes (the transitions table)."""
    key_id = ledger.get_key(key).key_id
    rows = ledger.query("SELECT reason FROM transitions WHERE key_id = ? AND action = ? "
                        "ORDER BY time", [key_id, action])
    return rows["reason"].tolist()


def test_a_reason_is_recorded_for_one_action_only(keys):
    act = KeyActions(keys)
    act.key.value = "orders"
    act.reason.value = "quarterly rotation"
    act.buttons["rotate"].click()
    assert keys.get_key("orders").latest_version == 2
    assert act.reason.value == ""  # cleared after the action it was typed for
    assert _reasons(keys, "rotate", "orders") == ["quarterly rotation"]

    act.buttons["disable"].click()
    act.confirm_button.click()
    act.buttons["enable"].click()
    assert keys.get_key("orders").state.value == "active"
    assert _reasons(keys, "disable", "orders") == ["disabled"]  # the defaults, not the
    assert _reasons(keys, "enable", "orders") == ["enabled"]  # reason typed for rotate

    # a failed action clears its reason too: it is not carried to the next attempt
    act.key.value = "sig"
    act.buttons["disable"].click()
    act.confirm_button.click()
    act.reason.value = "try rotating a suspended key"
    act.buttons["rotate"].click()
    assert "cannot rotate" in _text(act.status)
    assert act.reason.value == ""
    act.buttons["enable"].click()
    assert _reasons(keys, "enable", "sig") == ["enabled"]


def test_the_confirm_step_shows_action_key_value_and_the_escaped_reason(keys):
    act = KeyActions(keys)
    act.key.value = "sig"
    act.days.value = 10
    act.reason.value = "<script>alert(1)</script> retire & replace"
    act.buttons["schedule_deletion"].click()
    assert act.armed is not None
    prompt = _text(act.prompt)
    for shown in ("schedule deletion", "sig", "10 days",
                  "&lt;script&gt;alert(1)&lt;/script&gt; retire &amp; replace"):
        assert shown in prompt, shown
    assert "<script>" not in act.prompt.value
    # editing the reason after arming disarms: what is confirmed is what was shown
    act.reason.value = "something else"
    assert act.armed is None and act.confirm_box.layout.display == "none"
    act.confirm_button.click()
    assert keys.get_key("sig").state.value == "active"

    # without a typed reason the prompt says which default the audit record gets
    act.reason.value = ""
    act.buttons["disable"].click()
    assert "disabled (default: no reason typed)" in _text(act.prompt)
    act.confirm_button.click()
    assert keys.get_key("sig").state.value == "suspended"


def test_bad_values_are_refused_before_anything_is_armed(keys):
    act = KeyActions(keys)
    act.key.value = "sig"
    for days in (3, 0, 31):
        act.days.value = days
        act.buttons["schedule_deletion"].click()
        assert act.armed is None and act.confirm_box.layout.display == "none", days
        assert f"must be 7 to 30 days, not {days}" in _text(act.status)
    assert act.confirm_button.click() is None and keys.get_key("sig").state.value == "active"
    assert keys.audit(action="schedule_deletion").empty  # nothing ran, nothing to confirm

    act.request_action.value = "destroy"
    act.reason.value = ""
    act.buttons["request"].click()  # approvers need a reason
    assert act.armed is None and "say why" in _text(act.status)
    act.request_action.value = "trim"
    act.reason.value = "old versions"
    act.min_version.value = 1
    act.buttons["request"].click()
    assert act.armed is None and "min version must be 2 or more" in _text(act.status)
    assert act.reason.value == "old versions"  # kept: no action ran, so fix the value
    assert keys.audit(action="request").empty

    act.new_name.value = "billing"
    act.rotation_period.value = "soon"
    act.buttons["create"].click()
    assert "cannot read period 'soon'" in _text(act.status)
    assert keys.audit(action="create_key", key="billing").empty  # refused before the call


def test_details_are_fresh_after_an_action_even_when_a_filter_hides_the_key(keys):
    inv = KeyInventory(keys)
    act = KeyActions(keys, inventory=inv)
    inv.filters["state"].value = "active"
    inv.select.value = "sig"
    assert "active" in _text(inv.detail)
    act.buttons["disable"].click()
    act.confirm_button.click()
    assert keys.get_key("sig").state.value == "suspended"
    assert "sig" not in list(inv.frame["name"])  # the filter now hides it
    assert "suspended" in _text(inv.detail) and "sig" in _text(inv.detail)
    # the action form's own card says what the key can do now
    assert "suspended: neither signs nor verifies" in _text(act.detail)
    act.buttons["enable"].click()
    assert "current: signs and verifies" in _text(act.detail)
