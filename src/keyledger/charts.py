"""Altair chart builders shared by notebooks, widgets and the Panel dashboard.

Each builder takes one frame from ``keyledger.analytics`` (already aggregated in DuckDB) and
returns an Altair chart: a valid Vega-Lite spec, small enough to embed (only the columns a chart
needs, big frames cut to the ``top`` most relevant rows, said so in the subtitle), and a "No
data" message for an empty frame. Colours mean the same everywhere (see the palettes): overdue
and critical are the same red, due soon / high orange, ok green, neutral blue, inactive grey.

    import keyledger.charts as klc
    klc.rotation_status(analytics.key_status(ledger))

No builder applies ``configure_*`` to its chart, so charts can be combined (``a | b``,
``alt.vconcat``) and themed by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt
import pandas as pd

from . import notebook as _kernel_notebook
from .analytics import ROTATION_STATUSES, SEVERITY_ORDER, STATES
from .display import (
    BLUE,
    EMPTY,
    GREEN,
    GREY,
    ORANGE,
    OUTCOME_COLORS,
    ROTATION_COLORS,
    SEVERITY_COLORS,
    STATE_COLORS,
    VERSION_COLORS,
)
from .errors import InvalidInput

DEFAULT_WIDTH = 560
DEFAULT_HEIGHT = 260
ROW_STEP = 18  # pixels per bar in horizontal bar charts (height=None)
# Altair refuses more than 5,000 inline rows; every builder stays far below that on purpose.
MAX_ROWS = 2_000
# What a builder returns: one chart, or its marks layered (alt.layer may facet the layers).
TopChart = alt.Chart | alt.LayerChart | alt.FacetChart

# Categories with no meaning of their own (actions, keys, principals): no red, orange or green,
# so those keep meaning overdue/critical, due soon/high and ok. "other" is always grey.
GROUP_COLORS = ("#4e79a7", "#b07aa1", "#edc948", "#76b7b2", "#9c755f", "#ff9da7", "#a0cbe8",
                "#79706e", "#d4a6c8", "#499894", "#bab0ac", "#86bcb6")
OTHER_COLOR = GREY

# Retire-safety verdicts for key versions (version_usage), most urgent first.
RETIRE_STATUSES = ("still decrypting", "no decrypts", "current", "destroyed")
RETIRE_COLORS: dict[str, str] = {
    "still decrypting": ORANGE,  # an old version data still needs: not safe to retire
    "no decrypts": GREEN,  # an old version nobody decrypted with in the range: safe to retire
    "current": BLUE,
    "destroyed": GREY,
}
RETIRE_LABELS = {
    "still decrypting": "old version still decrypting: not safe to retire",
    "no decrypts": "old version, no decrypts in range: safe to retire",
    "current": "current version",
    "destroyed": "destroyed",
}


# -- helpers -------------------------------------------------------------------------------------
def _width(width: object) -> int | str:
    if width == "container":
        return "container"
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise InvalidInput(f"width must be a positive number of pixels or 'container', "
                           f"not {width!r}")
    return width


def _height(height: object, default: Any) -> Any:
    if height is None:
        return default
    if isinstance(height, bool) or not isinstance(height, int) or height <= 0:
        raise InvalidInput(f"height must be a positive number of pixels, not {height!r}")
    return height


def _top(top: object, most: int = MAX_ROWS) -> int:
    """A validated row limit, never above ``most`` (what a chart may embed)."""
    if isinstance(top, bool) or not isinstance(top, int) or top <= 0:
        raise InvalidInput(f"top must be a whole number >= 1, not {top!r}")
    return min(top, most)


def _frame(df: object, columns: Sequence[str], builder: str, source: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise InvalidInput(f"{builder}() takes the DataFrame of {source}, "
                           f"not {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InvalidInput(f"{builder}() takes the frame of {source}; it lacks the column(s) "
                           f"{', '.join(missing)}")
    return df


def _title(text: str, subtitle: str | Sequence[str] | None = None) -> alt.TitleParams:
    if subtitle:
        return alt.TitleParams(text=text, subtitle=subtitle, anchor="start",
                               subtitleColor="#57606a")
    return alt.TitleParams(text=text, anchor="start")


def _scale(palette: dict[str, str], extra: Sequence[str] = ()) -> alt.Scale:
    domain = list(palette) + [v for v in extra if v not in palette]
    return alt.Scale(domain=domain, range=[palette.get(v, GREY) for v in domain])


def no_data(title: str, message: str = "No data", *, width: int | str = DEFAULT_WIDTH,
            height: int = 120) -> alt.Chart:
    """A valid chart that shows ``message`` under ``title`` (what every builder returns for an
    empty frame)."""
    return (alt.Chart(alt.Data(values=[{"message": message}]))
            .mark_text(fontSize=14, color="#57606a")
            .encode(text="message:N")
            .properties(title=_title(title), width=_width(width), height=height))


def _utc(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series, utc=True)


def _iso(series: pd.Series) -> pd.Series:
    """UTC ISO-8601 text with a Z (Vega parses it as UTC), None for missing."""
    s = _utc(series)
    return s.dt.strftime("%Y-%m-%dT%H:%M:%SZ").astype(object).where(s.notna(), None)


def _stamp(series: pd.Series, fmt: str = "%Y-%m-%d %H:%M") -> pd.Series:
    s = _utc(series)
    return s.dt.strftime(fmt).astype(object).where(s.notna(), "-")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _cut(n_all: int, n_shown: int, what: str, how: str) -> str | None:
    return (f"showing the {n_shown:,} {how} of {n_all:,} {what}" if n_shown < n_all else None)


# -- keys and rotation ---------------------------------------------------------------------------
def rotation_status(key_status: pd.DataFrame, top: int = 50, *,
                    width: int | str = DEFAULT_WIDTH, height: int | None = None) -> TopChart:
    """Days until rotation is due per key (negative: overdue), most urgent first.

    Takes ``analytics.key_status()``; bars are coloured by rotation status (overdue red, due
    soon orange, ok green, not scheduled / inactive grey). At most ``top`` keys are drawn.
    """
    title = "Days until rotation due"
    df = _frame(key_status, ["name", "rotation_status", "days_to_due"], "rotation_status",
                "analytics.key_status()")
    width, top = _width(width), _top(top)
    if df.empty:
        return no_data(title, "No data: no keys", width=width,
                       height=_height(height, 120))
    rank = {s: i for i, s in enumerate(ROTATION_STATUSES)}
    extra = [c for c in ("owner", "state", "next_rotation_due") if c in df.columns]
    data = df[["name", "rotation_status", "days_to_due", *extra]].copy()
    data["_rank"] = data["rotation_status"].map(rank).fillna(len(rank))
    data = data.sort_values(["_rank", "days_to_due", "name"], na_position="last")
    counts = data["rotation_status"].astype(str).value_counts()  # the statuses present
    summary = f"{_plural(len(data), 'key')}: " + ", ".join(
        f"{int(counts[s])} {s}" for s in [*ROTATION_STATUSES, *sorted(
            set(counts.index) - set(ROTATION_STATUSES))] if s in counts)
    cut = _cut(len(data), min(top, len(data)), "keys", "most urgent")
    data = data.head(top).reset_index(drop=True)
    days = pd.to_numeric(data["days_to_due"], errors="coerce")
    scheduled = data["rotation_status"].isin(["overdue", "due soon", "ok"]) & days.notna()
    out = pd.DataFrame({
        "key": data["name"].astype(str),
        "status": data["rotation_status"].astype(str),
        "days": days.where(scheduled, 0.0).round(1),
        "order": range(len(data)),
    })
    label = pd.Series("", index=data.index, dtype=object)
    label[scheduled & (days <= 0)] = "overdue by " + (-days).round(0).astype("Int64").astype(str) + " d"
    label[scheduled & (days > 0)] = "in " + days.round(0).astype("Int64").astype(str) + " d"
    label[~scheduled] = data["rotation_status"].astype(str)
    if "state" in data:
        inactive = data["rotation_status"] == "inactive"
        label[inactive] = "inactive (" + data.loc[inactive, "state"].astype(str) + ")"
    out["label"] = label
    out["label_x"] = out["days"].clip(lower=0)
    tooltip = [alt.Tooltip("key:N", title="key"), alt.Tooltip("status:N", title="rotation"),
               alt.Tooltip("label:N", title="due")]
    if "next_rotation_due" in data:
        out["due_at"] = _stamp(data["next_rotation_due"]).values
        tooltip.append(alt.Tooltip("due_at:N", title="due at (UTC)"))
    if "owner" in data:
        out["owner"] = data["owner"].astype(object).where(data["owner"].notna(), "-").values
        tooltip.append(alt.Tooltip("owner:N", title="owner"))
    y = alt.Y("key:N", sort=alt.EncodingSortField("order", op="min", order="ascending"), title=None,
              axis=alt.Axis(labelLimit=180))
    base = alt.Chart(out).encode(y=y)
    bars = base.mark_bar(cornerRadius=2).encode(
        x=alt.X("days:Q", title="Days until rotation due (negative = overdue)"),
        color=alt.Color("status:N", scale=_scale(ROTATION_COLORS),
                        legend=alt.Legend(title="Rotation", orient="top")),
        tooltip=tooltip)
    labels = base.mark_text(align="left", dx=4, fontSize=11, color="#57606a").encode(
        x="label_x:Q", text="label:N", tooltip=tooltip)
    today = alt.Chart(alt.Data(values=[{"x": 0}])).mark_rule(color="#1f2328").encode(x="x:Q")
    return (alt.layer(bars, labels, today)
            .properties(title=_title(title, [summary] + ([cut] if cut else [])), width=width,
                        height=_height(height, alt.Step(ROW_STEP))))


def keys_by_state(keys_by_state: pd.DataFrame, *, width: int | str = DEFAULT_WIDTH,
                  height: int | None = None) -> TopChart:
    """Number of keys in each state (takes ``analytics.keys_by_state()``)."""
    title = "Keys by state"
    df = _frame(keys_by_state, ["state", "keys"], "keys_by_state", "analytics.keys_by_state()")
    width = _width(width)
    counts = pd.to_numeric(df["keys"], errors="coerce").fillna(0).astype(int)
    if df.empty or counts.sum() == 0:
        return no_data(title, "No data: no keys", width=width,
                       height=_height(height, 120))
    rank = {s: i for i, s in enumerate(STATES)}
    out = pd.DataFrame({"state": df["state"].astype(str), "keys": counts})
    out = out.groupby("state", as_index=False)["keys"].sum()
    out["order"] = out["state"].map(rank).fillna(len(rank)).astype(int)
    out = out.sort_values(["order", "state"]).reset_index(drop=True)
    y = alt.Y("state:N", sort=alt.EncodingSortField("order", op="min", order="ascending"), title=None)
    base = alt.Chart(out).encode(y=y, tooltip=[alt.Tooltip("state:N"), alt.Tooltip("keys:Q")])
    bars = base.mark_bar(cornerRadius=2).encode(
        x=alt.X("keys:Q", title="Number of keys", axis=alt.Axis(tickMinStep=1)),
        color=alt.Color("state:N", scale=_scale(STATE_COLORS, list(out["state"])),
                        legend=None))
    text = base.mark_text(align="left", dx=4, fontSize=11).encode(x="keys:Q", text="keys:Q")
    return (alt.layer(bars, text)
            .properties(title=_title(title, f"{_plural(int(out['keys'].sum()), 'key')}"),
                        width=width, height=_height(height, alt.Step(ROW_STEP + 4))))


def version_timeline(version_timeline: pd.DataFrame, top: int = 40, *,
                     width: int | str = DEFAULT_WIDTH, height: int | None = None) -> TopChart:
    """Each key version as a bar from its creation to the next version (or destruction, or
    now), coloured by version state; the current version is outlined.

    Takes ``analytics.version_timeline()``; draws the first ``top`` keys by name.
    """
    title = "Key versions over time"
    df = _frame(version_timeline, ["key", "version", "state", "start", "end", "current"],
                "version_timeline", "analytics.version_timeline()")
    width, top = _width(width), _top(top)
    if df.empty:
        return no_data(title, "No data: no key versions", width=width,
                       height=_height(height, 120))
    names = df["key"].astype(str)
    keys = sorted(names.unique())
    per_key = names.value_counts()
    shown = [k for k, n in zip(keys[:top], per_key[keys[:top]].cumsum(), strict=True)
             if n <= MAX_ROWS] or keys[:1]  # keys with thousands of versions: fewer keys
    data = df[names.isin(shown)].sort_values(["key", "version"])
    data = data.tail(MAX_ROWS).reset_index(drop=True)  # one key of > MAX_ROWS versions: newest
    out = pd.DataFrame({
        "key": data["key"].astype(str),
        "version": pd.to_numeric(data["version"]).astype(int),
        "state": data["state"].astype(str),
        "start": _iso(data["start"]),
        "end": _iso(data["end"].where(data["end"].notna(), data["start"])),
        "from": _stamp(data["start"]),
        "until": _stamp(data["end"]),
        "current": data["current"].fillna(False).astype(bool),
    })
    out["label"] = "v" + out["version"].astype(str)
    subtitle = [f"{_plural(len(df), 'version')} of {_plural(len(keys), 'key')}; "
                "outlined: the current version (UTC)"]
    if len(shown) < len(keys):
        subtitle.append(f"showing the first {len(shown):,} of {len(keys):,} keys by name "
                        "(filter to see others)")
    tooltip = [alt.Tooltip("key:N"), alt.Tooltip("label:N", title="version"),
               alt.Tooltip("state:N"), alt.Tooltip("from:N", title="from (UTC)"),
               alt.Tooltip("until:N", title="until (UTC)"), alt.Tooltip("current:N")]
    x = alt.X("start:T", title="Time (UTC)", scale=alt.Scale(type="utc"),
              axis=alt.Axis(format="%Y-%m-%d"))
    base = alt.Chart(out).encode(y=alt.Y("key:N", title=None, sort="ascending",
                                         axis=alt.Axis(labelLimit=180)))
    bars = base.mark_bar(height={"band": 0.7}, cornerRadius=2).encode(
        x=x, x2="end:T",
        color=alt.Color("state:N", scale=_scale(VERSION_COLORS, list(out["state"].unique())),
                        legend=alt.Legend(title="Version state", orient="top")),
        stroke=alt.condition("datum.current", alt.value("#1f2328"), alt.value(None)),
        strokeWidth=alt.condition("datum.current", alt.value(1.5), alt.value(0)),
        tooltip=tooltip)
    labels = base.mark_text(align="left", dx=3, fontSize=10, color="#ffffff").encode(
        x=alt.X("start:T", scale=alt.Scale(type="utc")), text="label:N", tooltip=tooltip)
    return (alt.layer(bars, labels)
            .properties(title=_title(title, subtitle), width=width,
                        height=_height(height, alt.Step(ROW_STEP + 4))))


# -- usage ---------------------------------------------------------------------------------------
_PERIOD_DAYS = {"day": 1, "week": 7}


def _regroup(df: pd.DataFrame, bucket: str) -> pd.DataFrame:
    """Re-aggregate an ops frame to weeks (Monday, like DuckDB's date_trunc) or months."""
    period = _utc(df["period"])
    if bucket == "week":
        start = (period - pd.to_timedelta(period.dt.day_of_week, unit="D")).dt.normalize()
    else:
        start = period.dt.normalize() - pd.to_timedelta(period.dt.day - 1, unit="D")
    return (df.assign(period=start).groupby(["period", "group"], as_index=False)["count"]
              .sum())


def _guess_bucket(period: pd.Series) -> str:
    """day or week, from the spacing of the periods (for a frame that lost its ``attrs``)."""
    stamps = pd.Series(_utc(period).dropna().unique()).sort_values()
    gaps = stamps.diff().dropna()
    return "week" if len(gaps) and gaps.min() >= pd.Timedelta(days=7) else "day"


def _fold(data: pd.DataFrame, keep_n: int) -> tuple[pd.DataFrame, bool]:
    """Keep the ``keep_n`` largest groups, sum the rest into "other"."""
    totals = data.groupby("group")["count"].sum().sort_values(ascending=False, kind="stable")
    named = [g for g in totals.index if g != "other"]
    if len(named) <= keep_n:
        return data, False
    keep = set(named[:keep_n])
    data = data.assign(group=data["group"].where(data["group"].isin(keep), "other"))
    return data.groupby(["period", "group"], as_index=False)["count"].sum(), True


def operations(ops_per_period: pd.DataFrame, *, max_groups: int = 10,
               width: int | str = DEFAULT_WIDTH, height: int | None = None) -> alt.Chart:
    """Operations per day (or week) stacked by group (action, key, principal or outcome).

    Takes ``analytics.ops_per_period()`` (its ``attrs`` name the bucket and grouping). At most
    ``max_groups`` groups keep their colour (the rest join "other"); a frame with more rows
    than a chart should carry is re-grouped by week, then month, and the subtitle says so.
    """
    df = _frame(ops_per_period, ["period", "group", "count"], "operations",
                "analytics.ops_per_period()")
    width, max_groups = _width(width), _top(max_groups)
    bucket = df.attrs.get("bucket") or _guess_bucket(df["period"])
    by = df.attrs.get("by") or "group"
    if df.empty:
        return no_data(f"Operations per {bucket}", "No data: no operations in range",
                       width=width, height=_height(height, 120))
    data = pd.DataFrame({"period": _utc(df["period"]),
                         "group": df["group"].astype(object).where(df["group"].notna(),
                                                                    "(none)").astype(str),
                         "count": pd.to_numeric(df["count"]).astype("int64")})
    notes = []
    data, folded = _fold(data, max_groups)
    coarser = {"day": "week", "week": "month"}
    while len(data) > MAX_ROWS and bucket in coarser:
        bucket = coarser[bucket]
        data = _regroup(data, bucket)
        notes.append(f"re-grouped by {bucket} to keep the chart small")
    while len(data) > MAX_ROWS and max_groups > 1:  # decades of months: fewer groups
        max_groups = max(1, max_groups // 2)
        data, folded = _fold(data, max_groups)
    if folded:
        what = f"{by}s" if by in ("action", "key", "principal", "outcome") else "groups"
        notes.insert(0, f"the {max_groups} busiest {what}; the rest as \"other\"")
    totals = data.groupby("group")["count"].sum().sort_values(ascending=False, kind="stable")
    groups = [g for g in totals.index if g != "other"] + (["other"] if "other" in totals else [])
    if by == "outcome":
        palette = {g: OUTCOME_COLORS.get(g, GROUP_COLORS[i % len(GROUP_COLORS)])
                   for i, g in enumerate(groups)}
    else:
        palette = {g: GROUP_COLORS[i % len(GROUP_COLORS)] for i, g in enumerate(groups)}
    if "other" in palette:
        palette["other"] = OTHER_COLOR
    rank = {g: i for i, g in enumerate(groups)}
    if bucket == "month":
        end = data["period"] + pd.DateOffset(months=1)
    else:
        end = data["period"] + pd.Timedelta(days=_PERIOD_DAYS[bucket])
    out = pd.DataFrame({
        "start": data["period"].dt.strftime("%Y-%m-%dT00:00:00Z"),
        "end": end.dt.strftime("%Y-%m-%dT00:00:00Z"),
        "period": data["period"].dt.strftime("%Y-%m-%d" if bucket != "month" else "%Y-%m"),
        "group": data["group"], "count": data["count"],
        "order": data["group"].map(rank).astype(int),
    })
    total = int(out["count"].sum())
    subtitle = [f"{total:,} operations by {by}, UTC"] + notes
    chart = alt.Chart(out).mark_bar().encode(
        x=alt.X("start:T", title=None, scale=alt.Scale(type="utc"),
                axis=alt.Axis(format="%Y-%m-%d" if bucket != "month" else "%Y-%m")),
        x2="end:T",
        y=alt.Y("sum(count):Q", title=f"Operations per {bucket}", stack="zero"),
        color=alt.Color("group:N", scale=alt.Scale(domain=groups,
                                                   range=[palette[g] for g in groups]),
                        legend=alt.Legend(title=by, orient="right", labelLimit=160)),
        order=alt.Order("order:Q", sort="ascending"),
        tooltip=[alt.Tooltip("period:N", title="week of" if bucket == "week" else bucket),
                 alt.Tooltip("group:N", title=by), alt.Tooltip("sum(count):Q", title="operations",
                                                               format=",")])
    return chart.properties(title=_title(f"Operations per {bucket}", subtitle), width=width,
                            height=_height(height, DEFAULT_HEIGHT))


def version_usage(version_usage: pd.DataFrame, top: int = 40, *,
                  width: int | str = DEFAULT_WIDTH, height: int | None = None) -> TopChart:
    """Decryptions per key version in the range, for retire-safety.

    Takes ``analytics.version_usage()``. An old (non-current) version that still decrypts is
    flagged orange ("not safe to retire"); an old version with no decrypts is green (safe to
    retire); current versions are blue, destroyed ones grey. Most urgent first, ``top`` rows.
    """
    title = "Decryptions per key version (retire safety)"
    df = _frame(version_usage, ["key", "version", "state", "current", "decryptions"],
                "version_usage", "analytics.version_usage()")
    width, top = _width(width), _top(top)
    if df.empty:
        return no_data(title, "No data: no key versions", width=width,
                       height=_height(height, 120))
    dec = pd.to_numeric(df["decryptions"], errors="coerce").fillna(0).astype("int64")
    current = df["current"].fillna(False).astype(bool)
    verdict = pd.Series("no decrypts", index=df.index, dtype=object)
    verdict[dec > 0] = "still decrypting"
    verdict[current] = "current"
    verdict[df["state"].astype(str) == "destroyed"] = "destroyed"
    rank = {s: i for i, s in enumerate(RETIRE_STATUSES)}
    data = pd.DataFrame({
        "key": df["key"].astype(str), "version": pd.to_numeric(df["version"]).astype(int),
        "state": df["state"].astype(str), "verdict": verdict, "decryptions": dec,
    })
    if "encryptions" in df:
        data["encryptions"] = pd.to_numeric(df["encryptions"], errors="coerce").fillna(0
                                                                                  ).astype("int64")
    if "last_decrypt" in df:
        data["last_decrypt"] = _stamp(df["last_decrypt"]).values
    data["_rank"] = data["verdict"].map(rank)
    data = data.sort_values(["_rank", "decryptions", "key", "version"],
                            ascending=[True, False, True, False]).reset_index(drop=True)
    counts = data["verdict"].value_counts()
    summary = f"{_plural(len(data), 'version')}: " + ", ".join(
        f"{int(counts[s])} {RETIRE_LABELS[s].split(':')[0]}" for s in RETIRE_STATUSES
        if s in counts)
    cut = _cut(len(data), min(top, len(data)), "versions", "most urgent")
    data = data.head(top).drop(columns="_rank")
    data["label"] = data["key"] + " v" + data["version"].astype(str)
    data["verdict_text"] = data["verdict"].map(RETIRE_LABELS)
    data["order"] = range(len(data))
    tooltip = [alt.Tooltip("key:N"), alt.Tooltip("version:Q"), alt.Tooltip("state:N"),
               alt.Tooltip("decryptions:Q", format=","),
               *([alt.Tooltip("encryptions:Q", format=",")] if "encryptions" in data else []),
               *([alt.Tooltip("last_decrypt:N", title="last decrypt (UTC)")]
                 if "last_decrypt" in data else []),
               alt.Tooltip("verdict_text:N", title="verdict")]
    y = alt.Y("label:N", sort=alt.EncodingSortField("order", op="min", order="ascending"), title=None,
              axis=alt.Axis(labelLimit=200))
    base = alt.Chart(data).encode(y=y, tooltip=tooltip)
    bars = base.mark_bar(cornerRadius=2).encode(
        x=alt.X("decryptions:Q", title="Decryptions in the selected range"),
        color=alt.Color("verdict:N", scale=_scale(RETIRE_COLORS),
                        legend=alt.Legend(title="Retire safety", orient="top",
                                          labelExpr="datum.label == 'still decrypting' ? "
                                                    "'old, still decrypting' : datum.label == "
                                                    "'no decrypts' ? 'old, no decrypts' : "
                                                    "datum.label")))
    text = base.mark_text(align="left", dx=4, fontSize=11, color="#57606a").encode(
        x="decryptions:Q", text=alt.Text("decryptions:Q", format=","))
    return (alt.layer(bars, text)
            .properties(title=_title(title, [summary] + ([cut] if cut else [])), width=width,
                        height=_height(height, alt.Step(ROW_STEP))))


def top_keys(top_keys: pd.DataFrame, top: int = 25, *, width: int | str = DEFAULT_WIDTH,
             height: int | None = None) -> alt.Chart:
    """The busiest keys: operations split into ok, denied and failed (takes
    ``analytics.top_keys()``), busiest first."""
    title = "Busiest keys"
    df = _frame(top_keys, ["key", "operations", "denied", "failed"], "top_keys",
                "analytics.top_keys()")
    width, top = _width(width), _top(top, MAX_ROWS // 3)
    if df.empty:
        return no_data(title, "No data: no key operations in range", width=width,
                       height=_height(height, 120))
    data = df.copy()
    for c in ("operations", "denied", "failed"):
        data[c] = pd.to_numeric(data[c], errors="coerce").fillna(0).astype("int64")
    data = data.sort_values(["operations", "key"], ascending=[False, True])
    cut = _cut(len(data), min(top, len(data)), "keys", "busiest")
    data = data.head(top).reset_index(drop=True)
    data["ok"] = (data["operations"] - data["denied"] - data["failed"]).clip(lower=0)
    data["order"] = range(len(data))
    long = data.melt(id_vars=["key", "order", "operations"], value_vars=["ok", "denied", "failed"],
                     var_name="outcome", value_name="count")
    long = long[long["count"] > 0]
    extra = {}
    if "principals" in data:
        extra["principals"] = data.set_index("key")["principals"]
    if "last_used" in data:
        extra["last_used"] = pd.Series(_stamp(data["last_used"]).values, index=data["key"])
    for name, values in extra.items():
        long[name] = long["key"].map(values)
    long["outcome_rank"] = long["outcome"].map({"ok": 0, "denied": 1, "failed": 2})
    tooltip = [alt.Tooltip("key:N"), alt.Tooltip("outcome:N"),
               alt.Tooltip("count:Q", format=","),
               alt.Tooltip("operations:Q", title="all operations", format=",")]
    if "principals" in long:
        tooltip.append(alt.Tooltip("principals:Q", title="distinct principals"))
    if "last_used" in long:
        tooltip.append(alt.Tooltip("last_used:N", title="last used (UTC)"))
    chart = alt.Chart(long.reset_index(drop=True)).mark_bar().encode(
        y=alt.Y("key:N", sort=alt.EncodingSortField("order", op="min", order="ascending"),
                title=None, axis=alt.Axis(labelLimit=180)),
        x=alt.X("count:Q", title="Operations in the selected range", stack="zero"),
        color=alt.Color("outcome:N", scale=_scale(OUTCOME_COLORS),
                        legend=alt.Legend(title="Outcome", orient="top")),
        order=alt.Order("outcome_rank:Q", sort="ascending"),
        tooltip=tooltip)
    total = int(data["operations"].sum())
    subtitle = [f"{total:,} operations on the keys shown, by outcome"] + ([cut] if cut else [])
    return chart.properties(title=_title(title, subtitle), width=width,
                            height=_height(height, alt.Step(ROW_STEP + 2)))


# -- compliance ----------------------------------------------------------------------------------
def compliance_heatmap(compliance_matrix: pd.DataFrame, *, width: int | str = DEFAULT_WIDTH,
                       height: int | None = None) -> TopChart:
    """Open findings per framework x severity (takes ``analytics.compliance_matrix()``).

    Every cell is drawn; cells with findings take the severity colour (critical red, high
    orange, ...), stronger for more findings, and empty cells stay light grey.
    """
    title = "Open findings by framework and severity"
    df = _frame(compliance_matrix, ["framework", "severity", "findings"], "compliance_heatmap",
                "analytics.compliance_matrix()")
    width = _width(width)
    if df.empty:
        return no_data(title, "No data: no open findings", width=width,
                       height=_height(height, 120))
    data = pd.DataFrame({"framework": df["framework"].astype(str),
                         "severity": df["severity"].astype(str),
                         "findings": pd.to_numeric(df["findings"], errors="coerce").fillna(0)
                         .astype("int64")})
    data = data.groupby(["framework", "severity"], as_index=False)["findings"].sum()
    severities = [s for s in SEVERITY_ORDER] + sorted(set(data["severity"]) - set(SEVERITY_ORDER))
    frameworks = sorted(set(data["framework"]))
    grid = pd.MultiIndex.from_product([frameworks, severities], names=["framework", "severity"])
    data = (data.set_index(["framework", "severity"]).reindex(grid, fill_value=0).reset_index())
    data["fill"] = data["severity"].where(data["findings"] > 0, "none")
    peak = max(int(data["findings"].max()), 1)
    data["strength"] = (0.55 + 0.45 * data["findings"] / peak).where(data["findings"] > 0, 1.0
                                                                    ).round(3)
    total = int(data["findings"].sum())
    palette = {**SEVERITY_COLORS, "none": EMPTY}
    fill_domain = [*severities, "none"]
    base = alt.Chart(data).encode(
        x=alt.X("severity:N", sort=severities, title="Severity",
                axis=alt.Axis(orient="top", labelAngle=0)),
        y=alt.Y("framework:N", sort=frameworks, title=None, axis=alt.Axis(labelLimit=200)),
        tooltip=[alt.Tooltip("framework:N"), alt.Tooltip("severity:N"),
                 alt.Tooltip("findings:Q", title="open findings")])
    cells = base.mark_rect(stroke="#ffffff", strokeWidth=2).encode(
        color=alt.Color("fill:N", scale=alt.Scale(domain=fill_domain,
                                                  range=[palette.get(s, GREY)
                                                         for s in fill_domain]),
                        legend=None),
        opacity=alt.Opacity("strength:Q", scale=None, legend=None))
    text = base.mark_text(fontSize=12, fontWeight="bold").encode(
        text="findings:Q",
        color=alt.condition("datum.findings > 0", alt.value("#1f2328"), alt.value("#9d9d9d")))
    subtitle = (f"{total:,} open finding{'s' if total != 1 else ''} in "
                f"{_plural(len(frameworks), 'framework')}")
    return (alt.layer(cells, text)
            .properties(title=_title(title, subtitle), width=width,
                        height=_height(height, alt.Step(30))))


def finding_trend(compliance_trend: pd.DataFrame, *, framework: str | None = None,
                  max_points: int = 400, width: int | str = DEFAULT_WIDTH,
                  height: int | None = None) -> alt.Chart:
    """Open findings per compliance evaluation over time, stacked by severity (takes
    ``ledger.compliance_trend()``; all frameworks summed unless ``framework`` is given).

    With more than ``max_points`` evaluations, the last evaluation of each day (then week)
    stands for it.
    """
    title = "Open findings over time"
    df = _frame(compliance_trend, ["run_id", "time", "framework", "severity", "open"],
                "finding_trend", "ledger.compliance_trend()")
    width, max_points = _width(width), _top(max_points, MAX_ROWS // len(SEVERITY_ORDER))
    if framework is not None:
        df = df[df["framework"] == framework]
    if df.empty:
        return no_data(title, "No data: no compliance evaluations yet", width=width,
                       height=_height(height, 120))
    value_cols = [c for c in ("open", "opened", "resolved") if c in df.columns]
    data = df[["run_id", "time", "severity", *value_cols]].copy()
    for c in value_cols:
        data[c] = pd.to_numeric(data[c], errors="coerce").fillna(0).astype("int64")
    data["time"] = _utc(data["time"])
    data = data.groupby(["run_id", "time", "severity"], as_index=False)[value_cols].sum()
    notes = []
    runs = data[["run_id", "time"]].drop_duplicates()
    for freq, word in (("D", "day"), ("W-SUN", "week"), ("MS", "month")):
        if len(runs) <= max_points:
            break
        period = runs["time"].dt.tz_localize(None).dt.to_period(freq if freq != "MS" else "M")
        keep = runs.groupby(period)["run_id"].max()
        data = data[data["run_id"].isin(set(keep))]
        runs = data[["run_id", "time"]].drop_duplicates()
        notes = [f"the last evaluation of each {word}"]
    severities = [*SEVERITY_ORDER, *sorted(set(data["severity"]) - set(SEVERITY_ORDER))]
    rank = {s: i for i, s in enumerate(severities)}
    out = pd.DataFrame({
        "time": _iso(data["time"]).values, "when": _stamp(data["time"]).values,
        "severity": data["severity"].astype(str).values,
        **{c: data[c].values for c in value_cols},
    })
    out["order"] = out["severity"].map(rank).astype(int)
    latest = data[data["run_id"] == data["run_id"].max()]["open"].sum()
    scope = framework or "all frameworks"
    subtitle = [f"{_plural(len(runs), 'evaluation')}, {scope}; latest: {int(latest):,} open"]
    subtitle += notes
    tooltip = [alt.Tooltip("when:N", title="evaluated (UTC)"), alt.Tooltip("severity:N"),
               *[alt.Tooltip(f"{c}:Q") for c in value_cols]]
    chart = alt.Chart(out).mark_area(line=True, point=True, opacity=0.8).encode(
        x=alt.X("time:T", title="Evaluation time (UTC)", scale=alt.Scale(type="utc"),
                axis=alt.Axis(format="%Y-%m-%d")),
        y=alt.Y("open:Q", title="Open findings", stack="zero"),
        color=alt.Color("severity:N", scale=_scale(SEVERITY_COLORS, severities),
                        sort=severities, legend=alt.Legend(title="Severity", orient="top")),
        order=alt.Order("order:Q", sort="ascending"),
        tooltip=tooltip)
    return chart.properties(title=_title(title, subtitle), width=width,
                            height=_height(height, DEFAULT_HEIGHT))


__all__ = [
    "DEFAULT_HEIGHT", "DEFAULT_WIDTH", "GROUP_COLORS", "MAX_ROWS", "OUTCOME_COLORS",
    "RETIRE_COLORS", "RETIRE_STATUSES", "ROTATION_COLORS", "SEVERITY_COLORS", "STATE_COLORS",
    "VERSION_COLORS", "compliance_heatmap", "finding_trend", "keys_by_state", "no_data",
    "operations", "rotation_status", "top_keys", "version_timeline", "version_usage",
]


# In a Jupyter kernel, charts render offline from the first one on: Altair's default renderer
# would load Vega from a CDN (keyledger.notebook; a renderer chosen by hand is kept).
if _kernel_notebook.in_kernel():
    _kernel_notebook.ensure_setup()
