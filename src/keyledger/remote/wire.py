"""keyledger's own wire format (``KeyLedger.<method>`` calls of ``keyledger serve``).

JSON with tagged values, so what a method returns on the server is what the client rebuilds:

- ``bytes`` -> ``{"__bytes__": base64}``; datetimes -> ``{"__datetime__": ISO-8601}`` (UTC);
  timedeltas -> ``{"__timedelta__": seconds}``; tuples and frozensets tagged likewise; a dict
  whose keys are not all text -> ``{"__dict__": [[k, v], ...]}``;
- dataclasses and enums of keyledger (``Key``, ``VerifyReport``, ``DataKey``, ``KeyState``,
  ...) -> their class name and fields, rebuilt as the same classes from an allow-list;
- DataFrames -> split orient, column by column with its dtype, so keyledger's frame
  conventions (``keyledger.frames``: UTC times, ``string``/``Int64``/``boolean``, ordered
  categoricals, Python lists and dicts in object columns) round-trip exactly.

Decoding never imports or calls anything outside ``_CLASSES``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import functools
import math
import sys
from datetime import UTC, datetime, timedelta
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from ..backup import RestoreTestReport
from ..byok import WrappedKey
from ..columns import BatchResult
from ..errors import InvalidInput
from ..hsm.backend import Capabilities, KeyAttributes
from ..model import SPECS, Family, Key, KeySpec, KeyState, KeyVersion, Purpose
from ..rotation import DueReport
from ..runtime import ReconcileReport
from ..services.accesskeys import AccessKeySecret
from ..services.crypto import DataKey
from ..services.maintenance import RewrapResult
from ..store.verify import VerifyReport

if TYPE_CHECKING:
    import pandas as pd

_TAGS = ("__bytes__", "__datetime__", "__timedelta__", "__tuple__", "__frozenset__", "__dict__",
         "__dataclass__", "__enum__", "__spec__", "__frame__", "__float__")
_CLASSES: dict[str, type] = {c.__name__: c for c in (
    Key, KeyVersion, VerifyReport, DueReport, RewrapResult, DataKey, Capabilities,
    KeyAttributes, ReconcileReport, AccessKeySecret, WrappedKey, RestoreTestReport,
    BatchResult)}
_ENUMS: dict[str, type[enum.Enum]] = {c.__name__: c for c in (KeyState, Purpose, Family)}


# pandas and numpy (with keyledger.display's frames) are imported by the first frame decoded,
# not by this module: a `keyledger serve` that answers only AWS KMS calls never needs them
# (~0.5 s of CPU at its start). Until something imported them, no value can be one of theirs.
@functools.cache
def _frames() -> dict[str, type[pd.DataFrame]]:
    import pandas as pd

    from ..display import AuditFrame, FindingsFrame

    return {c.__name__: c for c in (pd.DataFrame, AuditFrame, FindingsFrame)}


# -- values ----------------------------------------------------------------------------------------
def encode(value: Any) -> Any:
    """``value`` as JSON-ready data (see the module's docstring)."""
    if isinstance(value, enum.Enum) and type(value).__name__ in _ENUMS:
        return {"__enum__": type(value).__name__, "value": value.value}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    pd, np = sys.modules.get("pandas"), sys.modules.get("numpy")
    if pd is not None and isinstance(value, pd.DataFrame):
        return encode_frame(value)
    if isinstance(value, datetime):  # pd.Timestamp too
        return {"__datetime__": _iso(value)}
    if isinstance(value, timedelta):
        return {"__timedelta__": value.total_seconds()}
    if isinstance(value, KeySpec):
        return {"__spec__": value.name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if _CLASSES.get(type(value).__name__) is not type(value):
            raise TypeError(f"{type(value).__name__} cannot travel on keyledger's wire")
        return {"__dataclass__": type(value).__name__,
                "fields": {f.name: encode(getattr(value, f.name))
                           for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, frozenset | set):
        return {"__frozenset__": sorted((encode(v) for v in value), key=repr)}
    if (isinstance(value, list) or (pd is not None and isinstance(value, pd.Series))
            or (np is not None and isinstance(value, np.ndarray))):
        return [encode(v) for v in list(value)]
    if isinstance(value, PurePath):
        return str(value)
    if np is not None and isinstance(value, np.generic):
        return encode(value.item())
    if pd is not None and (value is pd.NA or value is pd.NaT):
        return None
    raise TypeError(f"{type(value).__name__} cannot travel on keyledger's wire")


def decode(data: Any) -> Any:
    """The value ``encode`` made ``data`` from; ``InvalidInput`` for anything else."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = next((k for k in _TAGS if k in data), None)
    if tag is None:
        return {k: decode(v) for k, v in data.items()}
    try:
        return _DECODERS[tag](data)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise InvalidInput(f"a malformed {tag} value on keyledger's wire: "
                           f"{type(exc).__name__}") from None


def _iso(value: datetime) -> str:
    if value.tzinfo is None:  # keyledger's naive times are UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _datetime(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _dataclass(data: dict[str, Any]) -> Any:
    cls = _CLASSES[data["__dataclass__"]]
    return cls(**{k: decode(v) for k, v in data["fields"].items()})


_DECODERS: dict[str, Any] = {
    "__bytes__": lambda d: base64.b64decode(d["__bytes__"], validate=True),
    "__datetime__": lambda d: _datetime(d["__datetime__"]),
    "__timedelta__": lambda d: timedelta(seconds=float(d["__timedelta__"])),
    "__tuple__": lambda d: tuple(decode(d["__tuple__"])),
    "__frozenset__": lambda d: frozenset(decode(d["__frozenset__"])),
    "__dict__": lambda d: {decode(k): decode(v) for k, v in d["__dict__"]},
    "__dataclass__": _dataclass,
    "__enum__": lambda d: _ENUMS[d["__enum__"]](d["value"]),
    "__spec__": lambda d: SPECS[d["__spec__"]],
    "__frame__": lambda d: decode_frame(d),
    "__float__": lambda d: float(d["__float__"]),
}


# -- frames ----------------------------------------------------------------------------------------
def encode_frame(df: pd.DataFrame) -> dict[str, Any]:
    """Split orient, column by column: ``{"__frame__": class, "columns": [{"name", "dtype",
    "values", ...}], "index": ...}`` (the index only when it is not 0..n-1)."""
    import pandas as pd

    cls = type(df).__name__ if type(df).__name__ in _frames() else "DataFrame"
    columns = [_encode_column(str(name) if not isinstance(name, str) else name, df.iloc[:, i])
               for i, name in enumerate(df.columns)]
    out: dict[str, Any] = {"__frame__": cls, "columns": columns,
                           "columns_dtype": str(df.columns.dtype)}
    if not (isinstance(df.index, pd.RangeIndex) and df.index.start == 0 and df.index.step == 1):
        out["index"] = _encode_column(df.index.name, pd.Series(df.index))
    if df.attrs:
        out["attrs"] = encode(dict(df.attrs))
    return out


def _encode_column(name: Any, values: pd.Series) -> dict[str, Any]:
    import pandas as pd

    dtype = values.dtype
    col: dict[str, Any] = {"name": name, "dtype": str(dtype)}
    if isinstance(dtype, pd.CategoricalDtype):
        col["categories"] = [encode(c) for c in dtype.categories]
        col["ordered"] = bool(dtype.ordered)
        col["values"] = [None if pd.isna(v) else encode(v) for v in values.astype(object)]
    elif pd.api.types.is_datetime64_any_dtype(dtype):
        col["values"] = [None if pd.isna(v) else _iso(v) for v in values]
    elif pd.api.types.is_timedelta64_dtype(dtype):
        col["values"] = [None if pd.isna(v) else v.total_seconds() for v in values]
    elif pd.api.types.is_object_dtype(dtype):
        col["values"] = [encode(v) for v in values]
    else:  # numbers, booleans, text (nullable or not)
        col["values"] = [None if _missing(v) else encode(v) for v in values.astype(object)]
    return col


def _missing(value: object) -> bool:
    import pandas as pd

    return value is None or value is pd.NA or value is pd.NaT or (
        isinstance(value, float) and math.isnan(value))


def decode_frame(data: dict[str, Any]) -> pd.DataFrame:
    """The frame ``encode_frame`` made ``data`` from (same class, dtypes and values)."""
    import pandas as pd

    cls = _frames()[data["__frame__"]]
    series = [_decode_column(c) for c in data["columns"]]
    index = _decode_column(data["index"]) if "index" in data else None
    rows = len(index) if index is not None else len(series[0]) if series else 0
    df = cls(dict(enumerate(series)), index=pd.RangeIndex(rows))
    if index is not None:  # set after building: passing it would realign the columns to it
        df.index = pd.Index(index, name=data["index"]["name"])
    df.columns = pd.Index([c["name"] for c in data["columns"]],
                          dtype=data.get("columns_dtype", "object"))
    if "attrs" in data:
        df.attrs.update(decode(data["attrs"]))
    return df


def _decode_column(col: dict[str, Any]) -> pd.Series:
    import numpy as np
    import pandas as pd

    dtype, values = str(col["dtype"]), list(col["values"])
    if dtype == "category":
        cats = pd.CategoricalDtype([decode(c) for c in col["categories"]],
                                   ordered=bool(col["ordered"]))
        out = pd.Series([decode(v) for v in values], dtype=object).astype(cats)
    elif dtype.startswith("datetime64"):
        out = pd.Series(pd.to_datetime(values, utc=True, format="ISO8601")).astype(dtype)
    elif dtype.startswith("timedelta64"):
        out = pd.Series(pd.to_timedelta([np.nan if v is None else v for v in values],
                                         unit="s")).astype(dtype)
    elif dtype == "object":
        out = pd.Series([decode(v) for v in values], dtype=object)
    elif dtype.startswith(("float", "Float")):
        out = pd.Series([np.nan if v is None else decode(v) for v in values], dtype=dtype)
    else:  # Int64, boolean, string, int64, bool
        out = pd.Series(values, dtype=dtype)
    out.name = col["name"]
    return out.reset_index(drop=True)


__all__ = ["decode", "decode_frame", "encode", "encode_frame"]
