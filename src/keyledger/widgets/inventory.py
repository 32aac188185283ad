"""KeyInventory: a filterable, sortable, paged key grid; clicking a row shows the key's details."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import ipywidgets as W
import pandas as pd

from .. import analytics as ka
from ..display import ROTATION_COLORS, version_use
from ._common import (
    ALL,
    MUTED_COLOUR,
    Pager,
    WidgetView,
    attempt,
    chosen,
    dl,
    html_table,
    message_html,
    options_with_all,
    section,
    set_status,
    tried,
)
from .grid import KeyGrid, column_specs, json_rows

if TYPE_CHECKING:
    from ..service import KeyLedger

# sort choice -> (columns, ascending default)
SORTS: dict[str, tuple[list[str], bool]] = {
    "urgency": (["_rank", "days_to_due", "name"], True),
    "name": (["name"], True),
    "state": (["state", "name"], True),
    "owner": (["owner", "name"], True),
    "spec": (["spec", "name"], True),
    "purpose": (["purpose", "name"], True),
    "days to due": (["days_to_due", "name"], True),
    "next rotation": (["next_rotation_due", "name"], True),
    "latest version": (["latest_version", "name"], False),
    "created": (["created_at", "name"], False),
    "rotated": (["rotated_at", "name"], False),
}
TABLE_COLUMNS = {"name": "key", "state": "state", "rotation_status": "rotation",
                 "days_to_due": "days to due", "spec": "spec", "purpose": "purpose",
                 "latest_version": "version", "owner": "owner", "tags": "tags",
                 "rotated_at": "rotated", "next_rotation_due": "next rotation"}
# grid column (a key_status field) <-> sort choice; tags do not sort
COLUMN_SORTS = {"name": "name", "state": "state", "rotation_status": "urgency",
                "days_to_due": "days to due", "spec": "spec", "purpose": "purpose",
                "latest_version": "latest version", "owner": "owner", "rotated_at": "rotated",
                "next_rotation_due": "next rotation"}
SORT_COLUMNS = {sort: column for column, sort in COLUMN_SORTS.items()}
COLUMN_WIDTHS = {"name": 170, "state": 95, "rotation_status": 95, "days_to_due": 85,
                 "spec": 100, "purpose": 110, "latest_version": 65, "owner": 110, "tags": 180,
                 "rotated_at": 125, "next_rotation_due": 125}
ACTIVITY_ROWS = 10
GRID_HEIGHT = 320


class GridPick:
    """The old key picker's face over the grid, for scripts: ``options`` (the keys on the
    current page, in order) and ``value`` (the selected key; assigning it selects)."""

    def __init__(self, grid: KeyGrid) -> None:
        self._grid = grid

    @property
    def options(self) -> tuple[str | None, ...]:
        return self._grid.names

    @property
    def value(self) -> str | None:
        return self._grid.selected

    @value.setter
    def value(self, name: str | None) -> None:
        self._grid.selected = name


class KeyInventory(WidgetView):
    """Keys of a ledger in a compact grid with filters (state, owner, spec, tag, rotation status,
    name), a sort order, and a detail pane for the selected key (versions, policy, grants and
    recent activity). Click a row to select its key; click a header to sort.

    Pieces for scripting and tests: ``grid`` (the ``KeyGrid``; ``grid.selected`` is the
    selection as an observable trait), ``filters`` (dict of widgets), ``sort_by``/``descending``,
    ``select`` (``options``: keys on the current page; ``value``: the selection), ``detail``
    (HTML), ``status``, ``pager``, ``controls`` (the filter rows), ``frame`` (the filtered, sorted
    rows), ``refresh()``, ``select_key(name)``, ``selected``, ``on_select(callback)``.

    The selection stays while the key exists, even when a filter or the page hides its row:
    the detail pane and a linked ``KeyActions`` keep naming the same key.
    """

    def __init__(self, ledger: KeyLedger, *, page_size: int = 50,
                 activity_rows: int = ACTIVITY_ROWS, grid_height: int = GRID_HEIGHT) -> None:
        self.ledger = ledger
        self.activity_rows = activity_rows
        self.keys = pd.DataFrame()  # key_status of every visible key
        self.frame = pd.DataFrame()  # after filters and sort
        self._page = pd.DataFrame()  # the rows on the current page
        self._listeners: list[Callable[[str | None], None]] = []
        self._busy = False

        dd = dict(layout=W.Layout(width="180px"), style={"description_width": "55px"})
        self.filters: dict[str, W.Widget] = {
            "state": W.Dropdown(description="state", options=[ALL, *ka.STATES], **dd),
            "rotation": W.Dropdown(description="rotation",
                                   options=[ALL, *ka.ROTATION_STATUSES], **dd),
            "owner": W.Dropdown(description="owner", options=[ALL], **dd),
            "spec": W.Dropdown(description="spec", options=[ALL], **dd),
            "tag": W.Text(description="tag", placeholder="team=payments",
                          continuous_update=False, **dd),
            "name": W.Text(description="name", placeholder="contains…",
                           continuous_update=False, **dd),
        }
        self.sort_by = W.Dropdown(description="sort", options=list(SORTS), value="urgency", **dd)
        self.descending = W.Checkbox(description="descending", value=False, indent=False,
                                     layout=W.Layout(width="110px"))
        self.refresh_button = W.Button(description="Refresh", icon="refresh",
                                       layout=W.Layout(width="100px"))
        self.status = W.HTML()
        self.summary = W.HTML()
        self.grid = KeyGrid(
            sort_rows=False, columns=column_specs(TABLE_COLUMNS, COLUMN_WIDTHS, ["tags"]),
            colors={"rotation_status": dict(ROTATION_COLORS)}, height=grid_height,
            empty="no keys match the filters", layout=W.Layout(width="100%"))
        self.select = GridPick(self.grid)
        self.detail = W.HTML(value=message_html("select a key to see its details"),
                             layout=W.Layout(flex="1 1 380px", min_width="0",
                                             max_height=f"{grid_height + 120}px",
                                             overflow="auto"))
        self.pager = Pager(page_size, self._safe(self._render), noun="keys")

        for w in self.filters.values():
            w.observe(self._safe(self._filters_changed), names="value")
        self.sort_by.observe(self._safe(self._filters_changed), names="value")
        self.descending.observe(self._safe(self._filters_changed), names="value")
        self.grid.observe(self._safe(self._selected), names="selected")
        self.grid.observe(self._safe(self._grid_sorted), names="sort")
        self.refresh_button.on_click(self._safe(lambda _b: self.refresh()))

        f = self.filters
        wrap = W.Layout(flex_flow="row wrap")
        self.controls = W.VBox([
            W.HBox([f["state"], f["rotation"], f["owner"], f["spec"]], layout=wrap),
            W.HBox([f["tag"], f["name"], self.sort_by, self.descending, self.refresh_button],
                   layout=wrap),
        ])
        self.grid_box = W.VBox([self.grid, self.pager.box],
                               layout=W.Layout(flex="1 1 460px", min_width="0"))
        body = W.HBox([self.grid_box, self.detail],
                      layout=W.Layout(flex_flow="row wrap", align_items="flex-start"))
        self.widget = W.VBox([self.controls, self.summary, self.status, body])
        self.refresh()

    # -- public -----------------------------------------------------------------------------
    @property
    def selected(self) -> str | None:
        """The name of the selected key, if any (observable: ``grid.selected``)."""
        return self.grid.selected

    def on_select(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(name)`` whenever the selected key changes."""
        self._listeners.append(callback)

    def refresh(self) -> None:
        """Reload the keys from the ledger (one ``list_keys`` call) and redraw; the selection
        stays unless its key is gone."""
        status = tried(self.status, ka.key_status, self.ledger, what="loading keys")
        if status is None:
            return
        set_status(self.status, "")
        self.keys = status
        self._busy = True  # option updates below must not re-render once each
        try:
            for name, column in (("owner", "owner"), ("spec", "spec")):
                widget = self.filters[name]
                options = options_with_all(status[column]) if len(status) else [ALL]
                keep = widget.value if widget.value in options else ALL
                widget.options = options
                widget.value = keep
        finally:
            self._busy = False
        self._apply(reset=False)
        if self.selected is not None:
            if self.selected in set(status.get("name", [])):
                self._show_detail(self.selected)
            else:
                self.grid.selected = None  # the key is gone: say so, tell the listeners

    def select_key(self, name: str) -> None:
        """Select ``name``, moving to the page that holds it (clearing filters that hide it)."""
        if name not in set(self.frame.get("name", [])):
            self._busy = True
            try:
                for key, widget in self.filters.items():
                    widget.value = ALL if key not in ("tag", "name") else ""
            finally:
                self._busy = False
            self._apply(reset=True)
        names = list(self.frame["name"]) if len(self.frame) else []
        if name not in names:
            set_status(self.status, f"no key named {name!r} is visible to "
                       f"{self.ledger.principal}", "error")
            return
        self.pager.offset = names.index(name) // self.pager.page_size * self.pager.page_size
        self._render()
        self.grid.selected = name

    # -- internals --------------------------------------------------------------------------
    def _filters_changed(self, _change: object) -> None:
        if not self._busy:
            self._apply(reset=True)

    def _grid_sorted(self, change: dict) -> None:
        """A header click: the same sort as the dropdown and checkbox, over every page."""
        if self._busy or not change["new"] or change["new"]["column"] not in COLUMN_SORTS:
            return
        choice = COLUMN_SORTS[change["new"]["column"]]
        default_ascending = SORTS[choice][1]
        self._busy = True
        try:
            self.sort_by.value = choice
            self.descending.value = (not change["new"]["descending"]) != default_ascending
        finally:
            self._busy = False
        self._apply(reset=True)

    def _grid_sort(self) -> dict | None:
        """The sort the dropdown and checkbox ask for, as the grid's ``sort`` trait."""
        column = SORT_COLUMNS.get(self.sort_by.value)
        if column is None:
            return None
        ascending = SORTS[self.sort_by.value][1] != self.descending.value
        return {"column": column, "descending": not ascending}

    def _filtered(self) -> pd.DataFrame:
        df = self.keys
        if df.empty:
            return df
        f = self.filters
        tag = f["tag"].value.strip()
        if tag:
            df = ka.Filters(tags=tuple(t.strip() for t in tag.split(",") if t.strip())
                            ).match_keys(df)
        for name, column in (("state", "state"), ("rotation", "rotation_status"),
                             ("owner", "owner"), ("spec", "spec")):
            value = chosen(f[name])
            if value is not None:
                df = df[df[column].astype(str) == value]
        text = f["name"].value.strip().lower()
        if text:
            hay = df["name"].str.lower() + " " + df["aliases"].map(
                lambda a: " ".join(a or ())).str.lower()
            df = df[hay.str.contains(text, regex=False)]
        columns, ascending = SORTS[self.sort_by.value]
        if self.descending.value:
            ascending = not ascending
        order = {s: i for i, s in enumerate(ka.ROTATION_STATUSES)}
        df = df.assign(_rank=df["rotation_status"].map(order))
        asc = [ascending] + [True] * (len(columns) - 1)  # the tie-breakers stay ascending
        return (df.sort_values(columns, ascending=asc, na_position="last", kind="mergesort")
                  .drop(columns="_rank").reset_index(drop=True))

    def _apply(self, *, reset: bool) -> None:
        frame = tried(self.status, self._filtered, what="filters")
        if frame is None:
            return
        set_status(self.status, "")
        self.frame = frame
        if reset:
            self.pager.reset()
        self.pager.clamp(len(frame))
        self._render()

    def _render(self) -> None:
        frame = self.frame
        start = self.pager.offset
        page = frame.iloc[start:start + self.pager.page_size] if len(frame) else frame
        self._page = page
        self._busy = True  # the grid's sort echo must not re-apply the filters
        try:
            self.grid.rows = json_rows(page, TABLE_COLUMNS)
            self.grid.sort = self._grid_sort()
        finally:
            self._busy = False
        self.pager.update(len(page), len(frame))
        counts = self.keys["rotation_status"].value_counts() if len(self.keys) else {}
        parts = [f"{len(frame):,} of {len(self.keys):,} keys"] + [
            f"{int(counts.get(s, 0))} {s}" for s in ("overdue", "due soon") if len(self.keys)]
        if self.selected is not None and self.selected not in self.grid.names:
            parts.append(f"selected {self.selected} is not in this list")
        self.summary.value = (f"<span style='color:{MUTED_COLOUR}'>"
                              f"{html.escape(' · '.join(parts))}</span>")

    def _selected(self, change: dict) -> None:
        if self._busy:
            return
        name = change["new"]
        if name is None:
            self.detail.value = message_html("select a key to see its details")
        else:
            self._show_detail(name)
        for callback in list(self._listeners):
            attempt(self.status, callback, name, what="selection")

    def _show_detail(self, name: str) -> None:
        self.detail.value = key_detail_html(self.ledger, name, self.keys,
                                            activity_rows=self.activity_rows)


def key_detail_html(ledger: KeyLedger, name: str, status: pd.DataFrame | None = None, *,
                    activity_rows: int = ACTIVITY_ROWS) -> str:
    """Versions, policy, grants and recent activity of key ``name`` as escaped HTML; a part the
    principal may not read says so in words."""
    errors = W.HTML()
    key = tried(errors, ledger.get_key, name, what=f"key {name!r}")
    if key is None:
        return errors.value
    row = None
    if status is not None and len(status):
        match = status[status["name"] == key.name]
        row = match.iloc[0] if len(match) else None
    rotation = row["rotation_status"] if row is not None else ""
    head = (f"<h3 style='margin:8px 0 4px 0'>{html.escape(key.name)} "
            f"<span style='font-weight:400;color:{MUTED_COLOUR}'>{html.escape(key.spec.name)} · "
            f"{html.escape(key.purpose.value)} · {html.escape(key.state.value)}"
            f"{' · ' + html.escape(rotation) if rotation else ''}</span></h3>")
    facts = dl([
        ("owner", key.owner), ("tags", key.tags), ("aliases", key.aliases),
        ("created", key.created_at), ("rotated", key.rotated_at),
        ("rotation period", f"{key.rotation_period.days} days ({key.rotation_source})"
         if key.rotation_period else "none"),
        ("next rotation due", key.next_rotation_due),
        ("days to due", row["days_to_due"] if row is not None else None),
        ("deletion due", key.deletion_due), ("key id", key.key_id),
    ])
    versions = pd.DataFrame([
        {"version": v.version, "state": v.state, "created": v.created_at,
         "destroyed": v.destroyed_at,
         "use": version_use(key, v.version)}
        for v in sorted(key.versions.values(), key=lambda v: v.version, reverse=True)])
    policy = {"latest_version": key.latest_version,
              "min_decryption_version": key.min_decryption_version,
              "min_encryption_version": key.min_encryption_version,
              "exportable": key.exportable, **key.policy}
    policy_html = (f"<pre style='font-size:12px;margin:0'>"
                   f"{html.escape(json.dumps(policy, indent=2, sort_keys=True, default=str))}</pre>")
    errs = W.HTML()
    ok, grants = attempt(errs, ledger.grants, key.name, what="grants")
    grants_html = (html_table(grants, {"principal": "principal", "role": "role", "key": "scope",
                                       "granted_by": "granted by", "granted_at": "granted at"},
                              empty="no grants") if ok else errs.value)
    errs = W.HTML()
    ok, activity = attempt(errs, ledger.audit, key=key.name, limit=activity_rows,
                           newest_first=True, what="recent activity")
    activity_html = (html_table(activity, ["time", "principal", "action", "version", "outcome",
                                           "error"], empty="no recorded activity")
                     if ok else errs.value)
    return (head + facts + section("Versions", html_table(versions, list(versions.columns)))
            + section("Policy", policy_html) + section("Grants", grants_html)
            + section(f"Recent activity (newest {activity_rows})", activity_html))


__all__ = ["GridPick", "KeyInventory", "key_detail_html"]
