"""Columns of values for ``encrypt_many``/``decrypt_many`` (docs/batch.md): a list, a pandas
Series or a pyarrow binary array in, the same kind out, nulls kept null; ``BatchResult`` (what
``errors="return"`` gives); and the DataFrame helpers ``encrypt_columns``/``decrypt_columns``,
which work over any ledger with those two methods (``kl.open`` or ``kl.connect``).
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import InvalidInput

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# one failed item: (its index in the batch, the error's class name, the error's message)
ItemError = tuple[int, str, str]
Rebuild = Callable[[list[bytes | None]], Any]


@dataclass(frozen=True)
class BatchResult:
    """What ``encrypt_many``/``decrypt_many(..., errors="return")`` return: ``values`` of the
    input's kind with null where an item failed (or was null), and ``errors``, one
    ``(index, error class, message)`` per failed item, by index."""

    values: Any
    errors: list[ItemError] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> bool:
        """True when no item failed."""
        return not self.errors

    def __repr__(self) -> str:  # never the values: they may be plaintext
        first = f", first at index {self.errors[0][0]} ({self.errors[0][1]})" if self.errors else ""
        return f"<BatchResult {_length(self.values)} values, {self.failed} failed{first}>"


def _length(values: Any) -> int:
    try:
        return len(values)
    except TypeError:
        return 0


def as_items(values: object) -> tuple[list[Any], Rebuild]:
    """The batch's items (None where null) and how to rebuild the input's kind from outputs."""
    # pandas and pyarrow are loaded by the caller that made such values, never here: a library
    # that was never imported has no objects to pass (``import keyledger`` stays light)
    pandas, pyarrow = sys.modules.get("pandas"), sys.modules.get("pyarrow")
    if isinstance(values, list | tuple):
        na = pandas.NA if pandas is not None else None
        return [None if v is na else v for v in values], list
    if pandas is not None and isinstance(values, pandas.Series):
        return _series_items(values)
    if pyarrow is not None and isinstance(values, pyarrow.Array | pyarrow.ChunkedArray):
        return _arrow_items(values)
    raise InvalidInput(f"values must be a list of bytes, a pandas Series or a pyarrow binary "
                       f"array, not {type(values).__name__}")


def _series_items(series: pd.Series) -> tuple[list[Any], Rebuild]:
    import pandas as pd

    if isinstance(series.dtype, pd.StringDtype):
        raise InvalidInput("values is a Series of text; encode it to bytes first, "
                           "e.g. s.str.encode('utf-8')")
    items = series.tolist()
    missing = series.isna().to_numpy()
    if missing.any():
        items = [None if m else v for v, m in zip(items, missing, strict=True)]

    def rebuild(out: list[bytes | None]) -> pd.Series:
        return pd.Series(out, index=series.index, name=series.name, dtype=object)

    return items, rebuild


def _arrow_items(array: pa.Array | pa.ChunkedArray) -> tuple[list[Any], Rebuild]:
    import pyarrow as pa

    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        raise InvalidInput("values is an Arrow array of text; cast it to binary first, "
                           "e.g. array.cast(pa.binary())")
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or pa.types.is_fixed_size_binary(kind)):
        raise InvalidInput(f"values must be an Arrow binary array, not {kind}")
    out_type = pa.large_binary() if pa.types.is_large_binary(kind) else pa.binary()
    chunked = isinstance(array, pa.ChunkedArray)

    def rebuild(out: list[bytes | None]) -> pa.Array | pa.ChunkedArray:
        result = pa.array(out, type=out_type)
        return pa.chunked_array([result], type=out_type) if chunked else result

    return array.to_pylist(), rebuild


# -- DataFrames ----------------------------------------------------------------------------------
class BatchLedger(Protocol):
    """What the DataFrame helpers need: ``KeyLedger`` and ``kl.connect``'s ``RemoteLedger``."""

    def encrypt_many(self, name: str, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any: ...

    def decrypt_many(self, values: Any, *, context: Mapping[str, str] | None = None,
                     errors: str = "raise") -> Any: ...


def encrypt_columns(ledger: BatchLedger, df: pd.DataFrame, keys: Mapping[str, str], *,
                    context: Mapping[str, str] | None = None,
                    encoding: str | None = "utf-8") -> pd.DataFrame:
    """A copy of ``df`` with each column of ``keys`` (column -> key name) encrypted under its
    key: one ``encrypt_many`` (one audit record) per column; nulls stay null, ``df`` is not
    changed. Text values are encoded with ``encoding`` first (a ciphertext does not say it was
    text: decrypt with the same ``encoding``); ``encoding=None`` refuses text."""
    if not isinstance(keys, Mapping):
        raise InvalidInput("keys must map column names to key names, e.g. {'ssn': 'pii-key'}")
    _check_frame(df, keys)
    _check_encoding(encoding)
    out = df.copy()
    for column, name in keys.items():
        out[column] = ledger.encrypt_many(name, _encoded(df[column], encoding), context=context)
    return out


def decrypt_columns(ledger: BatchLedger, df: pd.DataFrame, columns: Sequence[str], *,
                    context: Mapping[str, str] | None = None,
                    encoding: str | None = None) -> pd.DataFrame:
    """A copy of ``df`` with ``columns`` decrypted (one ``decrypt_many`` per column; the key
    comes from each ciphertext); ``df`` is not changed. Values come back as bytes, or as text
    decoded with ``encoding`` (the one they were encrypted with)."""
    if isinstance(columns, str):
        columns = [columns]
    _check_frame(df, columns)
    _check_encoding(encoding)
    out = df.copy()
    for column in columns:
        plain = ledger.decrypt_many(df[column], context=context)
        out[column] = plain if encoding is None else _decoded(plain, encoding)
    return out


def _check_encoding(encoding: object) -> None:
    if encoding is None:
        return
    try:
        codecs.lookup(encoding)  # type: ignore[arg-type]
    except (LookupError, TypeError):
        raise InvalidInput(f"encoding must name a text encoding such as 'utf-8', not "
                           f"{encoding!r}") from None


def _encoded(column: pd.Series, encoding: str | None) -> pd.Series:
    """The column with its text values as bytes (nulls and bytes as they are)."""
    if encoding is None or not any(isinstance(v, str) for v in column):
        return column
    import pandas as pd

    return pd.Series([v.encode(encoding) if isinstance(v, str) else v for v in column],
                     index=column.index, name=column.name, dtype=object)


def _decoded(column: pd.Series, encoding: str) -> pd.Series:
    import pandas as pd

    try:
        return pd.Series([v.decode(encoding) if isinstance(v, bytes) else v for v in column],
                         index=column.index, name=column.name, dtype=object)
    except UnicodeDecodeError:
        raise InvalidInput(f"a decrypted value is not {encoding} text; decrypt without "
                           "encoding= to get bytes") from None


def _check_frame(df: object, columns: object) -> None:
    pandas = sys.modules.get("pandas")  # never loaded: df cannot be a DataFrame
    if pandas is None or not isinstance(df, pandas.DataFrame):
        raise InvalidInput(f"df must be a pandas DataFrame, not {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]  # type: ignore[attr-defined]
    if missing:
        raise InvalidInput(f"the DataFrame has no column {missing[0]!r}")


__all__ = ["BatchResult", "as_items", "decrypt_columns", "encrypt_columns"]
