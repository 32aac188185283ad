"""The key grid (keyledger.widgets.grid.KeyGrid) and KeyInventory/dashboard() built on it.

Driven from Python the way the browser drives it: grid.js sets the ``selected`` and ``sort``
traits on a row or header click, so setting those traits here is what a click does. The real
clicks, row heights and layout at laptop size are checked in tests/test_jupyterlab_browser.py.
"""

from __future__ import annotations

import json
import math
import tomllib
from datetime import datetime
from pathlib import Path

import ipywidgets as W
import numpy as np
import pandas as pd
import pytest

from keyledger.display import ROTATION_COLORS
from keyledger.widgets import KeyActions, KeyGrid, KeyInventory, dashboard
from keyledger.widgets.grid import json_rows, json_value, sorted_rows
from keyledger.widgets.inventory import TABLE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
WIDGETS = ROOT / "src" / "keyledger" / "widgets"


@pytest.fixture
def fleet(ledger, clock):
    """Four keys: one overdue (orders), one due soon (tokens), one ok (sig), one suspended."""
    ledger.create_key("orders", spec="AES_256", owner="payments", tags={"team": "pay"})
    clock.advance(days=70)
    ledger.create_key("tokens", spec="HMAC_SHA256", owner="identity",
                      tags={"team": "id", "env": "prod"}, rotation_period="30d")
    ledger.create_key("sig", spec="EC_P256", owner="identity", tags={"team": "id"})
    ledger.create_key("legacy", spec="AES_128", owner="payments")
    ledger.disable("legacy")
    clock.advance(days=21)
    return ledger


def _walk(widget: W.Widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def _no_nan(value) -> None:
    """Every float in a JSON-shaped value is finite; no bytes anywhere."""
    if isinstance(value, dict):
        for v in value.values():
            _no_nan(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _no_nan(v)
    else:
        assert not isinstance(value, bytes | bytearray | memoryview), value
        assert not (isinstance(value, float) and not math.isfinite(value)), value


# -- what travels to the browser ---------------------------------------------------------------
def test_rows_are_json_safe_with_utc_iso_times(fleet):
    inv = KeyInventory(fleet)
    rows = inv.grid.rows
    assert [r["name"] for r in rows] == ["orders", "tokens", "sig", "legacy"]
    json.dumps(rows, allow_nan=False)  # raises on NaN/inf, and on bytes or timestamps
    state = inv.grid.get_state()
    _no_nan(state)
    json.dumps({k: v for k, v in state.items() if not k.startswith("_")}, allow_nan=False)
    gappy = inv.frame.assign(days_to_due=np.nan, next_rotation_due=pd.NaT, owner=pd.NA)
    for row in json_rows(gappy, TABLE_COLUMNS):  # a key with no schedule and no owner
        assert row["days_to_due"] is None and row["next_rotation_due"] is None
        assert row["owner"] is None
    orders = rows[0]
    assert orders["rotated_at"].endswith("+00:00") and "T" in orders["rotated_at"]
    assert orders["tags"] == "team=pay" and orders["rotation_status"] == "overdue"
    assert inv.grid.colors == {"rotation_status": dict(ROTATION_COLORS)}  # the charts' colours
    assert [c["field"] for c in inv.grid.columns][0] == "name"
    assert {c["field"] for c in inv.grid.columns if not c["sortable"]} == {"tags"}


def test_json_value_turns_missing_values_into_none_and_never_sends_bytes():
    assert json_value(float("nan")) is None and json_value(pd.NaT) is None
    assert json_value(pd.NA) is None and json_value(np.float64("inf")) is None
    assert json_value(np.int64(7)) == 7 and type(json_value(np.int64(7))) is int
    assert json_value(np.bool_(True)) is True
    assert json_value(datetime(2026, 1, 2, 3, 4)) == "2026-01-02T03:04:00+00:00"  # naive = UTC
    assert json_value(pd.Timestamp("2026-01-02 03:04", tz="Europe/Paris")) == \
        "2026-01-02T02:04:00+00:00"
    assert json_value(b"\x00secret") == "(7 bytes)"
    assert json_value({"b": 2, "a": 1}) == "a=1, b=2" and json_value(("x", "y")) == "x, y"
    frame = pd.DataFrame({"name": ["a"], "n": [np.nan]})
    assert json_rows(frame, ["name", "n", "absent"]) == [{"name": "a", "n": None, "absent": None}]


# -- sorting ------------------------------------------------------------------------------------
def test_a_header_click_sorts_every_page_not_just_the_visible_one(ledger):
    for i in range(7):
        ledger.create_key(f"k{i}", spec="AES_128")
    inv = KeyInventory(ledger, page_size=3)
    assert inv.grid.sort == {"column": "rotation_status", "descending": False}  # urgency
    inv.pager.next.click()
    inv.grid.sort = {"column": "name", "descending": True}  # what a click on "key" twice sends
    assert inv.select.options == ("k6", "k5", "k4") and inv.pager.offset == 0
    assert inv.sort_by.value == "name" and inv.descending.value is True
    inv.grid.sort = {"column": "name", "descending": False}
    assert inv.select.options == ("k0", "k1", "k2") and inv.descending.value is False
    # "version" sorts newest first by default: ascending means the checkbox is ticked
    inv.grid.sort = {"column": "latest_version", "descending": False}
    assert inv.sort_by.value == "latest version" and inv.descending.value is True
    # and the dropdown drives the grid's arrow
    inv.sort_by.value = "owner"
    inv.descending.value = False
    assert inv.grid.sort == {"column": "owner", "descending": False}
    inv.sort_by.value = "created"  # not a grid column: no arrow
    assert inv.grid.sort is None


def test_a_grid_on_its_own_sorts_its_rows_with_missing_values_last():
    grid = KeyGrid(rows=[{"name": "b", "n": 2}, {"name": "a", "n": None}, {"name": "C", "n": 10}],
                   columns=[{"field": "name", "title": "key"}, {"field": "n", "title": "n"}])
    grid.sort = {"column": "n", "descending": True}
    assert grid.names == ("C", "b", "a")
    grid.sort = {"column": "name"}
    assert grid.names == ("a", "b", "C") and grid.sort == {"column": "name", "descending": False}
    assert sorted_rows([{"x": None}, {"x": 1}], "x", descending=False) == [{"x": 1}, {"x": None}]
    with pytest.raises(Exception, match="sort must look like"):
        grid.sort = {"descending": True}


# -- selection ----------------------------------------------------------------------------------
def test_selecting_a_row_shows_its_details_and_names_it_in_the_actions(fleet):
    inv = KeyInventory(fleet)
    act = KeyActions(fleet, inventory=inv)
    seen: list[str | None] = []
    inv.on_select(seen.append)
    traits: list[str | None] = []
    inv.grid.observe(lambda c: traits.append(c["new"]), names="selected")
    inv.grid.selected = "tokens"  # a click on the tokens row
    assert inv.selected == "tokens" and inv.select.value == "tokens"
    assert ">tokens <" in inv.detail.value and act.key.value == "tokens"
    assert seen == ["tokens"] and traits == ["tokens"]
    inv.select_key("sig")
    assert inv.grid.selected == "sig" and act.key.value == "sig" and seen[-1] == "sig"
    inv.grid.selected = None
    assert "select a key" in inv.detail.value and act.key.value == ""


def test_the_selection_survives_filters_and_refresh(fleet):
    inv = KeyInventory(fleet)
    act = KeyActions(fleet, inventory=inv)
    inv.grid.selected = "orders"
    inv.filters["owner"].value = "identity"  # hides orders
    assert inv.select.options == ("tokens", "sig")
    assert inv.selected == "orders" and act.key.value == "orders" and ">orders <" in inv.detail.value
    assert "selected orders is not in this list" in inv.summary.value
    inv.filters["owner"].value = "(all)"
    assert "orders" in inv.select.options and "not in this list" not in inv.summary.value
    fleet.rotate("orders")  # elsewhere: the grid and the details pick it up on refresh
    inv.refresh()
    assert inv.selected == "orders"
    assert next(r for r in inv.grid.rows if r["name"] == "orders")["latest_version"] == 2
    assert "decrypts old data only" in inv.detail.value  # v1 now only decrypts


# -- layout -------------------------------------------------------------------------------------
def test_inventory_has_no_separate_picker_list_and_the_dashboard_puts_actions_beside_the_grid(
        fleet):
    inv = KeyInventory(fleet)
    assert not [w for w in _walk(inv.widget) if isinstance(w, W.Select)]
    assert inv.grid in list(_walk(inv.widget))
    d = dashboard(fleet)
    keys = d.children[0]
    rows = [w for w in _walk(keys) if isinstance(w, W.HBox)
            and d.inventory.grid in list(_walk(w)) and d.actions.widget in list(_walk(w))]
    assert rows, "grid and actions are not in one row"
    body = rows[-1]  # the innermost row holding both: grid column, then the side column
    grid_col, side = body.children
    assert d.inventory.grid in list(_walk(grid_col)) and d.actions.widget in side.children
    assert d.inventory.detail in side.children and "kl-keys-side" in side._dom_classes
    assert not [w for w in _walk(keys) if isinstance(w, W.Select)]
    d.inventory.grid.selected = "tokens"
    assert d.actions.key.value == "tokens"


def test_grid_javascript_and_css_ship_in_the_package_and_need_no_network():
    js, css = (WIDGETS / "grid.js").read_text(), (WIDGETS / "grid.css").read_text()
    assert "innerHTML" not in js and "textContent" in js  # data is drawn as text
    assert "http" not in js and "import " not in js and "@import" not in css  # nothing fetched
    assert "white-space: nowrap" in css and "text-overflow: ellipsis" in css
    assert "position: sticky" in css and "var(--jp-ui-font-color1" in css
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["package-data"]["keyledger"]
    assert "widgets/*.js" in shipped and "widgets/*.css" in shipped
    grid = KeyGrid()
    assert "export default" in str(grid._esm) and ".kl-grid" in str(grid._css)
