"""What every command group of the CLI shares: usage errors, ``K=V`` options, JSON output,
the home and the ledger a command opens, tables of a frame, ``--force``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..demo import format_table
from ..service import KeyLedger
from ..service import open as open_ledger

if TYPE_CHECKING:
    import pandas as pd

# ``add(parent, name, func, help, json_flag=False, **kw)``: registers one command (see
# ``keyledger.cli.build_parser``).
AddCommand = Callable[..., argparse.ArgumentParser]

PROG = "keyledger"


class UsageError(Exception):
    """A usage problem found after parsing (exit code 2)."""


def pair(text: str) -> tuple[str, str]:
    """argparse type for ``k=v``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def pair_dict(pairs: Sequence[tuple[str, str]] | None, what: str) -> dict[str, str] | None:
    """Repeated ``K=V`` options as a dict; the same key with two values is a usage error."""
    if not pairs:
        return None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out and out[k] != v:
            raise UsageError(f"{what} {k!r} given twice with different values")
        out[k] = v
    return out


def format_period(td: timedelta | None) -> str | None:
    """A period as the CLI takes it (``90d``, ``1y``, ``12h``), in its largest whole unit."""
    if td is None:
        return None
    secs = int(td.total_seconds())
    for unit, size in (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600),
                       ("m", 60)):
        if secs % size == 0 and secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _missing(value: Any) -> bool:
    """Whether ``value`` is a missing scalar in pandas' sense. pandas is asked only once it is
    loaded (or for numpy's scalars): before that no value can be NaT or pd.NA, and a CLI command
    that prints no frame does not pay for importing it."""
    if "pandas" not in sys.modules and not type(value).__module__.startswith("numpy"):
        return isinstance(value, float) and math.isnan(value)
    import pandas as pd

    return bool(pd.api.types.is_scalar(value) and pd.isna(value))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (missing values -> None, datetimes -> ISO text)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | str):
        return value
    if _missing(value):  # NaN, NaT, pd.NA
        return None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return format_period(value)
    if hasattr(value, "item") and not isinstance(value, list | dict):  # numpy scalars
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def print_json(obj: Any) -> None:
    """The ``--json`` output of a command."""
    print(json.dumps(jsonable(obj), indent=2, ensure_ascii=False))


def home_of(args: argparse.Namespace) -> Path:
    """The home ``ledger_for`` opens (its files are never an output)."""
    from ..config import default_home

    return Path(args.home).expanduser().absolute() if args.home else default_home()


# commands that work on a home's files or process, never through `keyledger serve`
LOCAL_ONLY = ("serve", "demo", "restore")


def check_url(args: argparse.Namespace) -> None:
    """``--url`` replaces ``--home`` and ``--principal`` (the access key names the principal)
    and only applies to commands that run through the service."""
    if getattr(args, "url", None) is None:
        return
    if args.home is not None or args.principal is not None:
        raise UsageError("--url runs the command as the access key's principal on the "
                         "server's home: drop --home and --principal")
    if args.command in LOCAL_ONLY:
        raise UsageError(f"`{args.command}` works on a local home; it does not take --url")


def ledger_for(args: argparse.Namespace) -> KeyLedger:
    """Open the ledger of ``--home`` as ``--principal``, or with ``--url`` a client of
    ``keyledger serve`` (same methods); a repaired reconcile is noted on stderr."""
    if getattr(args, "url", None) is not None:
        from ..remote import connect

        remote: Any = connect(args.url, region=os.environ.get("KEYLEDGER_REGION", "us-east-1"))
        return remote  # a RemoteLedger: KeyLedger's public API
    led = open_ledger(args.home, principal=args.principal)
    if not led.last_reconcile.clean and args.command != "init":
        print(f"note: {led.last_reconcile}", file=sys.stderr)
    return led


def print_frame(args: argparse.Namespace, df: pd.DataFrame, empty: str) -> int:
    """A frame as JSON records or a table (``empty`` when it has no rows)."""
    if args.json:
        print_json(df.to_dict("records"))
    elif df.empty:
        print(empty)
    else:
        rows = [tuple(jsonable(v) for v in r) for r in df.itertuples(index=False)]
        print(format_table(tuple(c.upper() for c in df.columns), rows))
    return 0


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    """The ``--force`` option of a command that writes an output file."""
    p.add_argument("--force", action="store_true", help=f"replace {what} (outputs are never "
                   "written inside the home)")
