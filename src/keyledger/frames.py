"""One shape for every DataFrame keyledger hands out (docs/notebooks.md, "DataFrames").

Each public method or ``keyledger.analytics`` function that returns a frame passes it through
``normalize`` on the way out, so frames from different calls compare, sort and concatenate
without surprises:

- times: ``datetime64[us, UTC]`` (the store keeps naive UTC; naive columns are read as UTC),
  missing ``NaT``;
- text: pandas ``string`` dtype, missing ``<NA>`` (never ``None`` or ``NaN``);
- whole numbers: ``Int64``, booleans: ``boolean`` (missing ``<NA>``);
- measures (days, medians, means): ``float64``, missing ``NaN``;
- words with an order: ordered ``Categorical``, so ``sort_values`` gives the order that
  means something. Key and version states in lifecycle order (pre-activation, active, ...,
  destroyed); severity and rotation status most urgent first, as everywhere in keyledger
  (critical, high, medium, low, info; overdue, due soon, ok, not scheduled, inactive): so
  ``df[df.severity <= "high"]`` selects critical and high, and ``.map(rank)`` of these
  columns keeps that order;
- lists and mappings (tags, aliases, parameters, approvers) stay Python objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .model import KeyState

if TYPE_CHECKING:
    import pandas as pd

    TIME_DTYPE: pd.DatetimeTZDtype
    TEXT_DTYPE: pd.StringDtype


def _dtype(name: str) -> Any:
    """TIME_DTYPE or TEXT_DTYPE, made (and kept) on first use: pandas is loaded by the first
    frame keyledger hands out, not by ``import keyledger`` (which CLI runs and servers pay)."""
    if name not in globals():
        import pandas as pd

        globals().update(TIME_DTYPE=pd.DatetimeTZDtype("us", "UTC"),
                         TEXT_DTYPE=pd.StringDtype(na_value=pd.NA))
    return globals()[name]


def __getattr__(name: str) -> Any:
    if name in ("TIME_DTYPE", "TEXT_DTYPE"):
        return _dtype(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "TIME_DTYPE", "TEXT_DTYPE"})


# Orders of the ordered categoricals: a key's lifecycle (model.KeyState) and a version's.
KEY_STATES = tuple(s.value for s in KeyState)
VERSION_STATES = ("active", "retired", "compromised", "destroyed")


def normalize(df: pd.DataFrame, *, times: Iterable[str] = (),
              categories: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """``df`` with the conventions above applied to every column (changed in place, returned).

    ``times`` names columns that hold times even when no value says so (all missing);
    ``categories`` maps a column to its words in ascending order (values outside them are
    kept, ordered after them)."""
    import pandas as pd

    times, categories = set(times), dict(categories or {})
    for i, col in enumerate(df.columns):  # by position: query() may repeat a column name
        values = df.iloc[:, i]
        if col in categories:
            df.isetitem(i, ordered(values, categories[col]))
        elif col in times or pd.api.types.is_datetime64_any_dtype(values):
            df.isetitem(i, utc(values))
        else:
            df.isetitem(i, _plain(values))
    return df


def ordered(values: pd.Series, order: Sequence[str]) -> pd.Series:
    """``values`` as an ordered Categorical of ``order`` (unknown words appended, sorted)."""
    import pandas as pd

    text = values.astype(object).where(values.notna(), None).map(
        lambda v: None if v is None else str(v))
    extra = sorted(set(text.dropna()) - set(order))
    dtype = pd.CategoricalDtype([*order, *extra], ordered=True)
    return text.astype(dtype)


def utc(values: pd.Series) -> pd.Series:
    """Times as ``datetime64[us, UTC]``; naive values are UTC already (the store's rule)."""
    import pandas as pd

    out = pd.to_datetime(values, utc=True)
    return out.astype(_dtype("TIME_DTYPE"))


def _plain(values: pd.Series) -> pd.Series:
    import pandas as pd

    text_dtype = _dtype("TEXT_DTYPE")
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype | pd.DatetimeTZDtype):
        return values
    if pd.api.types.is_bool_dtype(dtype):
        return values.astype("boolean")
    if pd.api.types.is_integer_dtype(dtype):
        return values.astype("Int64")
    if pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype):
        return values.astype(text_dtype)
    if pd.api.types.is_object_dtype(dtype):
        kinds = {type(v) for v in values if v is not None and not _na(v)}
        if kinds <= {str}:  # text (or nothing but missing values, as in an empty frame)
            return values.astype(object).where(values.notna(), None).astype(text_dtype)
        if kinds <= {bool}:
            return values.astype(object).where(values.notna(), None).astype("boolean")
    return values


def _na(value: object) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays, lists: not a missing scalar
        return False


__all__ = ["KEY_STATES", "TEXT_DTYPE", "TIME_DTYPE", "VERSION_STATES", "normalize", "ordered", "utc"]
